"""The intent journal: what a change is about to do, on disk before its first write.

One file, ``<state-dir>/journal``, holds at most one intent: the commands run one at a time,
so there is never more than one change in flight. Before the first kernel or store write of a
change its intent is written and made durable (``fdatasync``): every matrix and the host pool
it touches, each with what the kernel held before and should hold after, and the stored
records before and after. After the change is stored the intent is cleared.

At start-up (:mod:`apmatrixd.service.startup`) an intent still there names the one change
that may have been cut by a crash, and only that change is rolled back or completed; every
other difference between the kernel and the stored definitions is an admin's (drift).

The clear needs no fsync when the change wrote the store: a crash that loses the clear leaves
an intent whose stored records already equal its ``after`` (the change is recognisably
done), and the next intent overwrites it durably. A change that writes only the kernel
(start, stop) is done only if the kernel still shows ``after``, which a later admin edit can
undo, and one that writes the store first (a removal) is judged by the kernel too (its files
are put back if its mdevs are still there): the clear of both is made durable too.

Format: a header line ``APMJ1 <length> <crc32>`` (hex, 8 digits each) and that many bytes of
JSON. A torn write fails the length or the checksum and reads as no intent: it was torn
before it was durable, that is before any write of its change.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = "journal"
MAGIC = b"APMJ1"
HEADER = len(MAGIC) + 1 + 8 + 1 + 8 + 1
FORMAT = "apmatrixd-intent"
VERSION = 1

Fault = Callable[[str], None]


class JournalError(OSError):
    """The journal could not be written: nothing of the change was done."""


def _sets(value: object) -> dict[str, list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("a kernel image must be an object or null")
    out: dict[str, list[int]] = {}
    for key in ("adapters", "domains", "control_domains"):
        ids = value.get(key)
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i <= 255 for i in ids):
            raise ValueError(f"{key!r} must be a list of ids")
        out[key] = ids
    return out


@dataclass
class Intent:
    """One change as the journal keeps it; JSON-ready values only.

    ``matrices``: uuid -> {"kernel_before", "kernel_after"} (sets or null: no mdev),
    {"stored_before", "stored_after"} (a store record's JSON or null: no file).
    ``pool``: {"before", "after"} host pools as :func:`pool_json` writes them, or None.
    ``reservations``: {"before", "after"} as the store's host file, or None.
    """

    what: str
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool: dict[str, Any] | None = None
    reservations: dict[str, Any] | None = None
    boot: str = ""  # the host's boot id when it was written
    store_first: bool = False  # the store is written before the kernel (a removal)

    @property
    def writes_store(self) -> bool:
        items = [*self.matrices.values()]
        if any(i.get("stored_before") != i.get("stored_after") for i in items):
            return True
        r = self.reservations
        return r is not None and r.get("before") != r.get("after")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "what": self.what,
            "boot": self.boot,
            "store_first": self.store_first,
            "matrices": self.matrices,
            "pool": self.pool,
            "reservations": self.reservations,
        }

    @classmethod
    def from_json(cls, data: object) -> Intent:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not an apmatrixd intent")
        if data.get("version") != VERSION:
            raise ValueError(f"intent version {data.get('version')!r}, want {VERSION}")
        matrices = data.get("matrices")
        if not isinstance(matrices, dict):
            raise ValueError("'matrices' must be an object")
        for item in matrices.values():
            if not isinstance(item, dict):
                raise ValueError("a matrix item must be an object")
            _sets(item.get("kernel_before"))
            _sets(item.get("kernel_after"))
        pool, res = data.get("pool"), data.get("reservations")
        for part in (pool, res):
            if part is not None and not isinstance(part, dict):
                raise ValueError("'pool' and 'reservations' must be objects or null")
        boot = data.get("boot", "")
        first = data.get("store_first", False) is True
        return cls(str(data.get("what", "")), matrices, pool, res, str(boot), first)


def _no_fault(_step: str) -> None:
    pass


class Journal:
    """The journal file of one state directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], fault: Fault | None = None) -> None:
        self.path = Path(root) / NAME
        self.fault: Fault = fault or _no_fault
        self._fd = -1
        self._durable_clear = True

    def _open(self) -> int:
        if self._fd < 0:
            created = not self.path.exists()
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            if created:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _put(self, body: bytes, step: str) -> None:
        header = b"%s %08x %08x\n" % (MAGIC, len(body), zlib.crc32(body))
        data = header + body
        fd = self._open()
        self.fault(step)
        done = 0
        while done < len(data):
            n = os.pwrite(fd, data[done:], done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to the journal")
            done += n

    def begin(self, intent: Intent) -> None:
        """Write ``intent`` and make it durable; JournalError if that fails."""
        body = json.dumps(intent.to_json(), sort_keys=True).encode()
        try:
            self._put(body, "journal-write")
            self.fault("journal-sync")
            os.fdatasync(self._fd)
        except JournalError:
            raise
        except OSError as err:
            raise JournalError(
                err.errno, f"cannot write the intent journal {self.path}: " f"{err.strerror}"
            ) from err
        self._durable_clear = intent.store_first or not intent.writes_store

    def end(self) -> None:
        """The change is done (or undone): clear the intent (see the module docstring)."""
        try:
            self._put(b"", "journal-clear")
            if self._durable_clear:
                self.fault("journal-clear-sync")
                os.fdatasync(self._fd)
        except OSError as err:  # the intent stays: start-up finds its change done or undone
            log.error("cannot clear the intent journal %s: %s", self.path, err.strerror)

    def read(self) -> Intent | None:
        """The intent left by the last run, or None (none, cleared, or torn)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
        finally:
            os.close(fd)
        if len(raw) < HEADER:
            return None
        head = raw[:HEADER]
        try:
            magic, length, crc = head.split()
            if magic != MAGIC or head[-1:] != b"\n":
                raise ValueError("bad magic")
            n, want = int(length, 16), int(crc, 16)
        except ValueError:
            log.warning("journal %s has no valid header: ignored", self.path)
            return None
        body = raw[HEADER : HEADER + n]
        if n == 0:
            return None
        if len(body) != n or zlib.crc32(body) != want:
            log.info("journal %s holds a torn intent (never durable): ignored", self.path)
            return None
        try:
            return Intent.from_json(json.loads(body))
        except ValueError as err:
            log.warning("journal %s: unusable intent (%s): ignored", self.path, err)
            return None

    def clear_durably(self) -> None:
        """After start-up recovery: nothing may be rolled back twice."""
        self._durable_clear = True
        self.end()
