"""The booted machine of the boot rig (bootrig.py): one per module, powered off afterwards."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
from bootrig import Machine, build_debs, build_root, missing
from rigs import unavailable

_failed: list[str] = []


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    """Debian 12 booted with systemd as PID 1, apmatrixd and apmatrixd-sim installed from our
    .deb files, the emulator over /sys/bus/ap and /sys/devices/vfio_ap; apmatrixd not started."""
    if why := missing():
        unavailable(why[0], installable=why[1])
    if _failed:  # pytest sets a failed module fixture up again for each test: not a boot each
        pytest.fail(f"the boot rig failed for an earlier test: {_failed[0]}", pytrace=False)
    t0 = time.monotonic()
    try:
        root = build_root()
        t1 = time.monotonic()
        debs = build_debs()
        t2 = time.monotonic()
        m = Machine.boot(root, debs)
    except Exception as err:
        _failed.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise
    m.timings = {"root": t1 - t0, "debs": t2 - t1, **m.timings}
    try:
        yield m
    finally:
        m.close()
        figures = ", ".join(f"{k} {v:.1f} s" for k, v in m.timings.items())
        print(f"\nboot rig: {figures}", file=sys.stderr)
