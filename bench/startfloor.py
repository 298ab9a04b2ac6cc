"""The floor of start-up: only the reads start-up must make, nothing decided, nothing written.

``python -m bench.startfloor SCENARIO STATE_DIR`` builds the emulated host in-process (as
``apmatrixd --simulate`` does), reads the state directory (every stored definition, parsed)
and the whole AP configuration through the daemon's own kernel backend (every card, queue,
binding and mdev: ``Kernel.read_host``, what start-up reads before it decides anything), and
sends READY=1 to $NOTIFY_SOCKET, so it is timed exactly as the daemon is. Prints what it read.
"""

from __future__ import annotations

import json
import sys
import time

from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.sim.model import Host
from apmatrixd.store import Store
from bench.walk import notify


def main(argv: list[str]) -> int:
    scenario, state = argv[0], argv[1]
    t0 = time.perf_counter()
    kernel = Kernel(TreeSysfs(Host.from_name(scenario)))
    built = time.perf_counter()
    contents = Store(state).load()
    snap = kernel.read_host()
    notify("READY=1")
    print(
        json.dumps(
            {
                "build_s": built - t0,
                "read_s": time.perf_counter() - built,
                "stored": len(contents.matrices),
                "adapters": len(snap.adapters),
                "mdevs": len(snap.mdevs),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
