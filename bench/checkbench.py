"""``python -m bench.checkbench [--quick] [--sizes N ...]``: the cost of a conflict decision.

Check and every mutation ask the registry which APQNs clash; a query covering the whole
256 x 256 ``big`` host used to walk all 65,536 APQNs one by one (issue #8 item 5). Measured
in process (no root, no D-Bus: the service on the in-process sysfs emulator) at 10, 1,000 and
10,000 one-APQN matrices (``bench.hosts.big_state``, as the bus benchmark's Check uses):

- ``Service.check`` / ``Service.check_rows`` (what the Check method sends) of the bus
  benchmark's small query (10 x 8 APQNs, 10 clashes) and of the whole host (the pool's
  APQNs plus every matrix's: ~49,000 to ~59,000 clashes);
- ``Registry.decide`` of a new matrix over the whole host, and of a refused one-APQN define;
- the floor of a whole-host Check: dbus-fast marshalling its reply, which no daemon avoids.

``run(quick, work)`` has the suite interface of ``bench/__main__.py`` (rows, raw).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Row, Stats, now, say, show
from bench.hosts import big_state

SIZES = (10, 1_000, 10_000)
ALL = list(range(256))
SMALL_ADAPTERS = list(range(10))
SMALL_DOMAINS = [0, *range(50, 57)]  # 80 APQNs; 10 clashes at every size (matrices 0-9)
NEW = "5eed0000-0000-4000-8000-ffffffffffff"


def _service(state: Path) -> Any:
    from apmatrixd.kernel import Kernel, TreeSysfs
    from apmatrixd.service import Service
    from apmatrixd.sim.model import Host
    from apmatrixd.store import Store

    service = Service(Kernel(TreeSysfs(Host.from_name("big"))), store=Store(state))
    service.load()
    return service


def _time(fn: Callable[[], object], reps: int) -> Stats:
    fn()  # warm
    out = []
    for _ in range(reps):
        t = now()
        fn()
        out.append(now() - t)
    return Stats.of(out)


def _marshal(rows: list[Any]) -> Callable[[], object]:
    """Marshal a Check reply carrying ``rows``, as the daemon's bus connection does."""
    from dbus_fast import Message

    call = Message(
        destination="org.apmatrix.Apmatrix1", sender=":1.1", path="/", member="Check", serial=1
    )
    return lambda: Message.new_method_return(call, "a(uus)", [rows])._marshall(False)


def measure(quick: bool, work: Path, sizes: tuple[int, ...] = SIZES) -> dict[str, dict[int, Stats]]:
    """Time each query at each size; {figure: {matrices: Stats}}."""
    out: dict[str, dict[int, Stats]] = {}
    for n in sizes:
        service = _service(big_state(work / f"state-{n}", n))
        assert len(service.registry.matrices) == n, len(service.registry.matrices)
        for name, st in _measure_one(service, quick).items():
            out.setdefault(name, {})[n] = st
    return out


def _measure_one(service: Any, quick: bool) -> dict[str, Stats]:
    from apmatrixd.core import DefineMatrix, Matrix

    reps_small = 50 if quick else 1000
    reps_big = 3 if quick else 20
    reg = service.registry
    whole = service.check(ALL, ALL)
    assert len(service.check(SMALL_ADAPTERS, SMALL_DOMAINS)) == min(len(reg.matrices), 10)
    say(f"== {len(reg.matrices)} matrices: a whole-host Check answers {len(whole)} clashes")
    whole_define = DefineMatrix(Matrix(NEW, frozenset(ALL), frozenset(ALL)))
    # matrix 0 holds 00.0000: refused (Conflict)
    small_define = DefineMatrix(Matrix(NEW, frozenset({0}), frozenset({0})))
    figures: dict[str, Callable[[], object]] = {
        "Service.check small (10x8)": lambda: service.check(SMALL_ADAPTERS, SMALL_DOMAINS),
        "Service.check whole host": lambda: service.check(ALL, ALL),
        "Registry.decide define whole host": lambda: reg.decide(whole_define),
        "Registry.decide define 1 APQN": lambda: reg.decide(small_define),
    }
    rows_of = getattr(service, "check_rows", None)  # absent before b80291b
    if rows_of is not None:
        figures["Service.check_rows small (Check's reply)"] = lambda: rows_of(
            SMALL_ADAPTERS, SMALL_DOMAINS
        )
        figures["Service.check_rows whole host (Check's reply)"] = lambda: rows_of(ALL, ALL)
    rows = [(c.apqn.adapter, c.apqn.domain, c.owner) for c in whole]
    figures["floor: marshal the whole-host reply"] = _marshal(rows)
    out: dict[str, Stats] = {}
    for name, fn in figures.items():
        out[name] = st = _time(fn, reps_big if "whole" in name else reps_small)
        show(name, st)
    return out


def run(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """The suite interface of bench/__main__.py: rows for RESULTS.md, and the raw figures."""
    sizes = (10, 1_000) if quick else SIZES
    figs = measure(quick, work, sizes)
    rows: list[Row] = []
    floor = figs["floor: marshal the whole-host reply"]
    reply = figs.get("Service.check_rows whole host (Check's reply)", {})
    for n, st in sorted(reply.items()):
        ratio = st.median / floor[n].median
        rows.append(
            Row(
                f"whole-host Check's own work, {n} matrices (in process)",
                f"{st.median * 1e3:.1f} ms",
                f"{floor[n].median * 1e3:.1f} ms (marshalling its reply)",
                ratio,
                "no dearer than sending the reply",
                ratio <= 1.0,
            )
        )
    decide = figs["Registry.decide define 1 APQN"]
    for n, st in sorted(decide.items()):
        rows.append(
            Row(
                f"Registry.decide, refused 1-APQN define, {n} matrices",
                f"{st.median * 1e6:.1f} us",
                "-",
                None,
                "flat in the number of matrices",
                None,
            )
        )
    raw = {name: {str(n): st.__dict__ for n, st in per.items()} for name, per in figs.items()}
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.checkbench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apmatrixd-checkbench-") as tmp:
        measure(args.quick, Path(tmp), tuple(args.sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
