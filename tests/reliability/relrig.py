"""What every reliability test needs: the three views of the truth and the rules they obey.

- the registry, as clients see it: ``GetManagedObjects`` and the Manager's properties;
- the kernel, as the emulator holds it, read through its FUSE face (``--sim-mount``) with a
  few lines of parsing of our own (not the daemon's readers): ``bus/ap/apmask``, ``aqmask``
  and every mdev's ``matrix`` and ``control_domains``;
- the state directory, read as files.

:func:`violations` lists every broken rule: no APQN has two owners, no matrix holds a
host-pool APQN, the registry equals the kernel (live matrices as mdevs with the same sets,
defined ones absent, the host pool equal to the masks) and the state directory holds exactly
the registry's non-adopted matrices. Upstream layout only (the masks).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client, Daemon, unvariant
from busrig import path_of as path_of  # the suites import it from here
from dbus_fast import Message, MessageType

from apmatrixd.journal import Journal

LONG = bool(os.environ.get("APMATRIXD_LONG"))
ERR = "org.apmatrix.Apmatrix1.Error."
OURS = frozenset(
    ERR + n
    for n in (
        "Conflict",
        "HostOwned",
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "Busy",
        "Kernel",
        "Storage",
    )
)
"""Our named errors, written out from spec §2 rather than imported from apmatrixd.bus.names: the
fuzzer's oracle must not follow the code it checks. ``Error.Failed`` is never acceptable."""
MATRIX_DIR = "devices/vfio_ap/matrix"
APQN_RE = re.compile(r"\b([0-9a-f]{2})\.([0-9a-f]{4})\b")
UUID_RE = re.compile(r"[0-9a-f-]{36}")

Sets = tuple[frozenset[int], frozenset[int], frozenset[int]]


def long_mode() -> bool:
    return bool(os.environ.get("APMATRIXD_LONG"))


@dataclass
class Sim:
    """One daemon on an emulated host, its FUSE mount and its state directory."""

    daemon: Daemon
    mnt: Path
    state: Path
    _dirs: dict[str, int] = field(default_factory=dict)
    _files: dict[str, int] = field(default_factory=dict)
    fuse_ops: int = 0
    """Reads and directory listings sent through FUSE, for a long run's figures."""

    @property
    def address(self) -> str:
        return self.daemon.address

    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    # -- the kernel, through FUSE ------------------------------------------------------------
    def read(self, rel: str) -> str:
        return (self.mnt / rel).read_text()

    def write(self, rel: str, text: str) -> None:
        with open(self.mnt / rel, "w") as f:
            f.write(text)

    def _dir(self, rel: str) -> int:
        """A directory of the mount, kept open: each FUSE lookup is a trip into the daemon."""
        fd = self._dirs.get(rel)
        if fd is None:
            fd = self._dirs[rel] = os.open(self.mnt / rel, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    def _read_at(self, rel: str, name: str) -> str:
        """The file's value now, through a descriptor kept open.

        The emulator mounts with ``direct_io`` and no caches, and calls ``show()`` afresh for
        every read at offset 0, so a ``pread(fd, 0)`` is one FUSE round trip instead of the
        five of lookup, open, read, flush and release, and as fresh. Its handle reads by path:
        an mdev removed and made again under the same UUID reads as the new one. Any error
        (the file is gone) drops the descriptor and opens the path anew, whose error stands.
        """
        key = f"{rel}/{name}"
        self.fuse_ops += 1
        fd = self._files.get(key)
        if fd is not None:
            try:
                return os.pread(fd, 65536, 0).decode()
            except OSError:
                self._drop(key)
        fd = os.open(name, os.O_RDONLY, dir_fd=self._dir(rel))
        try:
            text = os.pread(fd, 65536, 0).decode()
        except BaseException:
            os.close(fd)
            raise
        self._files[key] = fd
        return text

    def _drop(self, key: str) -> None:
        fd = self._files.pop(key, None)
        if fd is not None:
            os.close(fd)

    def drain_notify(self) -> None:
        """Read the daemon's queued sd_notify datagrams, as systemd would. The fixtures read
        none during a test; once the queue is full (10 datagrams on Linux: a long run changes
        the status more often) the daemon's STOPPING=1 waits its 5 s at SIGTERM."""
        self.daemon.wait_for("\0", 0.05)  # a line no datagram holds: reads all that is there

    def close(self) -> None:
        """Close every kept descriptor (before the daemon unmounts at SIGTERM)."""
        for key in list(self._files):
            self._drop(key)
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def kernel(self) -> dict[str, Any]:
        """``{"pool": (adapters, domains), "mdevs": {uuid: (adapters, domains, control)}}``."""
        pool = (mask(self._read_at("bus/ap", "apmask")), mask(self._read_at("bus/ap", "aqmask")))
        mdevs: dict[str, Sets] = {}
        names = [n for n in os.listdir(self._dir(MATRIX_DIR)) if UUID_RE.fullmatch(n)]
        self.fuse_ops += 1
        for key in [k for k in self._files if k.startswith(MATRIX_DIR + "/")]:
            if key[len(MATRIX_DIR) + 1 :].split("/", 1)[0] not in names:
                self._drop(key)  # an mdev gone: no descriptor kept for it
        for name in names:
            try:
                a, d = matrix_file(self._read_at(MATRIX_DIR, f"{name}/matrix"))
                c = frozenset(
                    int(x, 16) for x in self._read_at(MATRIX_DIR, f"{name}/control_domains").split()
                )
            except FileNotFoundError:  # removed between listdir and read
                continue
            mdevs[name] = (a, d, c)
        return {"pool": pool, "mdevs": mdevs}

    # -- the state directory -----------------------------------------------------------------
    def stored(self) -> dict[str, Any]:
        """Every file of the state directory as start-up would load it: name -> parsed JSON
        (or the raw text), with the files of an acknowledged change whose files are still
        being written (a committed intent, journal.py) as they will be."""
        left = Journal(self.state).read()  # first: its files may be written meanwhile
        out = self._state_files()
        if left and left[0].committed:
            for u, item in left[0].matrices.items():
                if item.get("stored"):
                    out.pop(f"matrices/{u}.json", None)
                    if item["stored_after"] is not None:
                        out[f"matrices/{u}.json"] = item["stored_after"]
            if left[0].reservations is not None:
                out["host.json"] = left[0].reservations["after"]
            left = left[1:]  # as start-up leaves it
        out["journal"] = repr(left[0] if left else None)
        return dict(sorted(out.items()))

    def _state_files(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        top = str(self.state)
        for where, _dirs, files in os.walk(top):
            for name in files:
                if name == "journal" or (name.startswith(".") and ".tmp-" in name):
                    continue  # the journal as above; a write in flight, as load() skips it
                path = os.path.join(where, name)
                try:
                    with open(path, "rb") as f:
                        text = f.read().decode(errors="replace")
                except FileNotFoundError:  # removed since the listing: the intent has it
                    continue
                rel = os.path.relpath(path, top)
                try:
                    out[rel] = json.loads(text)
                except ValueError:
                    out[rel] = text
        return out

    def state_bytes(self) -> dict[str, bytes]:
        """The state directory as start-up would load it (:meth:`stored`), as bytes; the
        intent journal only as "is an intent pending?" (each change writes and clears it, a
        refused one too)."""
        return {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)).encode()
                for k, v in self.stored().items()}  # fmt: skip


