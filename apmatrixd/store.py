"""The state directory: matrix definitions and host reservations that survive a crash or reboot.

Layout (``--state-dir``, default ``$STATE_DIRECTORY`` or ``/var/lib/apmatrixd``)::

    <state-dir>/host.json                 the host reservations (what Reserve/Release asked for)
    <state-dir>/boot.json                 the boot in which they were last applied
    <state-dir>/journal                   the intent of a change in flight (journal.py)
    <state-dir>/matrices/<uuid>.json      one file per matrix definition

Both are JSON objects, indented, keys sorted, ids as decimal integers. A matrix file::

    {
      "adapters": [5, 6],
      "autostart": true,
      "control_domains": [4],
      "control_usage_domains": true,
      "domains": [4],
      "format": "apmatrixd-matrix",
      "name": "guest1",
      "uuid": "11111111-1111-4111-8111-111111111111",
      "version": 1
    }

``control_usage_domains``: every usage domain is also a control domain (CreateMatrix's option
of that name). The host file::

    {
      "format": "apmatrixd-host",
      "released_adapters": [], "released_domains": [],
      "reserved_adapters": [5, 6], "reserved_domains": [4, 71],
      "version": 1
    }

``reserved_*`` are the ids Reserve took from the host pool (and no Release gave back since),
``released_*`` those Release gave back; at start-up the daemon applies both to the boot masks.

Every write is crash-safe: a temp file in the same directory, write, fsync, rename over the
target, fsync of the directory. A removal is unlink + fsync of the directory. A file that
cannot be used (truncated, not JSON, wrong fields, a ``version`` from the future) is renamed
to ``<name>.broken-<UTC timestamp>`` with one log line naming it and why; the rest loads.
``version`` is 1; a newer daemon that changes the format bumps it and upgrades older files
on load. Leftover temp files (``.<name>.tmp-<pid>``) of a crashed write are deleted on load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from apmatrixd.core.apqn import MAX_ID
from apmatrixd.core.errors import ApmatrixError
from apmatrixd.core.matrix import normalize_uuid
from apmatrixd.journal import Journal

log = logging.getLogger(__name__)

VERSION = 1
MATRIX_FORMAT = "apmatrixd-matrix"
HOST_FORMAT = "apmatrixd-host"
MATRICES = "matrices"
HOST_FILE = "host.json"
BOOT_FILE = "boot.json"
BOOT_FORMAT = "apmatrixd-boot"
SUFFIX = ".json"
KILL_ENV = "APMATRIXD_TEST_KILL_AT"
"""Test hook: SIGKILL the daemon itself at the Nth store step (write, fsync, rename, ...)."""
CHAIN_BYTES = 256 << 10
CHAIN_CHANGES = 64
"""The most committed changes (and journal bytes) whose files wait: then a change writes them
first. Start-up reads them all."""

Fault = Callable[[str], None]
"""Called before every step of a store write with the step's name; may not return (tests)."""


class StoreError(ApmatrixError):
    """The state directory could not be written: the change was undone (D-Bus ``Storage``)."""

    name = "Storage"
    clean = True  # every file written before the failure was put back (write_group)


class Damaged(ValueError):
    """A state file that cannot be used; the text says why."""


def _ids(value: object, what: str) -> frozenset[int]:
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i <= MAX_ID for i in value):
        raise Damaged(f"{what!r} must be a list of ids 0..{MAX_ID}")
    return frozenset(value)


def _sorted(ids: Iterable[int]) -> list[int]:
    return sorted(ids)


