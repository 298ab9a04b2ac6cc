"""The D-Bus test rig: a private system-like bus with our shipped policy, the polkit mock, and
apmatrixd started the way systemd starts it (NOTIFY_SOCKET with SO_PASSCRED, WATCHDOG_USEC,
SIGTERM). Measured recipes: /work/shared/spec/dbus-rig.md §0b, §1, §4, §5.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POLICY = REPO / "dbus" / "org.apmatrix.Apmatrix1.conf"
XML = REPO / "dbus" / "org.apmatrix.Apmatrix1.xml"
UNIT = REPO / "systemd" / "apmatrixd.service"
CLIENT = HERE / "busclient.py"
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534

NAME = "org.apmatrix.Apmatrix1"
ROOT = "/org/apmatrix/Apmatrix1"
MANAGER = "org.apmatrix.Apmatrix1.Manager"
MATRIX = "org.apmatrix.Apmatrix1.Matrix"
ADAPTER = "org.apmatrix.Apmatrix1.Adapter"
ERR = "org.apmatrix.Apmatrix1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def path_of(uuid: str) -> str:
    """A matrix's object path, spelled out here (not the daemon's names.matrix_path) so a
    test finds a wrongly named object missing."""
    return f"{ROOT}/matrices/{uuid.replace('-', '_')}"


def apmatrixd_argv() -> list[str]:
    """The installed console script, as a unit's ExecStart= would run it, with an mdevctl
    directory of its own (a later --mdevctl-dir wins): no test daemon reads or writes the
    host's /etc/mdevctl.d, and none sees another's."""
    exe = Path(sys.executable).parent / "apmatrixd"
    own = tempfile.mkdtemp(prefix="apmatrixd-test-mdevctl-")
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "apmatrixd.daemon"]
    return [*argv, "--mdevctl-dir", own]


# -- the bus ------------------------------------------------------------------------------------
@dataclass
class PrivateBus:
    address: str
    proc: subprocess.Popen[bytes]
    dir: Path

    @classmethod
    def start(cls) -> PrivateBus:
        d = Path(tempfile.mkdtemp(prefix="apm-bus-", dir="/tmp"))
        d.chmod(0o755)  # nobody must reach the socket: pytest's tmp_path is 0700
        conf = d / "bus.conf"
        conf.write_text(
            (REPO / "tools" / "private-bus.conf.in")
            .read_text()
            .replace("@SOCKET@", str(d / "bus.sock"))
            .replace("@POLICY@", str(POLICY))
        )
        r, w = os.pipe()
        with open(d / "bus.log", "wb") as log:  # not a pipe: every rejection is logged there
            proc = subprocess.Popen(
                [
                    "dbus-daemon",
                    f"--config-file={conf}",
                    "--nofork",
                    "--nopidfile",
                    f"--print-address={w}",
                ],
                pass_fds=(w,),
                stderr=log,
            )
        os.close(w)
        with os.fdopen(r) as f:
            address = f.readline().strip()  # written once the socket listens
        if not address:
            proc.wait(5)
            raise RuntimeError(f"dbus-daemon failed: {(d / 'bus.log').read_text()}")
        return cls(address, proc, d)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- polkit mock --------------------------------------------------------------------------------
@dataclass
class PolkitMock:
    """python-dbusmock's polkitd template: decides per action id, logs every check."""

    address: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "dbusmock", "--template", "polkitd", "-l", str(self.log)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = busctl(self.address, "status", "org.freedesktop.PolicyKit1")
            if r.returncode == 0:
                return
            time.sleep(0.03)
        raise RuntimeError("polkit mock did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.proc = None

    def _mock(self, member: str, sig: str, *args: str) -> None:
        r = busctl(
            self.address,
            "call",
            "org.freedesktop.PolicyKit1",
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.DBus.Mock",
            member,
            sig,
            *args,
        )
        assert r.returncode == 0, r.stderr

    def allow(self, *actions: str) -> None:
        self._mock("SetAllowed", "as", str(len(actions)), *actions)

    def checks(self) -> list[str]:
        """Log lines of CheckAuthorization calls so far."""
        if not self.log.exists():
            return []
        return [ln for ln in self.log.read_text().splitlines() if "CheckAuthorization" in ln]


# -- the daemon ---------------------------------------------------------------------------------
@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    address: str
    stderr_path: Path
    msgs: list[tuple[int, str]] = field(default_factory=list)

    def wait_for(self, text: str, timeout: float = 10) -> tuple[int, str] | None:
        """The first notify datagram containing the line ``text`` (pid, datagram)."""
        for pid, msg in self.msgs:
            if text in msg.split("\n"):
                return pid, msg
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            self.msgs.append((pid, data.decode()))
            if text in data.decode().split("\n"):
                return pid, data.decode()
        return None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self) -> int:
        """SIGTERM, as systemd stops a unit; the exit status. Waited for as long as the
        daemon's own bounds on a stop can take with --sim-mount (the name released 2 s,
        queued changes 5 s, the FUSE unmount and its thread 10 s each), which a loaded
        two-core machine reached after the check flood; systemd itself waits 90 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        self.sock.close()
        self.stderr_path.unlink(missing_ok=True)


def start_daemon(
    address: str,
    args: Sequence[str] = ("--simulate",),
    watchdog_usec: int = 0,
    wait: bool = True,
    ready_timeout: float = 15,
) -> Daemon:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # sender pid: NotifyAccess=main
    name = f"apmatrixd-test-{uuidlib.uuid4().hex}"
    sock.bind("\0" + name)  # abstract: nothing to clean up
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, NOTIFY_SOCKET="@" + name)
    env.pop("JOURNAL_STREAM", None)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    err = Path(tempfile.mkstemp(prefix="apmatrixd-", suffix=".log")[1])
    with open(err, "wb") as f:
        proc = subprocess.Popen([*apmatrixd_argv(), *args], env=env, stderr=f)
    d = Daemon(proc, sock, address, err)
    if wait and d.wait_for("READY=1", ready_timeout) is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no READY=1 (rc={proc.returncode}): {d.stderr()}")
    return d


# -- clients ------------------------------------------------------------------------------------
def busctl(address: str, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    pre = [] if uid == 0 else as_user(uid)
    return subprocess.run(
        [*pre, "busctl", f"--address={address}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def busctl_json(address: str, *args: str) -> Any:
    r = busctl(address, "--json=short", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def as_user(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def spec(
    address: str,
    path: str,
    iface: str | None,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    interactive: bool = False,
    dirs: Sequence[str] = (),
) -> dict[str, Any]:
    """A call for :func:`run_client`; ``dirs`` are opened by the client and sent as fds."""
    return {
        "address": address,
        "path": path,
        "iface": iface,
        "member": member,
        "signature": signature,
        "body": list(body),
        "interactive": interactive,
        "dirs": list(dirs),
    }


@functools.cache
def world_readable_client() -> tuple[str, str]:
    """The client script and dbus-fast copied where any uid can read them.

    The checkout or the venv may sit below a 0700 directory (/root): nobody could not even
    import the client from there. Returns (script, PYTHONPATH).
    """
    import dbus_fast

    d = Path(tempfile.mkdtemp(prefix="apm-client-", dir="/tmp"))
    shutil.copytree(Path(dbus_fast.__file__).parent, d / "dbus_fast")
    shutil.copy(CLIENT, d / CLIENT.name)
    for path in (d, *d.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    atexit.register(shutil.rmtree, d, True)
    return str(d / CLIENT.name), str(d)


def run_client(uid: int, specs: Any) -> Any:
    """Calls from another process as ``uid`` (Debian python + dbus-fast): one spec or a list."""
    script, site = world_readable_client()
    env = dict(os.environ, PYTHONPATH=site)
    pre = [] if uid == 0 else as_user(uid)
    r = subprocess.run(
        [*pre, SYSTEM_PYTHON, script, json.dumps(specs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def call_as(
    uid: int,
    address: str,
    path: str,
    iface: str | None,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    interactive: bool = False,
) -> dict[str, Any]:
    """One method call from another process as ``uid``."""
    out: dict[str, Any] = run_client(
        uid, spec(address, path, iface, member, signature, body, interactive)
    )
    return out


def v(sig: str, value: Any) -> dict[str, Any]:
    """A variant for :func:`call_as` bodies."""
    return {"$v": [sig, value]}


class Client:
    """An in-process dbus-fast client (root) for quick calls and signal capture."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []

    @classmethod
    async def connect(cls, address: str) -> Client:
        return cls(await MessageBus(bus_address=address, negotiate_unix_fd=True).connect())

    async def call(
        self,
        path: str,
        iface: str,
        member: str,
        sig: str = "",
        body: Sequence[Any] = (),
        fds: Sequence[int] = (),
    ) -> Message:
        """``h`` values in ``body`` index ``fds``."""
        return await self.bus.call(
            Message(
                destination=NAME,
                path=path,
                interface=iface,
                member=member,
                signature=sig,
                body=list(body),
                unix_fds=list(fds),
            )
        )

    async def ok(self, *args: Any) -> list[Any]:
        """:meth:`call`, which must succeed: the reply's body."""
        reply = await self.call(*args)
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return list(reply.body)

    async def error(self, *args: Any) -> tuple[str, str]:
        """:meth:`call`, which must fail: (error name, text)."""
        reply = await self.call(*args)
        assert reply.message_type == MessageType.ERROR, reply.body
        return str(reply.error_name), str(reply.body[0] if reply.body else "")

    async def props(self, path: str, iface: str) -> dict[str, Any]:
        (values,) = await self.ok(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [iface])
        return {k: unvariant(x.value) for k, x in values.items()}

    async def snapshot(self) -> dict[str, Any]:
        """Everything the daemon exports: manager props + GetManagedObjects, less the
        Manager's Statistics (counters of what happened, a refusal included: not state)."""
        (objs,) = await self.ok(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        manager = await self.props(ROOT, MANAGER)
        manager.pop("Statistics", None)
        for ifs in objs.values():
            ifs.get(MANAGER, {}).pop("Statistics", None)
        return {
            "manager": manager,
            "objects": {
                p: {i: {k: unvariant(x.value) for k, x in ps.items()} for i, ps in ifs.items()}
                for p, ifs in objs.items()
            },
        }

    async def listen(
        self, rule: str = f"type='signal',sender='{NAME}'", settle: bool = True
    ) -> None:
        """Capture every signal from the daemon (or that ``rule`` matches) from now on;
        ``settle=False`` for a daemon that is not running yet."""
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )

        def on(msg: Message) -> bool:
            if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
                self.signals.append(msg)
            return False

        self.bus.add_message_handler(on)
        if settle:  # a round trip through the daemon: every signal it sent before is here
            await self.ok(ROOT, "org.freedesktop.DBus.Peer", "Ping")

    async def settle(self) -> None:
        await self.ok(ROOT, "org.freedesktop.DBus.Peer", "Ping")

    def close(self) -> None:
        self.bus.disconnect()


def unvariant(value: Any) -> Any:
    if isinstance(value, Variant):
        return unvariant(value.value)
    if isinstance(value, list | tuple):
        return [unvariant(x) for x in value]
    if isinstance(value, dict):
        return {k: unvariant(x) for k, x in value.items()}
    return value


def arun(coro: Any) -> Any:
    return asyncio.run(coro)


def dump_tree(tree: Any, root: Path, path: str = "") -> None:
    """Copy an emulated sysfs (a SysfsTree) to plain files, for ``--sysfs-root``."""
    target = root / path if path else root
    kind = tree.kind(path)
    if kind == "dir":
        target.mkdir(parents=True, exist_ok=True)
        for name in tree.listdir(path):
            dump_tree(tree, root, f"{path}/{name}" if path else name)
    elif kind == "link":
        target.symlink_to(tree.readlink(path))
    else:
        try:
            target.write_bytes(tree.read(path))
        except OSError:
            target.write_bytes(b"")  # write-only attribute


DaemonFactory = Callable[..., Daemon]
"""What the ``start`` fixture yields: ``start(*daemon_args, **kw) -> Daemon``."""