SimFactory = Callable[..., Sim]


def mask(text: str) -> frozenset[int]:
    """``0x`` + 64 hex digits, id 0 the leftmost bit."""
    bits = int(text.strip(), 16)
    return frozenset(i for i in range(256) if bits >> (255 - i) & 1)


def matrix_file(text: str) -> tuple[frozenset[int], frozenset[int]]:
    a: set[int] = set()
    d: set[int] = set()
    for line in text.split():
        left, _, right = line.partition(".")
        if left:
            a.add(int(left, 16))
        if right:
            d.add(int(right, 16))
    return frozenset(a), frozenset(d)


# -- the registry, over D-Bus ---------------------------------------------------------------------
async def registry(c: Client) -> dict[str, Any]:
    """``{"pool": (adapters, domains), "matrices": {uuid: props}}`` as clients see it."""
    objs_reply, mgr_reply = await asyncio.gather(
        c.call(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
        c.call(ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER]),
    )  # sent together: the daemon answers in order, the two replies cost one round trip
    return _registry(objs_reply, mgr_reply)


def _registry(objs_reply: Message, mgr_reply: Message) -> dict[str, Any]:
    for reply in (objs_reply, mgr_reply):
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    (objs,) = objs_reply.body
    mgr = {k: unvariant(v.value) for k, v in mgr_reply.body[0].items()}
    matrices = {}
    for ifaces in objs.values():
        if MATRIX in ifaces:
            props = {k: unvariant(v.value) for k, v in ifaces[MATRIX].items()}
            matrices[props["Uuid"]] = props
    return {
        "pool": (frozenset(mgr["HostAdapters"]), frozenset(mgr["HostDomains"])),
        "matrices": matrices,
    }


async def ping(c: Client, timeout: float = 10) -> float:
    """Peer.Ping the daemon; the round trip in seconds. Not answered within ``timeout`` is a
    stall (TimeoutError), not a slow figure."""
    t0 = time.monotonic()
    msg = Message(
        destination="org.apmatrix.Apmatrix1",
        path=ROOT,
        interface="org.freedesktop.DBus.Peer",
        member="Ping",
    )
    reply = await asyncio.wait_for(c.bus.call(msg), timeout)
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return time.monotonic() - t0


def sets_of(props: dict[str, Any]) -> Sets:
    return (
        frozenset(props["Adapters"]),
        frozenset(props["Domains"]),
        frozenset(props["ControlDomains"]),
    )


