"""The unmodified daemon in real-host mode, against the FUSE emulator, with real uevents
through pyudev, on both layouts (test-rigs.md §2.3 and §5(b)).

- a private network namespace (held by ``unshare -n sleep``): the emulator's netlink
  multicasts reach only monitors in it, never the host's udev listeners;
- ``apmatrixd-sim mount --uevents netlink`` joins that namespace (``nsenter --net``) and
  mounts the emulator at ``$ROOT`` in the test's own mount namespace, so the test plays the
  hardware with plain writes to ``$ROOT``;
- the daemon joins the namespace too, in its own mount namespace with ``$ROOT`` bound on
  ``/sys``, a private ``/run`` holding ``udev/control`` (else libudev disables
  ``source='udev'`` monitors) and ``SYSTEMD_DEVICE_VERIFY_SYSFS=0`` (else libudev refuses a
  /sys that is not sysfs); no preload, no option telling it it is being tested;
- the private dbus-daemon listens on a path socket (abstract sockets are per namespace).

The daemon runs with ``--rescan-interval 0``: whatever it learns, it learns from uevents.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, Daemon, apmatrixd_argv, arun
from dbus_fast import Variant
from rigs import REPO, force_unmount, fuse_missing, netns_missing

G1 = "11111111-1111-4111-8111-111111111111"
P1 = f"{ROOT}/matrices/{G1.replace('-', '_')}"

DAEMON_SH = """set -e
mount --bind "$1" /sys
mount -t tmpfs -o mode=0755 apmatrixd-test-run /run
mkdir -p /run/udev /run/lock
: > /run/udev/control
shift
exec "$@"
"""


@dataclass
class NsRig:
    top: Path
    root: Path
    holder: subprocess.Popen[bytes]
    fuse: subprocess.Popen[bytes]

    @property
    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def daemon(self, address: str, *args: str) -> Daemon:
        sock_path = self.top / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(sock_path))
        env = dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0", NOTIFY_SOCKET=str(sock_path))
        env.pop("JOURNAL_STREAM", None)
        err = self.top / "daemon.log"
        argv = [
            "nsenter", f"--net={self.netns}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", DAEMON_SH, "sh", str(self.root),
            *apmatrixd_argv(), "-v", "--bus-address", address,
            "--state-dir", str(self.top / "state"), *args,
        ]  # fmt: skip
        with open(err, "wb") as f:
            proc = subprocess.Popen(argv, env=env, stderr=f)
        d = Daemon(proc, sock, address, err)
        if d.wait_for("READY=1", 20) is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no READY=1 (rc={proc.returncode}): {d.stderr()}")
        return d


def _start_fuse(netns: str, root: Path, scenario: str) -> subprocess.Popen[bytes]:
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns}", "--", sys.executable, "-m", "apmatrixd.sim.cli", "mount",
         str(root), "--uevents", "netlink", "--scenario", scenario, "--ready-fd", str(wfd)],
        pass_fds=(wfd,),
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(wfd)
    try:
        ready = select.select([rfd], [], [], 15)[0]
        line = os.read(rfd, 200).decode() if ready else ""
    finally:
        os.close(rfd)
    if not line.startswith("mounted"):
        proc.kill()
        proc.wait()
        force_unmount(root)
        raise AssertionError(f"emulator did not mount: {line!r}")
    return proc


@pytest.fixture(params=["default", "rfc2017"])
def nsrig(request: pytest.FixtureRequest) -> Iterator[NsRig]:
    reason = fuse_missing() or netns_missing()
    if reason is None and shutil.which("nsenter") is None:
        reason = "no nsenter (util-linux)"
    if reason:
        pytest.skip(reason)
    top = Path(tempfile.mkdtemp(prefix="apmatrixd-e2e-"))
    root = top / "sys"
    root.mkdir()
    holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "600"])
    fuse: subprocess.Popen[bytes] | None = None
    try:
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/net") == mine:
            assert time.monotonic() < deadline, "unshare -n did not take"
            time.sleep(0.01)
        fuse = _start_fuse(f"/proc/{holder.pid}/ns/net", root, request.param)
        yield NsRig(top, root, holder, fuse)
    finally:
        if fuse is not None:
            fuse.send_signal(signal.SIGTERM)
            try:
                fuse.wait(10)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        holder.kill()
        holder.wait()
        force_unmount(root)
        shutil.rmtree(top, ignore_errors=True)


async def wait_state(c: Client, want: str, t: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + t
    while True:
        props = await c.props(P1, MATRIX)
        if props["State"] == want:
            return props
        assert time.monotonic() < deadline, props
        await asyncio.sleep(0.02)


@pytest.mark.e2e
def test_real_host_mode_through_pyudev(nsrig: NsRig, system_bus: str) -> None:
    daemon = nsrig.daemon(system_bus, "--rescan-interval", "0")
    root = nsrig.root

    async def go() -> None:
        c = await Client.connect(daemon.address)
        layout = (await c.props(ROOT, MANAGER))["Layout"]
        assert layout in ("upstream", "rfc2017")
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        opts = {"adapters": Variant("au", [5, 6]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts])
        props = await c.props(P1, MATRIX)
        parent = "vfio_ap" if layout == "upstream" else "ap_matrix"
        assert props["State"] == "active"
        assert props["SysfsPath"] == f"/sys/devices/{parent}/matrix/{G1}"
        await c.listen()

        # card 05 leaves the configuration: a CONFIG=0 uevent, through netlink and pyudev
        (root / "devices/ap/card05/config").write_text("0\n")
        props = await wait_state(c, "degraded")
        assert props["GuestApqns"] == [[6, 4]]
        (root / "devices/ap/card05/config").write_text("1\n")
        props = await wait_state(c, "active")
        assert props["GuestApqns"] == [[5, 4], [6, 4]]
        adapter5 = await c.props(f"{ROOT}/adapters/05", "org.apmatrix.Apmatrix1.Adapter")
        assert adapter5["Configured"] is True

        # changed by hand: no uevent for that; the next uevent makes the daemon look
        (root / f"devices/{parent}/matrix/{G1}/assign_domain").write_text("0x47\n")
        (root / "devices/ap/card06/online").write_text("1\n")
        deadline = time.monotonic() + 10
        while not [m for m in c.signals if m.member == "Drift"]:
            assert time.monotonic() < deadline, daemon.stderr()
            await asyncio.sleep(0.02)
        (drift,) = [m.body for m in c.signals if m.member == "Drift"]
        assert drift == [P1, "domains: kernel 0004,0047 vs registry 0004"]
        assert (await c.props(P1, MATRIX))["Domains"] == [4, 0x47]
        c.close()

    try:
        arun(go())
    finally:
        rc = daemon.terminate()
        log = daemon.stderr()
        daemon.close()
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "absorbed" in log and "no udev monitor" not in log, log
