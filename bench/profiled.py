"""``python -m bench.profiled OUT [apmatrixd arguments]``: the unmodified daemon with cProfile
on while it serves (from READY=1's coroutine to SIGTERM), the stats dumped to OUT.

``OUT`` ending in ``.json``: no cProfile; instead wall-clock timers around the steps of a call
(the handler, the store, the kernel write, the signals), dumped as JSON lists of seconds.
cProfile inflates small Python calls; the timers cost ~1 us each, so the client's round trip
minus the handler's time is the bus's share.

Why a wrapper: the bench needs to see where a D-Bus call's time goes inside the daemon, under
the bench's own load, without a profiling hook in the daemon itself. Start-up is left out.
"""

from __future__ import annotations

import cProfile
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from apmatrixd import daemon

TIMED: list[tuple[str, str, str]] = [
    ("transaction", "apmatrixd.service.tx", "Transaction.execute"),
    ("journal", "apmatrixd.journal", "Journal.begin"),
    ("store", "apmatrixd.store", "Store.write_matrix"),
    ("kernel", "apmatrixd.kernel.backend", "Kernel.write"),
    ("read_guest", "apmatrixd.kernel.backend", "Kernel.read_guest"),
    ("signals", "apmatrixd.bus.tree", "ObjectTree.on_changes"),
    ("status", "apmatrixd.daemon", "_status"),
]


def _timers() -> dict[str, list[float]]:
    import importlib

    out: dict[str, list[float]] = {}
    for key, mod_name, qual in TIMED:
        mod = importlib.import_module(mod_name)
        owner: Any = mod
        *outer, attr = qual.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, attr)
        sink = out.setdefault(key, [])

        def wrap(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    sink.append(time.perf_counter() - t)

            return timed

        setattr(owner, attr, wrap(fn, sink))
    return out


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    serve = daemon._serve
    if out.endswith(".json"):
        times = _timers()

        async def timed(bus: Any, service: Any, *more: Any) -> int:
            for v in times.values():
                v.clear()  # start-up is not a call
            try:
                return await serve(bus, service, *more)
            finally:
                with open(out, "w") as f:
                    json.dump(times, f)

        daemon._serve = timed
        return daemon.main(rest)
    prof = cProfile.Profile()

    async def profiled(bus: Any, service: Any, *more: Any) -> int:
        prof.enable()
        try:
            return await serve(bus, service, *more)
        finally:
            prof.disable()
            prof.dump_stats(out)

    daemon._serve = profiled
    return daemon.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
