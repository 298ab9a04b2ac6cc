"""Raw sysfs access: one read is one ``show()``, one write is one ``store()``.

Two faces with one protocol, so the backend never knows which it has: :class:`OsSysfs` over a
real directory (``/sys``, or a FUSE-mounted emulator) and :class:`TreeSysfs` over an in-process
:class:`~apmatrixd.sim.vfs.SysfsTree`. Paths are relative to the sysfs root, no leading slash
(``bus/ap/apmask``). Every failure is an ``OSError`` carrying the kernel's errno and the
relative path as ``filename``; nothing here interprets what it reads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from apmatrixd.sim.vfs import SysfsTree

_READ_CHUNK = 65536
_MAX_LINKS = 40  # ELOOP after this many, as the VFS does


class SysfsIO(Protocol):
    """What the backend needs from a sysfs tree."""

    root: str
    """Where the tree is (or stands for) in the file system, for paths handed to QEMU."""

    def read(self, path: str) -> str: ...

    def write(self, path: str, data: str) -> None:
        """Exactly one store: applies ``data`` or raises OSError with the kernel's errno."""
        ...

    def read_in(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
        """Attributes of one directory (None for each that is absent), the directory resolved
        once; ENOENT if the directory itself is gone."""
        ...

    def listdir(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def readlink(self, path: str) -> str: ...

    def is_dir(self, path: str) -> bool:
        """True for a directory or a link that leads to one (sysfs is full of those)."""
        ...

    def keep(self, directory: str) -> None:
        """Paths below ``directory`` may be opened relative to a descriptor of it kept open
        (a hint: a face without descriptors ignores it)."""
        ...


def _clean(path: str) -> str:
    """Refuse absolute paths and ``..`` escapes: callers build paths from ids and UUIDs."""
    norm = posixpath.normpath(path) if path else ""
    if norm == ".":
        norm = ""
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise OSError(errno.EINVAL, "path outside the sysfs root", path)
    return norm


class OsSysfs:
    """The real thing (or a FUSE mount of the emulator) through plain system calls."""

    def __init__(self, root: str | os.PathLike[str] = "/sys") -> None:
        self.root = os.fspath(root)
        # Kept directory -> its O_PATH descriptor (None until first used). The lock guards
        # the table, not the opens below it: the worker and the hot plug reader open through
        # the same descriptor at once. One in use (counted) is closed by its last user, so
        # its number is never reused for another file while an open is relative to it.
        self._kept: dict[str, int | None] = {}
        self._kept_order: tuple[str, ...] = ()  # the deepest first
        self._kept_lock = threading.Lock()
        self._users: dict[int, int] = {}  # descriptor -> opens under way relative to it
        self._retired: set[int] = set()  # replaced or closed while in use

    def __repr__(self) -> str:
        return f"OsSysfs({self.root!r})"

    def keep(self, directory: str) -> None:
        """Open what lies below ``directory`` relative to a descriptor of it: with FUSE on
        /sys every path component is a lookup round trip, and the rescan timer's files sit
        4-5 deep (sysfs itself is spared the walk). Opened at first use."""
        with self._kept_lock:
            self._kept.setdefault(_clean(directory), None)
            self._kept_order = tuple(sorted(self._kept, key=len, reverse=True))

    def close(self) -> None:
        """Close the kept descriptors (they hold the mount busy); later opens keep anew."""
        with self._kept_lock:
            for d, fd in self._kept.items():
                if fd is not None:
                    self._retire(fd)
                    self._kept[d] = None

    def _open_below(self, directory: str, rest: str, flags: int) -> int | None:
        """``rest`` opened relative to ``directory``'s kept descriptor; None where the full
        path must decide: the directory is not there (yet), or ``rest`` is not found, which
        a stale descriptor says too (vfio_ap reloaded makes a new matrix directory)."""
        with self._kept_lock:
            dfd = self._kept.get(directory)
            if dfd is None:
                try:
                    dfd = os.open(self._abs(directory), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    return None
                self._kept[directory] = dfd
            self._users[dfd] = self._users.get(dfd, 0) + 1
        try:
            return os.open(rest, flags | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        finally:
            with self._kept_lock:
                self._users[dfd] -= 1
                if not self._users[dfd]:
                    del self._users[dfd]
                    if dfd in self._retired:
                        self._retired.discard(dfd)
                        os.close(dfd)

    def _drop(self, directory: str) -> None:
        """The full path found what the kept descriptor did not: it is stale, keep anew."""
        with self._kept_lock:
            if (fd := self._kept.get(directory)) is not None:
                self._retire(fd)
                self._kept[directory] = None

    def _retire(self, fd: int) -> None:
        """Close a kept descriptor now, or once the opens relative to it are done (locked)."""
        if fd in self._users:
            self._retired.add(fd)
        else:
            os.close(fd)

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, _clean(path))

    def read(self, path: str) -> str:
        return self._read_fd(self._open(path, os.O_RDONLY), path)

    def read_in(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
        # Each name is looked up in the directory alone (openat): through FUSE every path
        # component is a round trip, and the attributes of a card or an mdev sit 4-5 deep.
        dfd = self._open(directory, os.O_PATH | os.O_DIRECTORY)
        out: dict[str, str | None] = {}
        try:
            for name in names:
                path = f"{directory}/{name}"
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
                    out[name] = None
                    continue
                out[name] = self._read_fd(fd, path)
        finally:
            os.close(dfd)
        return out

    def _read_fd(self, fd: int, path: str) -> str:
        """Read an opened attribute whole and close it."""
        try:
            chunks: list[bytes] = []
            while True:
                chunk = os.read(fd, _READ_CHUNK)
                chunks.append(chunk)
                # A sysfs attribute is produced by one show() and handed over whole, so a
                # short read is its end: no second read(2) that only returns 0 (through FUSE
                # each is a round trip to the server).
                if len(chunk) < _READ_CHUNK:
                    break
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def write(self, path: str, data: str) -> None:
        """One ``write(2)``: sysfs hands the whole buffer to one ``store()`` call.

        The errno may come from ``write`` (the store refused) or from ``close``; either is
        raised with the relative path, and a refused write is never masked by ``close``.
        """
        raw = data.encode()
        fd = self._open(path, os.O_WRONLY)
        try:
            written = os.write(fd, raw)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
        try:
            os.close(fd)
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
        if written != len(raw):
            raise OSError(errno.EIO, f"short write ({written} of {len(raw)} bytes)", path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._abs(path)))
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._abs(path))

    def readlink(self, path: str) -> str:
        try:
            return os.readlink(self._abs(path))
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self._abs(path))

    def _open(self, path: str, flags: int) -> int:
        rel = _clean(path)
        try:
            below = next((d for d in self._kept_order if rel.startswith(d + "/")), None)
            if below is not None:
                fd = self._open_below(below, rel[len(below) + 1 :], flags)
                if fd is not None:
                    return fd
            fd = os.open(os.path.join(self.root, rel), flags | os.O_CLOEXEC)
            if below is not None:
                self._drop(below)
            return fd
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None


class TreeSysfs:
    """The in-process emulator face (``--simulate``, fast tests).

    Links are resolved here, component by component, as the VFS would do for a mounted
    tree, so ``bus/ap/devices/05.0004/driver`` works whatever the model accepts.

    Each ``kind()`` walks the tree from its root, so a path of depth n cost n walks. The
    real paths seen not to be links are remembered (``_plain``), and one asked for again
    resolves to itself at once: in sysfs a name is a link or not for good (it may come and
    go, never change sides), and a stale entry for a path that went away only skips a check
    the tree's own operation makes again (ENOENT either way).
    Links themselves are never cached: their targets move (``driver`` on bind/unbind).
    """

    _PLAIN_MAX = 16384  # forgotten all at once past this (mdevs come and go)

    def __init__(self, tree: SysfsTree, root: str = "/sys") -> None:
        self.tree = tree
        self.root = root
        self._plain: set[str] = set()

    def __repr__(self) -> str:
        return f"TreeSysfs({self.tree!r})"

    def _resolve(self, path: str, follow_last: bool = True) -> str:
        norm = _clean(path)
        if norm in self._plain:  # a real path seen before: every component of it is no link
            return norm
        parts = norm.split("/") if norm else []
        done = ""
        hops = 0
        while parts:
            name = parts.pop(0)
            here = f"{done}/{name}" if done else name
            if (parts or follow_last) and here not in self._plain:
                if self.tree.kind(here) != "link":
                    if len(self._plain) >= self._PLAIN_MAX:
                        self._plain.clear()
                    self._plain.add(here)
                    done = here
                    continue
                hops += 1
                if hops > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = self.tree.readlink(here)
                joined = posixpath.normpath(posixpath.join(done, target))
                if joined == ".":
                    joined = ""
                if joined == ".." or joined.startswith("../") or joined.startswith("/"):
                    raise OSError(errno.ENOENT, "link leaves the sysfs root", path)
                parts = [*(joined.split("/") if joined else []), *parts]
                done = ""
                continue
            done = here
        return done

    def _call(self, path: str, follow_last: bool = True) -> str:
        try:
            return self._resolve(path, follow_last)
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def read(self, path: str) -> str:
        real = self._call(path)
        try:
            return self.tree.read(real).decode("utf-8", errors="replace")
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def read_in(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
        # Each name read at once (a path seen before resolves without a walk, see
        # ``_resolve``); whether the directory is there is asked only if a name is missing.
        out: dict[str, str | None] = {}
        for name in names:
            try:
                out[name] = self.read(f"{directory}/{name}")
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                if not self.is_dir(directory):
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), directory) from None
                if e.errno == errno.ENOTDIR:
                    raise
                out[name] = None
        return out

    def write(self, path: str, data: str) -> None:
        real = self._call(path)
        try:
            self.tree.write(real, data.encode())
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def listdir(self, path: str) -> list[str]:
        real = self._call(path)
        try:
            return sorted(self.tree.listdir(real))
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def exists(self, path: str) -> bool:
        try:
            self.tree.kind(self._resolve(path, follow_last=False))
        except OSError:
            return False
        return True

    def readlink(self, path: str) -> str:
        real = self._call(path, follow_last=False)
        try:
            return self.tree.readlink(real)
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None

    def is_dir(self, path: str) -> bool:
        try:
            return self.tree.kind(self._resolve(path)) == "dir"
        except OSError:
            return False

    def keep(self, directory: str) -> None:
        """No descriptors here: every lookup is in memory."""
