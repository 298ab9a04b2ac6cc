"""The real-host rig of tests/bus/test_udev_e2e.py, for benchmarks: a private network namespace,
the FUSE emulator sending netlink uevents in it, and the unmodified daemon (or any program) in
its own mount namespace with the emulated tree bound on /sys."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from busrig import Daemon, apmatrixd_argv
from rigs import force_unmount

from bench.common import REPO

IN_NS_SH = """set -e
mount --bind "$1" /sys
mount -t tmpfs -o mode=0755 apmatrixd-bench-run /run
mkdir -p /run/udev /run/lock
: > /run/udev/control
if [ -n "$MDEVCTL_SCRATCH" ]; then
    mkdir -p /etc/mdevctl.d && mount --bind "$MDEVCTL_SCRATCH" /etc/mdevctl.d
fi
shift
exec "$@"
"""


@dataclass
class NsRig:
    top: Path
    root: Path
    holder: subprocess.Popen[bytes]
    fuse: subprocess.Popen[bytes]
    fuse_log: Path

    @property
    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` in the namespace, with the emulated tree on /sys and a private /run."""
        return [
            "nsenter", f"--net={self.netns}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", IN_NS_SH, "sh", str(self.root), *cmd,
        ]  # fmt: skip

    def daemon(
        self, address: str, state: Path, *args: str, timeout: float = 300
    ) -> tuple[Daemon, float]:
        sock_path = self.top / f"notify-{time.monotonic_ns()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(sock_path))
        env = dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0", NOTIFY_SOCKET=str(sock_path))
        env.pop("JOURNAL_STREAM", None)
        err = self.top / f"daemon-{time.monotonic_ns()}.log"
        argv = self.argv(
            *apmatrixd_argv(), "--bus-address", address, "--state-dir", str(state),
            "--rescan-interval", "0", *args,
        )  # fmt: skip
        with open(err, "wb") as f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, stderr=f)
        d = Daemon(proc, sock, address, err)
        if d.wait_for("READY=1", timeout) is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"no READY=1 (rc={proc.returncode}): {d.stderr()[-3000:]}")
        return d, time.perf_counter() - t0

    def daemon_pid(self, d: Daemon) -> int:
        """The daemon's own pid (it is exec'd by sh, the child of unshare, of nsenter)."""
        for pid, text in d.msgs:
            if "READY=1" in text.split("\n") and pid > 0:
                return pid
        raise RuntimeError("no pid on READY=1")

    def close(self) -> None:
        self.sent: tuple[int, int] | None = None
        self.fuse.send_signal(signal.SIGTERM)
        try:
            self.fuse.wait(20)
        except subprocess.TimeoutExpired:
            self.fuse.kill()
            self.fuse.wait()
        self.holder.kill()
        self.holder.wait()
        force_unmount(self.root)
        self.sent = self._uevents_sent()
        shutil.rmtree(self.top, ignore_errors=True)

    def uevents_sent(self) -> tuple[int, int] | None:
        return self.sent

    def _uevents_sent(self) -> tuple[int, int] | None:
        """(sent, dropped) as the emulator logged them on exit (after close)."""
        for line in self.fuse_log.read_text(errors="replace").splitlines():
            if "uevents sent" in line:
                words = line.replace(",", "").split()
                return int(words[words.index("sent") + 1]), int(words[words.index("dropped") + 1])
        return None


def start(scenario: str, uevents: bool = True) -> NsRig:
    top = Path(tempfile.mkdtemp(prefix="apmatrixd-bench-"))
    root = top / "sys"
    root.mkdir()
    holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "3600"])
    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{holder.pid}/ns/net") == mine:
        if time.monotonic() > deadline:
            raise RuntimeError("unshare -n did not take")
        time.sleep(0.01)
    netns = f"/proc/{holder.pid}/ns/net"
    rfd, wfd = os.pipe()
    log = top / "fuse.log"
    with open(log, "wb") as f:
        fuse = subprocess.Popen(
            ["nsenter", f"--net={netns}", "--", sys.executable, "-m", "apmatrixd.sim.cli", "-v",
             "mount", str(root), "--uevents", "netlink" if uevents else "none",
             "--scenario", scenario, "--ready-fd", str(wfd)],
            pass_fds=(wfd,), cwd=REPO, stderr=f,
        )  # fmt: skip
    os.close(wfd)
    try:
        ready = select.select([rfd], [], [], 60)[0]
        line = os.read(rfd, 200).decode() if ready else ""
    finally:
        os.close(rfd)
    if not line.startswith("mounted"):
        fuse.kill()
        fuse.wait()
        holder.kill()
        force_unmount(root)
        raise RuntimeError(f"emulator did not mount: {line!r} {log.read_text()[-2000:]}")
    return NsRig(top, root, holder, fuse, log)
