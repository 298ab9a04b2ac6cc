"""The FUSE face of the kernel emulator: any SysfsTree mounted where ``/sys`` would be.

The point is that an unmodified program (the daemon, mdevctl, lszcrypt, a shell) gets sysfs
*semantics* from plain system calls, not just its shape:

- every ``write(2)`` is exactly one ``store()`` and its errno reaches the writer
  (``echo 4 > assign_domain`` prints "Address already in use");
- no page cache and no attribute/entry caching, because the tree changes under the kernel;
- a read at offset 0 calls ``show()`` once per open file; later offsets slice that value, so
  ``cat`` sees one consistent value (sysfs' seq_file behaviour);
- files report ``st_size`` 4096, like sysfs, whatever their content.

Refusals follow kernfs where the VFS lets a FUSE server decide: opening a file for a direction it
has no bits for is ``EACCES`` (for root too), ``touch``-ing a new name is ``EACCES`` (no ``create``
op), and ``mkdir``/``rmdir``/``unlink``/``rename``/``symlink``/``link``/``mknod`` are ``EPERM``.
``chmod``/``chown`` are ``EPERM`` too (real sysfs lets root do them; the tree has no place to keep
the result). Callers other than root are held to the "other" permission bits, as sysfs files
belong to root, so a daemon running as ``nobody`` can read everything and write nothing.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import mfusepy

from apmatrixd.sim.vfs import SysfsTree

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
# Given explicitly: mfusepy leaves libfuse's default unset and libfuse then warns at start.
_MAX_THREADS = 10


def _lock_of(tree: SysfsTree) -> AbstractContextManager[Any]:
    """The model's own lock when it has one, so FUSE threads and in-process callers serialise."""
    lock = getattr(tree, "lock", None)
    if lock is None:
        return threading.RLock()
    return lock  # type: ignore[no-any-return]


def _rel(path: str) -> str:
    return path.strip("/")


@dataclass
class _Handle:
    path: str
    value: bytes | None = None


