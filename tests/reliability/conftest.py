"""Fixtures of the reliability tests: the D-Bus rig of tests/conftest.py (a private bus with our
shipped policy, the polkit mock, the daemon started as systemd would), here always with ``--simulate
--sim-mount DIR --state-dir DIR`` so the kernel (the emulator, through FUSE) and the state
directory can be read from outside the daemon after every call.

Long mode: ``APMATRIXD_LONG=1`` (anywhere), or ``--long`` when this directory is named on the
command line (``tools/test tests/reliability --long``; pytest only registers options of the
conftest files it loads at start-up).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from busrig import PolkitMock, start_daemon
from relrig import Sim, SimFactory
from rigs import force_unmount, need_fuse


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="reliability tests at full length (100,000 fuzzed calls, ...); "
        "the same as APMATRIXD_LONG=1",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long", default=False):
        os.environ["APMATRIXD_LONG"] = "1"


@pytest.fixture
def sim(system_bus: str, polkit: PolkitMock) -> Iterator[SimFactory]:
    """Start daemons on an emulated host mounted through FUSE, with a state directory.

    ``sim("default", env={...}, rescan=0.2)``. Each is stopped with SIGTERM afterwards and
    must exit 0 with no traceback in its log.
    """
    need_fuse()
    made: list[Sim] = []
    tops: list[str] = []

    def factory(
        scenario: str = "default", env: dict[str, str] | None = None, rescan: float = 0
    ) -> Sim:
        top = tempfile.mkdtemp(prefix="apm-rel-")
        tops.append(top)
        mnt, state = Path(top) / "sys", Path(top) / "state"
        mnt.mkdir()
        state.mkdir()
        args = ["--simulate", scenario, "--sim-mount", str(mnt), "--state-dir", str(state)]
        args += ["--rescan-interval", str(rescan)]
        old = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            d = start_daemon(system_bus, args)
        finally:
            for k, was in old.items():
                if was is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = was
        s = Sim(d, mnt, state)
        made.append(s)
        return s

    yield factory
    try:
        for s in made:
            s.close()
            alive = s.daemon.proc.poll() is None
            # Read the queued STATUS= lines: a full notify socket makes STOPPING=1 wait 5 s.
            s.drain_notify()
            rc = s.daemon.terminate()
            err = s.daemon.stderr()
            s.daemon.close()
            assert "Traceback" not in err, err
            if alive:
                assert rc == 0, err
    finally:
        for top in tops:
            force_unmount(Path(top) / "sys")
            shutil.rmtree(top, ignore_errors=True)
