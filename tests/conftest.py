"""Test-wide setup and the D-Bus rig every directory shares.

Its presence puts ``tests/`` on ``sys.path`` (helpers such as ``rigs``); it adds ``tests/bus``
too, for ``busrig``. The fixtures: one private system-like bus with our shipped policy and one
polkit mock per session, and a fresh daemon per test (~0.1 s), started as systemd would.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bus"))

from busrig import Daemon, DaemonFactory, PolkitMock, PrivateBus, start_daemon
from rigs import force_unmount, need_fuse, need_tool, unavailable


@pytest.fixture(scope="session")
def system_bus() -> Iterator[str]:
    need_tool("dbus-daemon", "dbus-daemon")
    need_tool("busctl", "systemd")
    bus = PrivateBus.start()
    yield bus.address
    bus.stop()


@pytest.fixture(scope="session")
def polkit_mock(system_bus: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolkitMock]:
    if os.geteuid() != 0:
        unavailable("the polkit mock must own org.freedesktop.PolicyKit1: root", installable=False)
    r = os.system("/usr/bin/python3 -c 'import dbusmock' 2>/dev/null")
    if r != 0:
        unavailable("python3-dbusmock not installed (apt-get install python3-dbusmock)")
    mock = PolkitMock(system_bus, tmp_path_factory.mktemp("polkit") / "polkit.log")
    mock.start()
    yield mock
    mock.stop()


@pytest.fixture
def polkit(polkit_mock: PolkitMock) -> Iterator[PolkitMock]:
    """The mock, denying everything at the start of each test (and running)."""
    if polkit_mock.proc is None:
        polkit_mock.start()
    polkit_mock.allow()
    yield polkit_mock
    if polkit_mock.proc is None:
        polkit_mock.start()
    polkit_mock.allow()


@pytest.fixture
def start(system_bus: str, polkit: PolkitMock) -> Iterator[DaemonFactory]:
    """Start daemons; each is stopped with SIGTERM afterwards and must exit 0 after STOPPING=1."""
    started: list[Daemon] = []

    def factory(*args: str, **kw: object) -> Daemon:
        d = start_daemon(system_bus, args or ("--simulate",), **kw)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield factory
    for d in started:
        alive = d.proc.poll() is None
        rc = d.terminate()
        try:
            if alive:
                assert d.wait_for("STOPPING=1", 5), d.msgs
                assert rc == 0, d.stderr()
            assert "Traceback" not in d.stderr(), d.stderr()
        finally:
            d.close()


@pytest.fixture
def daemon(start: DaemonFactory) -> Daemon:
    return start()


@pytest.fixture
def mnt() -> Iterator[Path]:
    """An empty directory for ``--sim-mount`` (root, /dev/fuse); unmounted whatever happens."""
    need_fuse()
    with tempfile.TemporaryDirectory(prefix="apmatrixd-simmount-") as top:
        where = Path(top) / "sys"
        where.mkdir()
        try:
            yield where
        finally:
            force_unmount(where)