class SysfsOperations(mfusepy.Operations):  # type: ignore[misc]
    """mfusepy operations over a SysfsTree; every model call happens under the model lock."""

    use_ns = True

    def __init__(
        self,
        tree: SysfsTree,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.tree = tree
        self._lock = _lock_of(tree)
        self.on_ready = on_ready
        self._handles: dict[int, _Handle] = {}
        self._next_fh = itertools.count(1)
        self._handles_lock = threading.Lock()
        self._time_ns = time.time_ns()

    # -- life cycle -------------------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        """Turn off every cache and say the mount is live (the kernel sends INIT after mount)."""
        if config_3 is not None:
            config_3.entry_timeout = 0.0
            config_3.attr_timeout = 0.0
            config_3.negative_timeout = 0.0
            config_3.direct_io = 1
            config_3.kernel_cache = 0
            config_3.auto_cache = 0
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception("ready notification failed")

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _caller_uid() -> int:
        uid, _gid, _pid = mfusepy.fuse_get_context()
        return int(uid)

    def _check_access(self, rel: str, want_read: bool, want_write: bool) -> None:
        """kernfs' open check plus DAC for non-root callers (files belong to root:root)."""
        mode = self.tree.mode(rel)
        if want_write and not mode & 0o222:
            raise mfusepy.FuseOSError(errno.EACCES)
        if want_read and not mode & 0o444:
            raise mfusepy.FuseOSError(errno.EACCES)
        if self._caller_uid() != 0:
            if want_write and not mode & stat.S_IWOTH:
                raise mfusepy.FuseOSError(errno.EACCES)
            if want_read and not mode & stat.S_IROTH:
                raise mfusepy.FuseOSError(errno.EACCES)

    def _handle(self, fh: int) -> _Handle:
        with self._handles_lock:
            try:
                return self._handles[fh]
            except KeyError:
                raise mfusepy.FuseOSError(errno.EBADF) from None

    # -- lookups ----------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        rel = _rel(path)
        with self._lock:
            kind = self.tree.kind(rel)
            if kind == "link":
                mode, size, nlink = stat.S_IFLNK | 0o777, len(self.tree.readlink(rel)), 1
            elif kind == "dir":
                mode, size, nlink = stat.S_IFDIR | self.tree.mode(rel), 0, 2
            else:
                mode, size, nlink = stat.S_IFREG | self.tree.mode(rel), PAGE_SIZE, 1
        t = self._time_ns
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": 0,
            "st_gid": 0,
            "st_blksize": PAGE_SIZE,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
        }

    def readlink(self, path: str) -> str:
        with self._lock:
            return self.tree.readlink(_rel(path))

    def readdir(self, path: str, fh: int) -> Iterator[str]:
        with self._lock:
            names = self.tree.listdir(_rel(path))
        return iter([".", "..", *names])

    def access(self, path: str, amode: int) -> int:
        rel = _rel(path)
        with self._lock:
            kind = self.tree.kind(rel)
            if kind == "file":
                if amode & os.X_OK:
                    raise mfusepy.FuseOSError(errno.EACCES)
                self._check_access(rel, bool(amode & os.R_OK), bool(amode & os.W_OK))
            elif kind == "dir" and amode & os.W_OK and self._caller_uid() != 0:
                raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    # -- files ------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        rel = _rel(path)
        acc = flags & os.O_ACCMODE
        with self._lock:
            if self.tree.kind(rel) == "dir":
                raise mfusepy.FuseOSError(errno.EISDIR)
            self._check_access(
                rel, acc in (os.O_RDONLY, os.O_RDWR), acc in (os.O_WRONLY, os.O_RDWR)
            )
        with self._handles_lock:
            fh = next(self._next_fh)
            self._handles[fh] = _Handle(rel)
        return fh

    def release(self, path: str, fh: int) -> int:
        with self._handles_lock:
            self._handles.pop(fh, None)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handle(fh)
        if offset == 0 or handle.value is None:
            with self._lock:
                handle.value = self.tree.read(handle.path)
        return handle.value[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        handle = self._handle(fh)
        if len(data) > PAGE_SIZE:  # sysfs: atomic_write_len = PAGE_SIZE
            raise mfusepy.FuseOSError(errno.E2BIG)
        with self._lock:
            count = self.tree.write(handle.path, data)
        handle.value = None
        return count if count > 0 else len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        """O_TRUNC from ``echo x > attr`` arrives here: accepted and ignored, as sysfs does."""
        if fh is None and path:
            rel = _rel(path)
            with self._lock:
                if self.tree.kind(rel) == "dir":
                    raise mfusepy.FuseOSError(errno.EISDIR)
                self._check_access(rel, False, True)
        return 0

    def flush(self, path: str, fh: int) -> int:
        # kernfs has no flush: a close of a sysfs file asks nothing of it. ENOSYS tells the
        # kernel's FUSE the same (it stops sending FLUSH), so a close costs no round trip.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        """``touch`` of an existing attribute succeeds for root and changes nothing."""
        with self._lock:
            self.tree.kind(_rel(path))
        if self._caller_uid() != 0:
            raise mfusepy.FuseOSError(errno.EPERM)
        return 0

    # -- refused namespace changes ----------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise mfusepy.FuseOSError(errno.EACCES)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def mkdir(self, path: str, mode: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def rmdir(self, path: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def unlink(self, path: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def rename(self, old: str, new: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def link(self, target: str, source: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def chmod(self, path: str, mode: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)


def unmount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> bool:
    """``fusermount3 -u`` (``-uz`` if ``lazy``); True when it worked. Never raises."""
    args = ["fusermount3", "-uz" if lazy else "-u", os.fspath(mountpoint)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("%s failed: %s", " ".join(args), err)
        return False
    if done.returncode != 0:
        log.debug("%s: %s", " ".join(args), done.stderr.strip())
    return done.returncode == 0


class Mount:
    """A FUSE server running in a thread of this process, serving one mountpoint."""

    def __init__(
        self,
        tree: SysfsTree,
        mountpoint: str | os.PathLike[str],
        *,
        on_ready: Callable[[], None] | None = None,
        allow_other: bool = True,
        nothreads: bool = False,
        debug: bool = False,
        fsname: str = "apmatrixd-sim",
    ) -> None:
        self.mountpoint = os.fspath(mountpoint)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._user_ready = on_ready
        self._ops = SysfsOperations(tree, on_ready=self._on_ready)
        self._options: dict[str, Any] = {
            "foreground": True,
            "nothreads": nothreads,
            "debug": debug,
            "allow_other": allow_other,
            "fsname": fsname,
            "subtype": "apmatrixd-sim",
            "max_threads": _MAX_THREADS,
            "max_idle_threads": _MAX_THREADS,
        }
        self._thread = threading.Thread(target=self._serve, name="fuse", daemon=True)

    def _on_ready(self) -> None:
        self.ready.set()
        if self._user_ready is not None:
            self._user_ready()

    def _serve(self) -> None:
        try:
            mfusepy.FUSE(self._ops, self.mountpoint, **self._options)
        except BaseException as err:  # reported through .error and wait_ready()
            self.error = err
        finally:
            self.ready.set()  # release waiters if the mount never came up

    def start(self, timeout: float = 10.0) -> Mount:
        """Mount and return once the kernel has sent INIT; raises RuntimeError if it did not."""
        self._thread.start()
        came_up = self.ready.wait(timeout)
        if not came_up or self.error is not None or not self._thread.is_alive():
            self.stop()
            why = "timeout" if self.error is None else f"libfuse said {self.error}"
            raise RuntimeError(f"FUSE mount at {self.mountpoint} failed ({why})")
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self, timeout: float = 10.0, busy_grace: float = 0.5) -> None:
        """Unmount and wait for the server thread to finish.

        A busy mount (open files, a cwd inside) is detached lazily: it is gone from the
        namespace at once, but the server keeps answering the open files until they close.
        Then only ``busy_grace`` seconds are granted, so that a stop request is not held
        hostage by a client; once this process exits, those files read ENOTCONN.
        """
        if not self._thread.is_alive():
            return
        if unmount(self.mountpoint):
            self._thread.join(timeout)
        else:
            unmount(self.mountpoint, lazy=True)
            self._thread.join(busy_grace)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mount(
    tree: SysfsTree,
    mountpoint: str | os.PathLike[str],
    foreground: bool = True,
    *,
    on_ready: Callable[[], None] | None = None,
    allow_other: bool = True,
    nothreads: bool = False,
    debug: bool = False,
    fsname: str = "apmatrixd-sim",
) -> Mount:
    """Serve ``tree`` at ``mountpoint``.

    ``foreground`` (the command's mode; main thread only): block until the mount goes away
    (``fusermount3 -u``) or SIGTERM/SIGINT/SIGHUP arrives, which unmounts (lazily if the mount
    is busy) and returns normally, so the caller can exit 0. The server runs in a thread because
    Python cannot run signal handlers while the main thread sits inside libfuse.
    Otherwise: start the server in a thread and return the running :class:`Mount` (tests).
    ``allow_other`` (root only, or ``user_allow_other`` in /etc/fuse.conf) lets other users,
    e.g. a daemon running as ``nobody``, read the tree. ``on_ready`` runs once the mount is live.
    Raises RuntimeError if libfuse fails to mount.
    """
    server = Mount(
        tree,
        mountpoint,
        on_ready=on_ready,
        allow_other=allow_other,
        nothreads=nothreads,
        debug=debug,
        fsname=fsname,
    )
    if not foreground:
        return server.start()
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: unmounting %s", signum, server.mountpoint)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        server.start()
        while server.alive and not stopping.is_set():
            server.join(0.2)
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if server.error is not None:
        raise RuntimeError(f"FUSE server at {server.mountpoint} failed: {server.error}")
    return server
