"""The real s390-tools (``lszcrypt``, ``chzcrypt``) against the FUSE emulator of every kernel
generation: their output and exit codes are what that kernel would give.

The tools are built once from ``../shared/third-party/s390-tools-*.tar.gz`` (unpatched; they
honour ``SYSFS_ROOT``) into ``build/`` and reused by later runs (``s390rig``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs import need_fuse
from s390rig import built

from apmatrixd.sim.fuse import Mount, mount
from apmatrixd.sim.model import Host
from apmatrixd.sim.profile import PROFILES

G1 = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(scope="module")
def tools() -> Path:
    """The directory holding the built lszcrypt and chzcrypt (built once, cached)."""
    src = built(("libutil",), ("zconf/zcrypt", "lszcrypt", "chzcrypt"))
    return src / "zconf" / "zcrypt"


@pytest.fixture
def top() -> Iterator[Path]:
    need_fuse()
    with tempfile.TemporaryDirectory(prefix="apmatrixd-s390tools-") as d:
        os.chmod(d, 0o755)
        (Path(d) / "sys").mkdir()
        yield Path(d)


def host_with_a_guest(kernel: str, interrupts: bool = True) -> Host:
    """Adapter 05 given to vfio_ap, one mdev with 05.0004, a guest running with it."""
    base = Host.from_name(f"default@{kernel}")
    host = Host(dataclasses.replace(base.scenario, interrupts=interrupts))
    host.write("bus/ap/apmask", b"-5")
    mdev = f"devices/vfio_ap/matrix/{G1}"
    host.write(f"{host.mdev_type_dir}/create", G1.encode())
    host.write(f"{mdev}/assign_adapter", b"5")
    host.write(f"{mdev}/assign_domain", b"4")
    host.attach_guest(G1)
    return host


class Tools:
    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SYSFS_ROOT=str(self.root))
        return subprocess.run([str(self.bindir / tool), *args], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    def ok(self, tool: str, *args: str) -> list[str]:
        r = self.run(tool, *args)
        assert r.returncode == 0, (tool, args, r.stdout, r.stderr)
        return r.stdout.splitlines()


def rows(lines: list[str]) -> dict[str, list[str]]:
    """lszcrypt's table by its first column."""
    return {ln.split()[0]: ln.split() for ln in lines[2:] if ln.strip()}


@pytest.mark.parametrize("kernel", sorted(PROFILES))
def test_lszcrypt_and_chzcrypt_on_each_generation(tools: Path, top: Path, kernel: str) -> None:
    host = host_with_a_guest(kernel)
    server = mount(host, top / "sys", foreground=False)
    assert isinstance(server, Mount)
    try:
        t = Tools(tools, top / "sys")
        verbose = rows(t.ok("lszcrypt", "-V"))
        assert verbose["05.0004"][3:4] == ["in"] and verbose["05.0004"][-1] == "vfio_ap"
        assert verbose["05.0047"][3] == "unassigned" and verbose["05.0047"][-1] == "vfio_ap"
        assert verbose["06.0004"][3] == "online" and verbose["06.0004"][-1] == "cex4queue"
        assert verbose["05"][-1] == "cex4card"
        plain = rows(t.ok("lszcrypt"))
        assert "05.0004" not in plain and "06.0004" in plain  # vfio_ap queues have no online

        bus = t.ok("lszcrypt", "-b")
        features = [ln for ln in bus if ln.startswith("features:")]
        if kernel == "5.15":  # no bus features attribute: no line at all
            assert features == []
        else:  # CEX5 cards: no APSB (that comes with CEX8 machines)
            assert features == ["features: APSC APXA QACT RC8A"]
        assert "ap_interrupts are enabled" in bus and "poll_thread is disabled" in bus
        grid = t.ok("lszcrypt", "-d")
        assert grid[2].split()[:6] == ["00", ".", ".", ".", ".", "B"]

        # With adapter interrupts the kernel never starts the poll thread.
        r = t.run("chzcrypt", "-p")
        assert r.returncode == 1 and "unable to change poll thread setting" in r.stderr

        assert t.ok("chzcrypt", "--config-off", "06") == []
        assert {v[3] for v in rows(t.ok("lszcrypt", "06")).values()} == {"deconfig"}
        r = t.run("chzcrypt", "-e", "06")  # chzcrypt reads config first and only warns
        assert r.returncode == 0 and "06 is deconfigured, can't set to online" in r.stderr
        assert {v[3] for v in rows(t.ok("lszcrypt", "06")).values()} == {"deconfig"}
        t.ok("chzcrypt", "--config-on", "06")
        t.ok("chzcrypt", "-d", "06")
        assert {v[3] for v in rows(t.ok("lszcrypt", "06")).values()} == {"offline"}
        t.ok("chzcrypt", "-e", "06")
        assert {v[3] for v in rows(t.ok("lszcrypt", "06")).values()} == {"online"}
    finally:
        server.stop()


def test_chzcrypt_starts_the_poll_thread_without_interrupts(tools: Path, top: Path) -> None:
    host = host_with_a_guest("6.19", interrupts=False)
    server = mount(host, top / "sys", foreground=False)
    assert isinstance(server, Mount)
    try:
        t = Tools(tools, top / "sys")
        t.ok("chzcrypt", "-p")
        bus = t.ok("lszcrypt", "-b")
        assert "ap_interrupts are disabled" in bus and "poll_thread is enabled" in bus
        t.ok("chzcrypt", "-n")
        assert "poll_thread is disabled" in t.ok("lszcrypt", "-b")
    finally:
        server.stop()