@dataclass(frozen=True)
class StoredMatrix:
    """One matrix definition as kept on disk."""

    uuid: str
    name: str = ""
    adapters: frozenset[int] = frozenset()
    domains: frozenset[int] = frozenset()
    control_domains: frozenset[int] = frozenset()
    autostart: bool = False
    control_usage_domains: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MATRIX_FORMAT,
            "version": VERSION,
            "uuid": self.uuid,
            "name": self.name,
            "adapters": _sorted(self.adapters),
            "domains": _sorted(self.domains),
            "control_domains": _sorted(self.control_domains),
            "autostart": self.autostart,
            "control_usage_domains": self.control_usage_domains,
        }

    @classmethod
    def from_json(cls, data: object) -> StoredMatrix:
        obj = _check_header(data, MATRIX_FORMAT)
        try:
            uuid = normalize_uuid(obj.get("uuid"))  # type: ignore[arg-type]
        except ApmatrixError as err:
            raise Damaged(str(err)) from None
        name = obj.get("name", "")
        if not isinstance(name, str) or len(name) > 255 or "\n" in name:
            raise Damaged("'name' must be one line of at most 255 characters")
        flags = {
            k: obj.get(k, d) for k, d in (("autostart", False), ("control_usage_domains", True))
        }
        for k, val in flags.items():
            if not isinstance(val, bool):
                raise Damaged(f"{k!r} must be true or false")
        return cls(
            uuid=uuid,
            name=name,
            adapters=_ids(obj.get("adapters"), "adapters"),
            domains=_ids(obj.get("domains"), "domains"),
            control_domains=_ids(obj.get("control_domains"), "control_domains"),
            autostart=flags["autostart"],
            control_usage_domains=flags["control_usage_domains"],
        )


@dataclass(frozen=True)
class Reservations:
    """What Reserve and Release asked for, relative to the host's boot masks."""

    reserved_adapters: frozenset[int] = frozenset()
    reserved_domains: frozenset[int] = frozenset()
    released_adapters: frozenset[int] = frozenset()
    released_domains: frozenset[int] = frozenset()

    def reserve(self, adapters: Iterable[int], domains: Iterable[int]) -> Reservations:
        a, d = frozenset(adapters), frozenset(domains)
        return Reservations(
            self.reserved_adapters | a,
            self.reserved_domains | d,
            self.released_adapters - a,
            self.released_domains - d,
        )

    def release(self, adapters: Iterable[int], domains: Iterable[int]) -> Reservations:
        a, d = frozenset(adapters), frozenset(domains)
        return Reservations(
            self.reserved_adapters - a,
            self.reserved_domains - d,
            self.released_adapters | a,
            self.released_domains | d,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HOST_FORMAT,
            "version": VERSION,
            "reserved_adapters": _sorted(self.reserved_adapters),
            "reserved_domains": _sorted(self.reserved_domains),
            "released_adapters": _sorted(self.released_adapters),
            "released_domains": _sorted(self.released_domains),
        }

    @classmethod
    def from_json(cls, data: object) -> Reservations:
        obj = _check_header(data, HOST_FORMAT)
        keys = ("reserved_adapters", "reserved_domains", "released_adapters", "released_domains")
        sets = [_ids(obj.get(k, []), k) for k in keys]
        return cls(*sets)


