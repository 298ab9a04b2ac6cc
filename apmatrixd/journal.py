"""The intent journal: what a change is about to do, written before its first write.

One file, ``<state-dir>/journal``, holds the intent of the change in flight: the commands run
one at a time, so there is never more than one change (or one group of them, below) in
flight; before it, the committed changes whose files are not written yet (below). Before the
first kernel or store write of a change its intent is written: every matrix and the host pool
it touches, each with what the kernel held before and should hold after, and the stored
records before and after. After the change is stored the intent is cleared.

At start-up (:mod:`apmatrixd.service.startup`) an intent still there names the one change
that may have been cut by a crash, and only that change is rolled back or completed; every
other difference between the kernel and the stored definitions is an admin's (drift).

What is synced, and why no more: a daemon crash (kill -9, a bug) keeps the page cache, so
the intent it reads back is the one written, synced or not. Only a machine crash loses
unsynced writes, and it takes the mdevs and the masks with it (the next boot starts from
the boot masks, without mdevs): the kernel part of an intent then has nothing left to roll
back. So the intent is made durable (``fdatasync``) only before a change writes several
files, whose renames a machine crash could leave durable in part, with only the intent to
tell start-up to take them all back; one file's rename is atomic on its own. An intent a
machine crash leaves from an earlier change (its clear or the next intent lost) is harmless:
start-up judges an intent of an earlier boot by the store alone, and the stored records are
then its ``after`` (done), or have moved on, or are its ``before`` (nothing to write).

The clear needs no fsync when the change wrote the store: a crash that loses the clear leaves
an intent whose stored records already equal its ``after`` (the change is recognisably
done). A change that writes only the kernel (start, stop) is done only if the kernel still
shows ``after``, which a later admin edit can undo, and one that writes the store first (a
removal) is judged by the kernel too (its files are put back if its mdevs are still there):
the clear of both is made durable too.

A group of changes (commands queued behind one another, made durable together: see
:mod:`apmatrixd.service.group`) writes one record per member, appended before the member's
first kernel write (a member that fails and undoes itself is cut off again), and synced once
before the group's store writes if it writes more than one file, as for one change. The
records are read back as one change (:meth:`Intent.then`) from what the kernel and the store
held before the first member to what the last one wants: each matrix's earliest ``before``
and latest ``after``, and ``kernel_low``/``kernel_high`` (the pool: ``low``/``high``), the
intersection and union of every set the group passed through, so start-up takes for ours
anything the kernel holds within those bounds, and rolls the group back whole. A member's
record leaves out the ``stored_before`` of a matrix an earlier record of the group carries
(the earliest is the one read), and one cut off takes its part of that with it.

A change acknowledged before its files are written (one change run alone: its caller waits
on one fdatasync of the journal instead of a file's write, fsync, rename and directory
fsync) appends a commit record after its intent once its kernel writes are done, and makes
the journal durable; only then is the caller answered. Start-up completes
a committed change (its files to ``after``, whatever the kernel holds now counts as it would
for any change) instead of rolling it back. A commit that fails is cut off again before the
change is undone.

The files of committed changes are written once the worker has nothing else to do
(:meth:`Store.checkpoint`), not between two changes: a change that comes meanwhile appends
its intent after the committed ones (:attr:`Journal.owed`), and commits it the same way, so
the journal holds a chain of committed changes and at most one more, in flight. Start-up
reads the committed ones as one change (:meth:`Intent.then`: each file's earliest
``stored_before``, which is what the disk held, and latest ``stored_after``), completes its
files, and then judges the one in flight as any change cut by a crash (its ``before`` is what
the committed ones left). A change that writes files of its own (a group, a removal) or
writes no file (start, stop) writes the owed files first and starts the journal afresh.
Once they are written the journal is cleared without a sync (their files are durable: a
lost clear leaves committed intents whose files equal their ``after``, which start-up
recognises as done). So that such a stale commit record can never make start-up complete a
change over the files of a later one, every later change that writes the store makes its
own intent durable before its first file (``stale_commit``): one fdatasync, once.

Format: records, each a header line ``APMJ1 <length> <crc32>`` (hex, 8 digits each) and that
many bytes of JSON, ended by a record of length 0 (a clear is that alone). A torn record
fails the length or the checksum and ends the intent there: only a machine crash tears one
(a daemon crash leaves what was written), and then at most one file of its change can have
been renamed, atomically.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = "journal"
MAGIC = b"APMJ1"
HEADER = len(MAGIC) + 1 + 8 + 1 + 8 + 1
FORMAT = "apmatrixd-intent"
VERSION = 1
COMMIT_FORMAT = "apmatrixd-commit"
"""A commit record's ``format``; its ``of`` is the CRC-32 of every byte before it, so it
commits the records it was written after and no others (a torn journal cannot pair it with
a later intent of the same length)."""

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
    committed: bool = False  # acknowledged: only its files may lag (read back, not written)

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

    def then(self, later: Intent, what: str) -> Intent:
        """This change followed by ``later``, as one (a group; see the module docstring)."""
        out = Intent(what, copy.deepcopy(self.matrices), self.pool, self.reservations, later.boot)
        for u, item in later.matrices.items():
            have = out.matrices.get(u)
            seen: list[dict[str, list[int]]] = []
            if "kernel_before" in item:
                seen = [item["kernel_before"] or NO_MDEV, item.get("kernel_after") or NO_MDEV]
                if have is not None and "kernel_low" in have:
                    seen += [have["kernel_low"], have["kernel_high"]]
                elif have is not None and "kernel_before" in have:
                    seen += [have["kernel_before"] or NO_MDEV, have.get("kernel_after") or NO_MDEV]
            if have is None:
                out.matrices[u] = merged = dict(item)
            else:
                merged = have
                for key in ("kernel_after", "stored_after"):
                    if key in item:
                        merged[key] = item[key]
                for key in ("kernel_before", "stored_before"):
                    if key in item and key not in merged:
                        merged[key] = item[key]
                merged["stored"] = bool(merged.get("stored") or item.get("stored"))
            if seen:
                merged["kernel_low"], merged["kernel_high"] = _bounds(seen)
        if later.pool is not None:
            first = self.pool or later.pool
            pools = [later.pool["before"], later.pool["after"]]
            pools += [first["low"], first["high"]] if "low" in first else [first["before"]]
            low, high = _pool_bounds(pools)
            out.pool = {"before": first["before"], "after": later.pool["after"],
                        "low": low, "high": high}  # fmt: skip
        if later.reservations is not None:
            first = self.reservations or later.reservations
            out.reservations = {"before": first["before"], "after": later.reservations["after"]}
        return out

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


NO_MDEV: dict[str, list[int]] = {"adapters": [], "domains": [], "control_domains": []}


def _bounds(images: list[dict[str, list[int]]]) -> tuple[dict[str, list[int]], ...]:
    """The intersection and the union of kernel images (sets; an mdev's absence is empty)."""
    out: list[dict[str, list[int]]] = [{}, {}]
    for key in ("adapters", "domains", "control_domains"):
        sets = [set(i[key]) for i in images]
        out[0][key] = sorted(set.intersection(*sets))
        out[1][key] = sorted(set.union(*sets))
    return out[0], out[1]


def _pool_bounds(pools: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The intersection and the union of host pools as ``pool_json`` writes them."""
    keys = ("queues",) if all("queues" in p for p in pools) else ("adapters", "domains")
    low: dict[str, Any] = {}
    high: dict[str, Any] = {}
    for key in keys:
        if key == "queues":
            sets = [{tuple(q) for q in p["queues"]} for p in pools]
            low[key] = sorted(list(q) for q in set.intersection(*sets))
            high[key] = sorted(list(q) for q in set.union(*sets))
        else:
            ids = [set(p.get(key, [])) for p in pools]
            low[key], high[key] = sorted(set.intersection(*ids)), sorted(set.union(*ids))
    return low, high


def _no_fault(_step: str) -> None:
    pass


class Journal:
    """The journal file of one state directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], fault: Fault | None = None) -> None:
        self.path = Path(root) / NAME
        self.fault: Fault = fault or _no_fault
        self._fd = -1
        self._durable_clear = True
        self._end = 0  # where the next record of a group goes
        self._committed = False  # the intent written last has a commit record
        # A committed intent's clear was not synced: the disk may still show it committed,
        # so a later change syncs its own intent before its files (see the module docstring).
        self.stale_commit = False
        # Matrix -> where the group's record carrying its ``stored_before`` starts. A later
        # member's record leaves it out: every member of a group has the same (the store is
        # written after the last one), and :meth:`Intent.then` keeps the earliest anyway.
        self._carried: dict[str, int] = {}
        # Where the committed records whose files are not written yet end: the next intent
        # goes after them (0: none owed).
        self._chain = 0
        self.owed_changes = 0
        # The CRC-32 of the journal's bytes before ``_crc_at`` (-1: not known), kept as
        # records are written so that a commit need not read the chain back.
        self._crc_at = 0
        self._crc = 0

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

    @staticmethod
    def _record(body: bytes) -> bytes:
        return b"%s %08x %08x\n" % (MAGIC, len(body), zlib.crc32(body)) + body

    def _put(self, body: bytes, step: str, at: int = 0) -> None:
        """One record at ``at``, and the end mark after it: whatever an earlier, longer
        group left behind it is not read as a part of this intent."""
        data = self._record(body) + (self._record(b"") if body else b"")
        fd = self._open()
        self.fault(step)
        done = 0
        while done < len(data):
            n = os.pwrite(fd, data[done:], at + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to the journal")
            done += n
        self._end = at + (HEADER + len(body) if body else 0)
        base = 0 if at == 0 else self._crc if at == self._crc_at else None
        if body:
            self._crc_at = -1 if base is None else self._end
            self._crc = zlib.crc32(data[: HEADER + len(body)], base or 0)
        elif at == 0:
            self._crc_at, self._crc = 0, 0
        elif at < self._crc_at:  # an end mark over bytes it had counted
            self._crc_at = -1

    def begin(self, intent: Intent) -> None:
        """Write ``intent`` and make it durable; JournalError if that fails."""
        self.stage(intent)
        self.sync()

    def stage(self, intent: Intent) -> None:
        """Write ``intent`` without a sync (see the module docstring); JournalError if that
        fails."""
        at = self._chain
        self._write(self._body(intent), at)
        self._durable_clear = intent.store_first or not intent.writes_store
        self._committed = False
        self._carried = {u: at for u, item in intent.matrices.items() if "stored_before" in item}

    @property
    def owed(self) -> int:
        """The bytes of committed records whose files are not written yet (0: none)."""
        return self._chain

    def append(self, intent: Intent) -> int:
        """Add the intent of a group's next member, without a sync; the mark to
        :meth:`cut` it off again. JournalError if that fails."""
        mark = self._end
        carried = self._carried
        self._write(self._body(intent, carried), mark)
        self._durable_clear = self._durable_clear and not intent.writes_store
        for u, item in intent.matrices.items():
            if "stored_before" in item:
                carried.setdefault(u, mark)
        return mark

    def cut(self, mark: int) -> None:
        """Drop the records from ``mark`` on (a member that failed and undid itself)."""
        self._write(b"", mark)
        self._carried = {u: at for u, at in self._carried.items() if at < mark}

    def commit(self) -> None:
        """The change whose records were written is acknowledged: a commit record after
        them, made durable (see the module docstring). JournalError (the record cut off again)
        if that fails."""
        mark = self._end
        try:
            if self._crc_at != mark:  # the records it commits, read back (page cache)
                self._crc, self._crc_at = zlib.crc32(os.pread(self._open(), mark, 0)), mark
            body = {"format": COMMIT_FORMAT, "version": VERSION, "of": self._crc}
            self._put(json.dumps(body, sort_keys=True).encode(), "journal-commit", mark)
            self.fault("journal-commit-sync")
            os.fdatasync(self._open())
        except OSError as err:
            with contextlib.suppress(JournalError):  # else a daemon crash would complete it
                self.cut(mark)
            raise JournalError(
                err.errno, f"cannot commit to the intent journal {self.path}: {err.strerror}"
            ) from err
        self._committed, self.stale_commit = True, False
        self._chain = self._end
        self.owed_changes += 1

    def _write(self, body: bytes, at: int, step: str = "journal-write") -> None:
        try:
            self._put(body, step, at)
        except OSError as err:
            raise JournalError(
                err.errno, f"cannot write the intent journal {self.path}: {err.strerror}"
            ) from err

    @staticmethod
    def _body(intent: Intent, carried: Mapping[str, int] | None = None) -> bytes:
        """The record's JSON; without the ``stored_before`` of the matrices in ``carried``."""
        data = intent.to_json()
        if carried:
            data["matrices"] = {
                u: {k: v for k, v in item.items() if k != "stored_before"} if u in carried else item
                for u, item in intent.matrices.items()
            }
        return json.dumps(data, sort_keys=True).encode()

    def sync(self) -> None:
        """Make the intent written by :meth:`stage` durable."""
        try:
            self.fault("journal-sync")
            os.fdatasync(self._open())
            self.stale_commit = False
        except OSError as err:
            raise JournalError(
                err.errno, f"cannot sync the intent journal {self.path}: {err.strerror}"
            ) from err

    def end(self) -> bool:
        """The change is done (or undone): clear the intent (see the module docstring);
        False if that failed (logged)."""
        try:
            self._put(b"", "journal-clear", self._chain)
            if self._durable_clear:
                self.fault("journal-clear-sync")
                os.fdatasync(self._fd)
                self.stale_commit = False
            elif self._committed:
                self.stale_commit = True
            self._committed = False
        except OSError as err:  # the intent stays: start-up finds its change done or undone
            log.error("cannot clear the intent journal %s: %s", self.path, err.strerror)
            return False
        return True

    def written(self) -> bool:
        """The files of every committed record are durable now: the journal starts afresh
        (not synced: see the module docstring); False if that failed (logged)."""
        if not self._chain:
            return True
        chain, self._chain, self.owed_changes = self._chain, 0, 0
        self._durable_clear, self._committed = False, True
        if self.end():
            return True
        self._chain = chain  # still on disk: the next change goes after it
        return False

    def read(self) -> list[Intent]:
        """The changes left by the last run, oldest first: the committed ones (as one, see
        the module docstring) and then the one in flight; none if cleared or torn. A
        group's records are read as one change (:meth:`Intent.then`); a torn record ends
        them (it was not durable, nor was anything its member did)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
        finally:
            os.close(fd)
        acked: list[Intent] = []
        parts: list[Intent] = []
        at = 0
        while len(raw) - at >= HEADER:
            head = raw[at : at + HEADER]
            try:
                magic, length, crc = head.split()
                if magic != MAGIC or head[-1:] != b"\n":
                    raise ValueError("bad magic")
                n, want = int(length, 16), int(crc, 16)
            except ValueError:
                if not parts and not acked:
                    log.warning("journal %s has no valid header: ignored", self.path)
                break
            body = raw[at + HEADER : at + HEADER + n]
            if n == 0:
                break
            if len(body) != n or zlib.crc32(body) != want:
                log.info("journal %s holds a torn intent (never durable): ignored", self.path)
                break
            try:
                data = json.loads(body)
                if isinstance(data, dict) and data.get("format") == COMMIT_FORMAT:
                    if not parts or data.get("of") != zlib.crc32(raw[:at]):
                        log.warning("journal %s: a commit record of other records: ignored",
                                    self.path)  # fmt: skip
                        break
                    acked += parts
                    parts = []
                else:
                    parts.append(Intent.from_json(data))
            except ValueError as err:
                log.warning("journal %s: unusable intent (%s): ignored", self.path, err)
                return []
            at += HEADER + n
        whole = [_one(acked, "{} acknowledged changes"), _one(parts, "a group of {} changes")]
        out = [i for i in whole if i is not None]
        if acked:  # on disk: a later change must sync its own intent before its files
            out[0].committed = True
            self.stale_commit = True
        return out

    def clear_durably(self) -> None:
        """After start-up recovery: nothing may be rolled back twice."""
        self._chain, self.owed_changes = 0, 0
        self._durable_clear = True
        self.end()


def _one(parts: list[Intent], what: str) -> Intent | None:
    """Records read as one change (:meth:`Intent.then`): ``what`` names several."""
    if len(parts) < 2:
        return parts[0] if parts else None
    whole = Intent("")
    for part in parts:
        whole = whole.then(part, what.format(len(parts)))
    return whole
