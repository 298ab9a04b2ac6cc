"""Uevents on the wire: the libudev monitor encoding and the sinks that deliver it.

The emulator plays both the kernel and udevd: the model produces kernel uevents
(:class:`~apmatrixd.sim.vfs.Uevent`) and this module re-broadcasts them the way udevd does after
processing, in the ``libudev`` monitor format, so an unmodified ``pyudev.Monitor(source='udev')``
with in-kernel BPF filters (subsystem, devtype, tag) accepts them. ``source='kernel'`` monitors
cannot be fed from userspace (libudev insists the sender is the kernel), which is also why the
daemon must listen on ``source='udev'``.

Sinks never raise into the model: a failed delivery is logged, counted and dropped, as a lost
uevent would be on a real system.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from apmatrixd.sim.vfs import Uevent

log = logging.getLogger(__name__)

MAGIC = b"libudev\0"
MAGIC_COOKIE = 0xFEEDCAFE
HEADER_SIZE = 40
NETLINK_KOBJECT_UEVENT = 15
GROUP_KERNEL = 1
GROUP_UDEV = 2

_M = 0x5BD1E995
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 with seed 0: systemd's ``string_hash32``, which the BPF filters compare."""
    h = len(data)
    nblocks = len(data) // 4
    for i in range(nblocks):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * _M) & _MASK32
        k ^= k >> 24
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k
    tail = data[4 * nblocks :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    return h ^ (h >> 15)


def tag_bloom(tags: Iterable[str]) -> int:
    """The 64-bit bloom filter libudev checks for ``filter_by_tag`` (4 bits per tag)."""
    bloom = 0
    for tag in tags:
        h = murmur2(tag.encode())
        for shift in (0, 6, 12, 18):
            bloom |= 1 << ((h >> shift) & 63)
    return bloom


def encode(uevent: Uevent, tags: Iterable[str] = ()) -> bytes:
    """One udev monitor datagram for ``uevent``, as udevd multicasts it on group 2.

    Adds the keys udevd adds (``USEC_INITIALIZED``; ``TAGS``/``CURRENT_TAGS`` when tagged).
    """
    tag_list = [t for t in tags if t]
    props = uevent.properties()
    props.setdefault("USEC_INITIALIZED", str(time.monotonic_ns() // 1000))
    if tag_list:
        joined = ":" + ":".join(tag_list) + ":"
        props["TAGS"] = joined
        props["CURRENT_TAGS"] = joined
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in props.items())
    bloom = tag_bloom(tag_list)
    header = (
        struct.pack("!8sI", MAGIC, MAGIC_COOKIE)
        # header_size, properties_off, properties_len: host byte order in libudev
        + struct.pack("=III", HEADER_SIZE, HEADER_SIZE, len(body))
        + struct.pack(
            "!IIII",
            murmur2(uevent.subsystem.encode()),
            murmur2(uevent.devtype.encode()) if uevent.devtype else 0,
            bloom >> 32,
            bloom & _MASK32,
        )
    )
    return header + body


def decode(data: bytes) -> tuple[dict[str, int], dict[str, str]]:
    """Split a monitor datagram into its header fields and properties (tests, debugging).

    Raises ValueError for anything libudev itself would reject as malformed.
    """
    if len(data) < HEADER_SIZE:
        raise ValueError("short message")
    magic, cookie = struct.unpack_from("!8sI", data, 0)
    if magic != MAGIC or cookie != MAGIC_COOKIE:
        raise ValueError("not a libudev monitor message")
    size, off, length = struct.unpack_from("=III", data, 12)
    sub_hash, devtype_hash, bloom_hi, bloom_lo = struct.unpack_from("!IIII", data, 24)
    if off + length > len(data):
        raise ValueError("properties beyond the end of the message")
    props: dict[str, str] = {}
    for item in data[off : off + length].split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode().partition("=")
        if not sep:
            raise ValueError(f"property without '=': {item!r}")
        props[key] = value
    header = {
        "header_size": size,
        "properties_off": off,
        "properties_len": length,
        "subsystem_hash": sub_hash,
        "devtype_hash": devtype_hash,
        "tag_bloom": (bloom_hi << 32) | bloom_lo,
    }
    return header, props


class Sink:
    """Base for uevent sinks: ``send`` encodes, delivers, and never raises.

    ``sent`` counts datagrams delivered, ``failed`` deliveries that were dropped.
    """

    def __init__(self, tags: Iterable[str] = ()) -> None:
        self.tags = tuple(tags)
        self.sent = 0
        self.failed = 0

    def send(self, uevent: Uevent) -> None:
        """Listener for ``SysfsTree.subscribe``: must never raise into the model."""
        try:
            data = encode(uevent, self.tags)
            self._deliver(data)
        except Exception:
            self.failed += 1
            log.warning(
                "dropped uevent %s %s",
                uevent.action,
                uevent.devpath,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    def _deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the sink's socket, if any."""


class NetlinkSink(Sink):
    """Multicast on ``NETLINK_KOBJECT_UEVENT`` group 2, exactly where udevd re-broadcasts.

    Needs CAP_NET_ADMIN and reaches every udev monitor in the **current network namespace**.
    Only use it inside a private one (``unshare -n``, ``ip netns exec``): in the host namespace
    the real udisks, NetworkManager, systemd... would receive the emulator's fake events.
    """

    def __init__(self, tags: Iterable[str] = (), group: int = GROUP_UDEV) -> None:
        super().__init__(tags)
        self.group = group
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
        )
        self._sock.bind((0, 0))

    def _deliver(self, data: bytes) -> None:
        self._sock.sendto(data, (0, self.group))
        self.sent += 1

    def close(self) -> None:
        self._sock.close()


class UmockdevSink(Sink):
    """Datagrams to every ``$UMOCKDEV_DIR/event*`` socket, as ``umockdev_testbed_uevent`` does.

    Under the umockdev preload each netlink uevent socket of a monitored process is an AF_UNIX
    datagram socket bound at ``<dir>/event<fd>``. A socket nobody reads any more is stale: it is
    unlinked. Sends do not block: a monitor that does not drain its queue loses events.
    """

    def __init__(self, directory: str | os.PathLike[str], tags: Iterable[str] = ()) -> None:
        super().__init__(tags)
        self.directory = os.fspath(directory)

    def _deliver(self, data: bytes) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            for path in sorted(glob.glob(os.path.join(glob.escape(self.directory), "event[0-9]*"))):
                try:
                    sock.sendto(data, socket.MSG_DONTWAIT, path)
                    self.sent += 1
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                except OSError as err:
                    if err.errno not in (errno.EAGAIN, errno.ENOBUFS):
                        raise
                    self.failed += 1
                    log.warning("uevent queue of %s is full, dropped", path)
        finally:
            sock.close()


class CollectingSink(Sink):
    """Keeps the encoded datagrams in memory: for tests and ``apmatrixd-sim demo``."""

    def __init__(self, tags: Iterable[str] = ()) -> None:
        super().__init__(tags)
        self.messages: list[bytes] = []

    def _deliver(self, data: bytes) -> None:
        self.messages.append(data)
        self.sent += 1


class _Subscribable(Protocol):
    def subscribe(self, listener: Callable[[Uevent], None]) -> Callable[[], None]: ...


def attach(tree: _Subscribable, sink: Sink) -> Callable[[], None]:
    """Deliver every uevent of ``tree`` to ``sink`` from now on; returns the detach function."""
    return tree.subscribe(sink.send)


def sink_from_spec(spec: str, tags: Iterable[str] = ()) -> Sink | None:
    """``none`` | ``netlink`` | ``umockdev:DIR`` (the ``--uevents`` values) to a sink.

    Raises ValueError for an unknown spec; OSError if the sink cannot be set up.
    """
    if spec == "none":
        return None
    if spec == "netlink":
        return NetlinkSink(tags)
    kind, sep, directory = spec.partition(":")
    if kind == "umockdev" and sep and directory:
        if not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "no such directory", directory)
        return UmockdevSink(directory, tags)
    raise ValueError(f"unknown uevent sink {spec!r} (none, netlink or umockdev:DIR)")
