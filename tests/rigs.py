"""Shared rigs for end-to-end tests and benchmarks: what the machine offers, private namespaces,
mounts, and the real-host rig (:class:`NsRig`).

Python 3.11 has no ``os.unshare``; the netns side runs in a child under ``unshare -n``
(util-linux), so the test process itself stays in the host namespaces.
"""

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
from typing import TYPE_CHECKING, Any, NoReturn

from busrig import Daemon, apmatrixd_argv

if TYPE_CHECKING:
    from apmatrixd.service import Service
    from apmatrixd.sim.model import Host

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


STRICT_ENV = "APMATRIXD_TESTS_STRICT"
"""Set by tools/test (what CI runs): tools/bootstrap has installed every tool the tests use,
so a missing one there is a broken set-up to fix, not a reason to skip."""


def unavailable(reason: str, *, installable: bool = True) -> NoReturn:
    """Skip a test this machine cannot run; under tools/test fail instead when what is missing
    is something tools/bootstrap installs (only what no package gives - root, /dev/fuse, a
    kernel without namespaces - may skip there)."""
    import pytest

    if installable and os.environ.get(STRICT_ENV) == "1":
        pytest.fail(f"{reason}: tools/bootstrap should have installed it", pytrace=False)
    pytest.skip(reason)


def need_tool(tool: str, package: str) -> None:
    """``tool`` (a command, or an absolute path) or skip/fail as :func:`unavailable` says."""
    if shutil.which(tool) is None and not Path(tool).exists():
        unavailable(f"{tool} not installed (apt-get install {package})")


def need_fuse() -> None:
    """A real FUSE mount can be made here, or skip/fail."""
    if os.geteuid() != 0:
        unavailable("needs root", installable=False)
    if not os.path.exists("/dev/fuse"):
        unavailable("no /dev/fuse", installable=False)
    need_tool("fusermount3", "fuse3")


def need_netns() -> None:
    """A private network namespace can be made here, or skip/fail."""
    if os.geteuid() != 0:
        unavailable("needs root", installable=False)
    need_tool("unshare", "util-linux")
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if done.returncode != 0:
        unavailable(f"unshare -n failed: {done.stderr.decode().strip()}", installable=False)


