"""Replacing a file through its directory's descriptor, so that nothing planted there is followed.

Root writes into directories others may write to too (mdevctl's, node_exporter's textfile
directory): the new content goes to a fresh ``O_EXCL|O_NOFOLLOW`` temporary in the same
directory, is fsync'd, and is renamed over the name (a link planted there is replaced, its
target untouched). Readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets


def replace_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` as ``name`` in the directory ``dir_fd``; OSError as it comes.

    The temporary is ``.NAME.tmp-RANDOM``: a dot file, which collectors that read ``*.prom``
    (or mdevctl, which reads UUIDs) never take for theirs."""
    tmp = f".{name}.tmp-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fchmod(fd, mode)  # whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