def _check_header(data: object, fmt: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Damaged("not a JSON object")
    if data.get("format") != fmt:
        raise Damaged(f"'format' is {data.get('format')!r}, want {fmt!r}")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise Damaged(f"'version' is {version!r}, want a positive integer")
    if version > VERSION:
        raise Damaged(f"version {version} is from a newer apmatrixd (this one reads {VERSION})")
    return data


class _Nested(Exception):
    pass


_CONSTANTS = {True: "true", False: "false", None: "null"}


def _item(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is bool or value is None:
        return _CONSTANTS[value]
    if kind is float:
        return json.dumps(value)
    raise _Nested


def encode(data: dict[str, Any]) -> bytes:
    """``json.dumps(data, indent=2, sort_keys=True)`` and a newline, byte for byte.

    The files are flat (scalars and lists of them): written line by line here, each value by
    json's C encoder; json's own indenting encoder is pure Python, and was most of the CPU of
    a store write (a matrix of 100 adapters is 100 lines). Anything nested goes to json."""
    try:
        lines = []
        for key in sorted(data):
            if type(key) is not str:
                raise _Nested  # json's own rules for other keys
            value = data[key]
            if type(value) is not list:
                text = _item(value)
            elif value:
                text = "[\n    " + ",\n    ".join(map(_item, value)) + "\n  ]"
            else:
                text = "[]"
            lines.append(f"  {_item(key)}: {text}")
    except (_Nested, TypeError):
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return ("{\n" + ",\n".join(lines) + "\n}\n" if lines else "{}\n").encode()


# -- crash-safe file operations -------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_fault(_step: str) -> None:
    pass


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def replace_at(
    dirfd: int,
    name: str,
    data: bytes,
    fault: Fault = _no_fault,
    sync_dir: bool = True,
    journaled: bool = False,
) -> None:
    """Replace ``name`` in the directory ``dirfd`` with ``data`` so that a crash leaves
    either the old or the new file: a temp file, write, fsync, rename over it, fsync of the
    directory. Relative to the directory's descriptor: no path is looked up again.

    ``sync_dir=False``: the rename is made durable by the caller's one fsync of the directory
    (a group of writes, :meth:`Store.write_group`). ``journaled``: the file's content is in
    a committed intent (journal.py) until the caller clears it, so the rename may come
    before the fsync: one commit of the file system's log makes both durable (the fsync of
    the directory then finds nothing left to do), and a machine crash between them leaves a
    file that start-up rewrites from the intent (:meth:`Store.load` ``rewritten``)."""
    tmp = f".{name}.tmp-{os.getpid()}"
    fault("open")
    fd = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=dirfd)
    try:
        try:
            view = memoryview(data)
            half = len(view) // 2  # a step in the middle: a crash here leaves half a temp file
            fault("write")
            done = 0
            while done < half:  # every write's count is checked: a short one goes on
                done += os.write(fd, view[done:half])
            fault("write-more")
            while done < len(view):
                done += os.write(fd, view[done:])
            if journaled:
                fault("rename")
                os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            fault("fsync")
            os.fsync(fd)
        finally:
            os.close(fd)
        if not journaled:
            fault("rename")
            os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
    if sync_dir:
        fault("fsync-dir")
        os.fsync(dirfd)


def unlink_at(dirfd: int, name: str, fault: Fault = _no_fault, sync_dir: bool = True) -> bool:
    """Remove ``name`` from the directory ``dirfd`` (False if it was not there) and make
    that durable (``sync_dir``)."""
    fault("unlink")
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    if sync_dir:
        fault("fsync-dir")
        os.fsync(dirfd)
    return True


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def kill_fault_from_env() -> Fault | None:
    """The test hook of :data:`KILL_ENV`: a fault that SIGKILLs this process at step N."""
    text = os.environ.get(KILL_ENV, "")
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{KILL_ENV}={text!r}: want a step number >= 1")
    left = int(text)
    log.warning("%s=%d: this daemon will kill itself at store step %d", KILL_ENV, left, left)

    def fault(step: str) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            os.kill(os.getpid(), 9)

    return fault


# -- the store ------------------------------------------------------------------------------------
@dataclass
class Contents:
    """Everything the state directory held at load."""

    matrices: dict[str, StoredMatrix] = field(default_factory=dict)
    reservations: Reservations = field(default_factory=Reservations)
    set_aside: list[str] = field(default_factory=list)
    boot: str = ""  # the boot in which the reservations were last applied ('' if none)
    left_out: list[str] = field(default_factory=list)  # damaged, to be rewritten (load())


class Store:
    """One state directory. Not thread-safe: the service calls it from its one thread.

    The state directory and its ``matrices`` are written through descriptors kept open
    (a stat of their paths per write, no mkdir nor open); a directory removed, or moved
    aside and replaced, under the daemon is found at the next write, as a path would be."""

    def __init__(self, root: str | os.PathLike[str], fault: Fault | None = None) -> None:
        self.root = Path(root)
        self.fault: Fault = fault or _no_fault
        self.journal = Journal(self.root, fault=self.fault)
        self._root_fd = -1
        self._matrices_fd = -1
        self._closer: weakref.finalize | None = None
        # The files of acknowledged changes not written yet (journal.py): uuid -> (what
        # the disk holds, what the last of them wants), the same for the reservations.
        self.owed: dict[str, tuple[StoredMatrix | None, StoredMatrix | None]] = {}
        self.owed_reservations: tuple[Reservations, Reservations] | None = None
        self._failed = False  # the last checkpoint failed: the next change tries it first

    @property
    def matrices_dir(self) -> Path:
        return self.root / MATRICES

    def matrix_path(self, uuid: str) -> Path:
        return self.matrices_dir / f"{uuid}{SUFFIX}"

    @property
    def host_path(self) -> Path:
        return self.root / HOST_FILE

    @property
    def boot_path(self) -> Path:
        return self.root / BOOT_FILE

    def _prepare(self) -> None:
        for d in (self.root, self.matrices_dir):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue
            fsync_dir(d.parent)

    def _dirs(self) -> tuple[int, int]:
        """The descriptors of the state directory and of ``matrices``, opened (and the
        directories made) if not yet, or again if either was removed meanwhile."""
        fds = (self._root_fd, self._matrices_fd)
        if fds[0] >= 0 and self._still(fds):
            return fds
        self.close_dirs()
        self._prepare()
        root = os.open(self.root, _DIR_FLAGS)
        try:
            matrices = os.open(MATRICES, _DIR_FLAGS, dir_fd=root)
        except BaseException:
            os.close(root)
            raise
        self._root_fd, self._matrices_fd = root, matrices
        # Closed with the Store too: a process that makes many (tests, tools) keeps none.
        self._closer = weakref.finalize(self, _close_fds, root, matrices)
        return root, matrices

    def _still(self, fds: tuple[int, int]) -> bool:
        """The kept descriptors are the directories the paths name now: one moved aside and
        replaced (a backup restored) or removed is opened anew, as a path write would find."""
        try:
            for path, fd in ((self.root, fds[0]), (self.matrices_dir, fds[1])):
                now, kept = os.stat(path), os.fstat(fd)
                if (now.st_dev, now.st_ino) != (kept.st_dev, kept.st_ino) or not kept.st_nlink:
                    return False
        except OSError:
            return False
        return True

    def close_dirs(self) -> None:
        """Let go of the kept directory descriptors (they are opened again when needed)."""
        if self._closer is not None:
            self._closer()
            self._closer = None
        self._root_fd = self._matrices_fd = -1

    def _put_matrix(
        self, uuid: str, rec: StoredMatrix | None, sync: bool, journaled: bool = False
    ) -> None:
        """One matrix file written (None: removed), crash-safe; durable if ``sync``."""
        fd = self._dirs()[1]
        if rec is None:
            unlink_at(fd, f"{uuid}{SUFFIX}", self.fault, sync)
        else:
            data = encode(rec.to_json())
            replace_at(fd, f"{uuid}{SUFFIX}", data, self.fault, sync, journaled)

    def _put_root(self, name: str, data: bytes, sync: bool = True, journaled: bool = False) -> None:
        replace_at(self._dirs()[0], name, data, self.fault, sync, journaled)

    # -- loading ----------------------------------------------------------------------------
    def load(self, rewritten: frozenset[str] = frozenset()) -> Contents:
        """Read every definition; damaged files are set aside and logged, never fatal.

        ``rewritten``: the names (``host.json``, ``<uuid>.json``) of files a committed
        intent will write again (journal.py): one of them found damaged is a write a
        machine crash cut after its rename, so it is left out, not set aside.
        Raises OSError only if the directory itself cannot be created or listed.
        """
        self._prepare()
        out = Contents()
        for d in (self.root, self.matrices_dir):
            for name in sorted(os.listdir(d)):
                if name.startswith(".") and ".tmp-" in name:
                    log.info("removing %s, left by an interrupted write", d / name)
                    with contextlib.suppress(OSError):
                        os.unlink(d / name)
        if self.host_path.exists():
            try:
                out.reservations = Reservations.from_json(self._read_json(self.host_path))
            except Damaged as why:
                self._unusable(out, self.host_path, str(why), rewritten)
        if self.boot_path.exists():
            try:
                data = _check_header(self._read_json(self.boot_path), BOOT_FORMAT)
                if not isinstance(data.get("boot"), str):
                    raise Damaged("'boot' must be a string")
                out.boot = data["boot"]
            except Damaged as why:
                out.set_aside.append(self._set_aside(self.boot_path, str(why)))
        for name in sorted(os.listdir(self.matrices_dir)):
            path = self.matrices_dir / name
            if name.startswith(".") or ".broken-" in name or not path.is_file():
                continue
            try:
                if not name.endswith(SUFFIX):
                    raise Damaged(f"not named <uuid>{SUFFIX}")
                m = StoredMatrix.from_json(self._read_json(path))
                if name != f"{m.uuid}{SUFFIX}":
                    raise Damaged(f"holds matrix {m.uuid}, but is named {name}")
            except Damaged as why:
                self._unusable(out, path, str(why), rewritten)
                continue
            out.matrices[m.uuid] = m
        return out

    def _unusable(self, out: Contents, path: Path, why: str, rewritten: frozenset[str]) -> None:
        """A damaged file: set aside, or left out if the journal writes it again (load())."""
        if path.name in rewritten:
            log.info("%s: %s; written again from the journal", path, why)
            out.left_out.append(path.name)
        else:
            out.set_aside.append(self._set_aside(path, why))

    @staticmethod
    def _read_json(path: Path) -> object:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise Damaged(f"unreadable: {err.strerror}") from None
        if not raw.strip():
            raise Damaged("empty (truncated)")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise Damaged("not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise Damaged(f"not valid JSON (truncated?): {err}") from None

    def _set_aside(self, path: Path, why: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.broken-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.broken-{stamp}-{n}")
        try:
            os.rename(path, target)
            fsync_dir(path.parent)
        except OSError as err:
            log.error(
                "state file %s is damaged (%s) and could not be set aside: %s", path, why, err
            )
            return str(path)
        log.error("state file %s is damaged (%s): set aside as %s", path, why, target.name)
        return str(target)

    # -- writing ----------------------------------------------------------------------------
    def _guard(self, what: str, op: Callable[[], object]) -> None:
        try:
            op()
        except OSError as err:
            text = err.strerror or errno.errorcode.get(err.errno or 0, str(err))
            raise StoreError(f"cannot store {what} in {self.root}: {text}") from err

    def owe(
        self,
        matrices: Mapping[str, tuple[StoredMatrix | None, StoredMatrix | None]],
        reservations: tuple[Reservations, Reservations] | None,
    ) -> None:
        """A committed change's files, to be written by :meth:`checkpoint` (journal.py)."""
        for uuid, (before, after) in matrices.items():
            first = self.owed.get(uuid)
            self.owed[uuid] = (before if first is None else first[0], after)
        if reservations is not None:
            first_r = self.owed_reservations
            self.owed_reservations = (reservations[0] if first_r is None else first_r[0],
                                      reservations[1])  # fmt: skip

    def checkpoint(self) -> None:
        """The owed files written and made durable, then the journal started afresh; a
        StoreError if that fails (the journal keeps the changes: nothing is lost)."""
        journal = self.journal
        if not journal.owed:
            return
        n = journal.owed_changes
        self._failed = True
        self.write_group(self.owed, self.owed_reservations, journaled=True)
        self.owed, self.owed_reservations = {}, None
        if not journal.written():
            raise StoreError(f"cannot clear the intent journal {journal.path}")
        self._failed = False
        log.debug("the files of %d acknowledged changes are written", n)

    def finish(self, chain: bool = False) -> None:
        """Before a change writes its intent: the owed files written first, unless the
        change is to be committed behind them (``chain``), the journal has room and they
        did not fail to be written; a StoreError if they cannot be, and the new change does
        not start."""
        journal = self.journal
        room = journal.owed < CHAIN_BYTES and journal.owed_changes < CHAIN_CHANGES
        if not journal.owed or (chain and room and not self._failed):
            return
        try:
            self.checkpoint()
        except StoreError as err:
            raise StoreError(f"the files of earlier changes are not written yet: {err}") from err

    def write_matrix(self, m: StoredMatrix) -> None:
        self._guard(f"matrix {m.uuid}", lambda: self._put_matrix(m.uuid, m, True))

    def remove_matrix(self, uuid: str) -> None:
        self._guard(f"the removal of matrix {uuid}", lambda: self._put_matrix(uuid, None, True))

    def write_boot(self, boot: str) -> None:
        """Which boot the stored reservations were applied in: a restart in the same boot
        must not apply them again over what an admin did to the masks meanwhile."""
        data = encode({"format": BOOT_FORMAT, "version": VERSION, "boot": boot})
        self._guard("the boot id", lambda: self._put_root(BOOT_FILE, data))

    def write_reservations(self, r: Reservations) -> None:
        data = encode(r.to_json())
        self._guard("the host reservations", lambda: self._put_root(HOST_FILE, data))

    def _sync_dir(self, dirfd: int) -> None:
        self.fault("fsync-dir")
        os.fsync(dirfd)

    def write_group(
        self,
        matrices: Mapping[str, tuple[StoredMatrix | None, StoredMatrix | None]],
        reservations: tuple[Reservations, Reservations] | None = None,
        journaled: bool = False,
    ) -> None:
        """Several changes made durable together: each file written (temp, fsync, rename)
        as one change would, then one fsync per directory touched instead of one per file.
        ``journaled``: the files of a committed intent (see :func:`replace_at`).

        ``matrices``: uuid -> (before, after), None meaning no file; ``reservations``:
        (before, after). A failure puts back what it had written, before the StoreError is
        raised; ``StoreError.clean`` says whether that put everything back."""
        written: list[tuple[str, StoredMatrix | None]] = []
        dirs: dict[str, int] = {}
        wrote_host = False
        try:
            self._guard("a group of changes", self._dirs)
            for uuid, (before, after) in matrices.items():
                if before == after:
                    continue
                written.append((uuid, before))  # before the write: a failed rename too
                put = lambda: self._put_matrix(uuid, after, False, journaled)  # noqa: B023, E731
                self._guard(f"matrix {uuid}", put)
                dirs[str(self.matrices_dir)] = self._matrices_fd
            if reservations is not None and reservations[0] != reservations[1]:
                wrote_host = True
                data = encode(reservations[1].to_json())
                self._guard("the host reservations",
                            lambda: self._put_root(HOST_FILE, data, False, journaled))  # fmt: skip
                dirs[str(self.root)] = self._root_fd
            for d, fd in sorted(dirs.items()):
                self._guard(f"the directory {d}", lambda: self._sync_dir(fd))  # noqa: B023
        except StoreError as err:
            clean = True
            for uuid, before in reversed(written):
                try:
                    self._put_matrix(uuid, before, True)
                except OSError as why:
                    log.error("cannot restore the stored matrix %s: %s", uuid, why)
                    clean = False
            if wrote_host and reservations is not None:
                try:
                    self.write_reservations(reservations[0])
                except StoreError as why:
                    log.error("cannot restore the stored reservations: %s", why)
                    clean = False
            err.clean = clean
            raise


def stored(
    uuid: str,
    name: str,
    adapters: Iterable[int],
    domains: Iterable[int],
    control_domains: Iterable[int],
    autostart: bool,
    control_usage_domains: bool,
) -> StoredMatrix:
    return StoredMatrix(
        uuid,
        name,
        frozenset(adapters),
        frozenset(domains),
        frozenset(control_domains),
        autostart,
        control_usage_domains,
    )


__all__ = [
    "KILL_ENV",
    "VERSION",
    "Contents",
    "Damaged",
    "Reservations",
    "Store",
    "StoreError",
    "StoredMatrix",
    "kill_fault_from_env",
    "replace_at",
    "replace_at",
    "stored",
    "unlink_at",
    "unlink_at",
]