def in_netns(script: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a Python ``script`` in a fresh network namespace (nothing leaks to the host's udev)."""
    return subprocess.run(
        ["unshare", "-n", "--", PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (a server of a test binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_mount(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a mountpoint (by /proc/self/mounts, which never blocks on FUSE)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def wait_unmounted(path: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mount(path):
            return True
        time.sleep(0.02)
    return not is_mount(path)


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Detach a FUSE mount whatever state its server is in; call before removing the dir."""
    if is_mount(path):
        subprocess.run(["fusermount3", "-uz", os.fspath(path)], capture_output=True, check=False)


# -- the real-host rig ---------------------------------------------------------------------------
# One implementation for tests/bus/test_udev_e2e.py and the benchmarks (bench/hotbench.py,
# bench/mdevbench.py), so that what the bench measures is what the test checks.

# $1: the emulated tree, bound on /sys; $2: a directory bound on /etc/mdevctl.d, or "" for none
# (mdevctl must not see or write the host's); then the command. The private /run holds
# udev/control, else libudev disables source='udev' monitors.
IN_NS_SH = """set -e
mount --bind "$1" /sys
mount -t tmpfs -o mode=0755 apmatrixd-rig-run /run
mkdir -p /run/udev /run/lock
: > /run/udev/control
if [ -n "$2" ]; then
    mkdir -p /etc/mdevctl.d && mount --bind "$2" /etc/mdevctl.d
fi
shift 2
exec "$@"
"""


@dataclass
class NsRig:
    """A private network namespace (held by ``unshare -n sleep``), the FUSE emulator mounted at
    ``root`` in our mount namespace and sending its uevents by netlink in that network namespace
    only (never to the host's udev listeners), and programs run in the namespace with ``root``
    on /sys: the unmodified daemon in real-host mode, learning from uevents through pyudev."""

    top: Path
    root: Path
    holder: subprocess.Popen[bytes]
    fuse: subprocess.Popen[bytes]
    fuse_log: Path
    sent: tuple[int, int] | None = None

    @classmethod
    def start(cls, scenario: str, *, uevents: bool = True, prefix: str = "apmatrixd-rig-") -> NsRig:
        """Mount ``scenario`` with netlink uevents (or none: ``uevents=False``); ``close()`` it."""
        top = Path(tempfile.mkdtemp(prefix=prefix))
        root = top / "sys"
        root.mkdir()
        log = top / "fuse.log"
        holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "3600"])
        fuse: subprocess.Popen[bytes] | None = None
        try:
            mine = os.readlink("/proc/self/ns/net")
            deadline = time.monotonic() + 5
            while os.readlink(f"/proc/{holder.pid}/ns/net") == mine:
                if time.monotonic() > deadline:
                    raise RuntimeError("unshare -n did not take")
                time.sleep(0.01)
            rfd, wfd = os.pipe()
            with open(log, "wb") as f:
                fuse = subprocess.Popen(
                    ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--", sys.executable, "-m",
                     "apmatrixd.sim.cli", "-v", "mount", str(root),
                     "--uevents", "netlink" if uevents else "none",
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
                raise RuntimeError(f"emulator did not mount: {line!r} {log.read_text()[-2000:]}")
            return cls(top, root, holder, fuse, log)
        except BaseException:
            if fuse is not None:
                fuse.kill()
                fuse.wait()
            holder.kill()
            holder.wait()
            force_unmount(root)
            shutil.rmtree(top, ignore_errors=True)
            raise

    @property
    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def argv(self, *cmd: str, mdevctl_scratch: Path | None = None) -> list[str]:
        """``cmd`` in the namespace, with the emulated tree on /sys and a private /run (and
        ``mdevctl_scratch`` on /etc/mdevctl.d if given)."""
        scratch = "" if mdevctl_scratch is None else str(mdevctl_scratch)
        return [
            "nsenter", f"--net={self.netns}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", IN_NS_SH, "sh", str(self.root), scratch, *cmd,
        ]  # fmt: skip

    def daemon(
        self, address: str, state: Path, *args: str, timeout: float = 300
    ) -> tuple[Daemon, float]:
        """The daemon started as systemd would (NOTIFY_SOCKET), in the namespace with
        ``--rescan-interval 0`` (whatever it learns, it learns from uevents); ``args`` are
        appended. Returns it once READY=1, with the seconds that took. Without
        ``SYSTEMD_DEVICE_VERIFY_SYSFS=0`` libudev refuses a /sys that is not sysfs."""
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
            sock.close()
            raise RuntimeError(f"no READY=1 (rc={proc.returncode}): {d.stderr()[-3000:]}")
        return d, time.perf_counter() - t0

    def daemon_pid(self, d: Daemon) -> int:
        """The daemon's own pid (it is exec'd by sh, the child of unshare, of nsenter)."""
        for pid, text in d.msgs:
            if "READY=1" in text.split("\n") and pid > 0:
                return pid
        raise RuntimeError("no pid on READY=1")

    def close(self) -> None:
        """Stop the emulator (it logs the uevents it sent on exit), drop the namespace and the
        mount, remove the files."""
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
        """(sent, dropped) as the emulator logged them on exit; None before ``close()``."""
        return self.sent

    def _uevents_sent(self) -> tuple[int, int] | None:
        for line in self.fuse_log.read_text(errors="replace").splitlines():
            if "uevents sent" in line:
                words = line.replace(",", "").split()
                return int(words[words.index("sent") + 1]), int(words[words.index("dropped") + 1])
        return None


def everything(host: Host, svc: Service, state: Path) -> dict[str, Any]:
    """What a refused or failed change must leave exactly as it was: the registry, the kernel
    (read afresh), the state directory's bytes, and no intent pending. (The journal file is
    written and cleared by every change, a failed one too.)"""
    from apmatrixd.journal import Journal
    from apmatrixd.kernel import Kernel, TreeSysfs

    return {
        "matrices": svc.matrices(),
        "host": svc.host,
        "adapters": svc.adapters(),
        "violations": svc.registry.violations(),
        "kernel": Kernel(TreeSysfs(host)).read_host(),
        "masks": [
            host.read(f"bus/ap/{m}") for m in ("apmask", "aqmask") if host.exists(f"bus/ap/{m}")
        ],
        "files": {
            str(p.relative_to(state)): p.read_bytes()
            for p in state.rglob("*")
            if p.is_file() and p.name != "journal"
        },
        "intent": Journal(state).read(),
    }


def recording_writes(host: Host) -> list[str]:
    """The paths the emulator is written to from now on, in order (a list that grows)."""
    seen: list[str] = []
    real = host.write

    def record(path: str, data: bytes) -> int:
        seen.append(path)
        return real(path, data)

    host.write = record  # type: ignore[method-assign]
    return seen