def violations(reg: dict[str, Any], kern: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """Every broken rule across the registry, the kernel and the state directory."""
    out: list[str] = []
    # the registry: one owner per APQN, none of the host pool, Apqns = adapters x domains
    pa, pd = reg["pool"]
    owner: dict[tuple[int, int], str] = {}
    for u, p in reg["matrices"].items():
        a, d, _c = sets_of(p)
        apqns = {(x, y) for x, y in p["Apqns"]}
        if apqns != {(x, y) for x in a for y in d}:
            out.append(f"registry: {u} Apqns is not Adapters x Domains")
        for q in apqns:
            if q in owner:
                out.append(f"registry: {q[0]:02x}.{q[1]:04x} owned by {owner[q]} and {u}")
            owner[q] = u
            if q[0] in pa and q[1] in pd:
                out.append(f"registry: {q[0]:02x}.{q[1]:04x} of {u} is in the host pool")
    # the kernel: the same rules, independently
    ka, kd = kern["pool"]
    kowner: dict[tuple[int, int], str] = {}
    for u, (a, d, _c) in kern["mdevs"].items():
        for q in ((x, y) for x in a for y in d):
            if q in kowner:
                out.append(f"kernel: {q[0]:02x}.{q[1]:04x} in {kowner[q]} and {u}")
            kowner[q] = u
            if q[0] in ka and q[1] in kd:
                out.append(f"kernel: {q[0]:02x}.{q[1]:04x} of {u} is in the host pool")
    # registry == kernel
    if (pa, pd) != (ka, kd):
        out.append(
            f"host pool: registry {sorted(pa)}x{sorted(pd)} vs masks {sorted(ka)}x{sorted(kd)}"
        )
    live = {u for u, p in reg["matrices"].items() if p["State"] != "defined"}
    if live != set(kern["mdevs"]):
        out.append(f"live: registry {sorted(live)} vs kernel {sorted(kern['mdevs'])}")
    for u in live & set(kern["mdevs"]):
        if sets_of(reg["matrices"][u]) != kern["mdevs"][u]:
            out.append(f"{u}: registry {sets_of(reg['matrices'][u])} vs kernel {kern['mdevs'][u]}")
    # the state directory holds exactly the registry's own (non-adopted) matrices
    files = {k: v for k, v in stored.items() if k.startswith("matrices/")}
    want = {u for u, p in reg["matrices"].items() if not p["Adopted"]}
    have = {k[len("matrices/") : -len(".json")] for k in files}
    if want != have:
        out.append(f"store: files {sorted(have)} vs registry {sorted(want)}")
    for u in want & have:
        f, p = files[f"matrices/{u}.json"], reg["matrices"][u]
        if not isinstance(f, dict):
            out.append(f"store: matrices/{u}.json is not JSON")
            continue
        disk = (frozenset(f["adapters"]), frozenset(f["domains"]), frozenset(f["control_domains"]))
        if disk != sets_of(p) or f["name"] != p["Name"] or f["autostart"] != p["Autostart"]:
            out.append(f"store: {u} on disk {f} vs registry {p}")
    return out


async def check_all(
    c: Client, sim: Sim, spent: defaultdict[str, float] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """Ping, then every rule (an empty list: all hold); and the registry as read.

    The ping and the two registry reads are sent at once (one round trip, answered in order);
    no answer within 10 s is a stall, as in :func:`ping`. ``spent`` adds up the
    seconds of each part (bus, kernel, store, rules) for a long run's figures.
    """
    t0 = time.monotonic()
    pong, objs_reply, mgr_reply = await asyncio.wait_for(  # a stall guard, not a speed figure
        asyncio.gather(
            c.call(ROOT, "org.freedesktop.DBus.Peer", "Ping"),
            c.call(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
            c.call(ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER]),
        ),
        10,
    )
    assert pong.message_type == MessageType.METHOD_RETURN, (pong.error_name, pong.body)
    reg = _registry(objs_reply, mgr_reply)
    t2 = time.monotonic()
    kern = sim.kernel()
    t3 = time.monotonic()
    stored = sim.stored()
    t4 = time.monotonic()
    problems = violations(reg, kern, stored)
    if spent is not None:
        spent["check: ping + registry (bus)"] += t2 - t0
        spent["check: kernel (FUSE)"] += t3 - t2
        spent["check: state directory"] += t4 - t3
        spent["check: rules"] += time.monotonic() - t4
    return problems, reg


def apqns_named(text: str) -> set[tuple[int, int]]:
    """The APQNs (``05.0004``) an error text names."""
    return {(int(a, 16), int(d, 16)) for a, d in APQN_RE.findall(text)}


class Raw:
    """SASL EXTERNAL + Hello by hand, then whatever we send; reads only if asked to."""

    def __init__(self, address: str, rcvbuf: int = 0) -> None:
        path = address.split("unix:path=", 1)[1].split(",", 1)[0]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(path)
        uid = str(os.getuid()).encode().hex().encode()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += self.sock.recv(256)
        assert reply.startswith(b"OK"), reply
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        self.send(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="Hello",
            )
        )

    def send(self, msg: Message) -> bool:
        self.serial += 1
        msg.serial = self.serial
        try:
            self.sock.sendall(bytes(msg._marshall(False)))
        except OSError:  # dbus-daemon threw us out: its limits work
            return False
        return True

    def close(self) -> None:
        self.sock.close()
