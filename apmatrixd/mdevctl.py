"""mdevctl's definition files for vfio_ap matrices: read them in, write ours out.

mdevctl keeps one JSON file per mediated device, ``<config dir>/<parent>/<uuid>`` (parent
``matrix`` for vfio_ap, config dir ``/etc/mdevctl.d``)::

    {
      "mdev_type": "vfio_ap-passthrough",
      "start": "auto",
      "attrs": [
        {"assign_adapter": "5"},
        {"assign_domain": "0xab"},
        {"assign_control_domain": "0xab"}
      ]
    }

``attrs`` are sysfs writes replayed in order when mdevctl starts the device; their values are
what the kernel's ``kstrtoul(buf, 0)`` accepts: decimal, ``0x`` hex or leading-``0`` octal.
Only the three ``assign_*`` attributes are understood; anything else is refused by name, as
is a file that is not such a definition. This module only parses and formats: the service
decides whether the definitions fit together and with ours.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apmatrixd.atfile import replace_at
from apmatrixd.core.apqn import MAX_ID
from apmatrixd.core.errors import InvalidArgument, NotFound
from apmatrixd.core.matrix import normalize_uuid

PARENT = "matrix"
TYPES = ("vfio_ap-passthrough", "ap_matrix-passthrough")
ATTRS = {
    "assign_adapter": "adapters",
    "assign_domain": "domains",
    "assign_control_domain": "control_domains",
}
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Definition:
    """One mdevctl definition of a matrix, and the file it came from."""

    uuid: str
    adapters: frozenset[int]
    domains: frozenset[int]
    control_domains: frozenset[int]
    autostart: bool
    source: str = ""


def kstrtoul(text: str) -> int:
    """The kernel's ``kstrtoul(s, 0)``: ``+``? then 0x-hex, 0-octal or decimal, one ``\\n``."""
    s = text[:-1] if text.endswith("\n") else text
    if s.startswith("+"):
        s = s[1:]
    if s[:2].lower() == "0x" and s[2:3] and s[2] in string.hexdigits:
        base, digits = 16, s[2:]
    elif s.startswith("0"):
        base, digits = 8, s
    else:
        base, digits = 10, s
    allowed = string.hexdigits if base == 16 else string.digits[:base]
    if not digits or any(c not in allowed for c in digits):
        raise ValueError(f"not a number for kstrtoul: {text!r}")
    return int(digits, base)


def _fail(path: Path, what: str) -> InvalidArgument:
    return InvalidArgument(f"{path}: {what}")


def parse_file(path: Path, data: bytes) -> Definition:
    """One definition file; InvalidArgument names the file and the entry at fault."""
    try:
        uuid = normalize_uuid(path.name)
    except InvalidArgument:
        raise _fail(path, "file name is not a UUID (mdevctl names files by UUID)") from None
    return parse_definition(uuid, data, path)


def parse_definition(uuid: str, data: bytes, path: Path) -> Definition:
    """A definition's JSON (a file's, or what mdevctl gives its callouts on stdin) for
    ``uuid``; errors name ``path``."""
    try:
        obj: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise _fail(path, "not a JSON object")
    # The texts name what is wrong, never what the file holds: the daemon reads as root, and
    # its errors must not show a caller what a file they cannot read says.
    if obj.get("mdev_type") not in TYPES:
        raise _fail(path, f"mdev_type is not {TYPES[0]}")
    start = obj.get("start", "manual")
    if start not in ("auto", "manual"):
        raise _fail(path, "start is neither 'auto' nor 'manual'")
    attrs = obj.get("attrs", [])
    if not isinstance(attrs, list):
        raise _fail(path, "attrs is not a list")
    sets: dict[str, set[int]] = {"adapters": set(), "domains": set(), "control_domains": set()}
    for i, entry in enumerate(attrs):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise _fail(path, f"attrs[{i}] is not an object with one attribute")
        ((key, value),) = entry.items()
        target = ATTRS.get(key)
        if target is None:
            known = ", ".join(ATTRS)
            raise _fail(path, f"attrs[{i}]: not one of the supported attributes ({known})")
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            n = kstrtoul(value)
        except ValueError:
            raise _fail(path, f"attrs[{i}]: the {key} value is not a number") from None
        if n > MAX_ID:
            raise _fail(path, f"attrs[{i}]: the {key} value is above {MAX_ID}")
        sets[target].add(n)
    return Definition(
        uuid,
        frozenset(sets["adapters"]),
        frozenset(sets["domains"]),
        frozenset(sets["control_domains"]),
        start == "auto",
        str(path),
    )


ConfigDir = str | int
"""Where definitions are: an absolute path the daemon opens itself (its own mdevctl
directory), or a directory descriptor a caller opened with its own rights."""


def check_path(config_dir: str) -> None:
    """A path form is absolute; refused before any I/O."""
    if not isinstance(config_dir, str) or not os.path.isabs(config_dir):
        raise InvalidArgument(f"want an absolute directory path, not {config_dir!r}")


def describe(config_dir: ConfigDir) -> str:
    """A name for errors and logs. A descriptor is named by what the caller opened (read back
    from /proc for display only; nothing is resolved through it)."""
    if isinstance(config_dir, str):
        return config_dir
    try:
        return os.readlink(f"/proc/self/fd/{config_dir}")
    except OSError:
        return f"the directory passed as descriptor {config_dir}"


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    """A directory fd, never through a symlink in the last component (``DIR/matrix`` planted
    as a link to elsewhere is refused, not followed); OSError as it comes."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, dir_fd=dir_fd)


def _refuse(path: str | Path, err: OSError) -> InvalidArgument | NotFound:
    if err.errno == errno.ENOENT:
        return NotFound(f"no directory {path}")
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return InvalidArgument(f"{path} is not a directory (a symlink is not followed)")
    return InvalidArgument(f"cannot open {path}: {err.strerror}")


def _top(config_dir: ConfigDir) -> tuple[int, Path]:
    """Our own fd of the configuration directory, and its name for errors.

    A path is opened without following a link in its last component; a caller's descriptor
    is re-opened through itself (``openat(fd, ".")``), so an ``O_PATH`` descriptor works and
    the caller's own stays untouched. Anything but a directory is refused."""
    label = Path(describe(config_dir))
    try:
        if isinstance(config_dir, str):
            check_path(config_dir)
            return _open_dir(config_dir), label
        if not stat.S_ISDIR(os.fstat(config_dir).st_mode):
            raise InvalidArgument("the descriptor passed is not a directory")
        return _open_dir(".", dir_fd=config_dir), label
    except OSError as err:
        raise _refuse(label, err) from None


def read_dir(config_dir: ConfigDir) -> list[Definition]:
    """Every definition under ``<config_dir>/matrix``, sorted by UUID; all must parse.

    Everything below ``config_dir`` is reached through directory fds without following a
    link: a file swapped for a link, a FIFO or a directory is skipped, never opened."""
    top, label = _top(config_dir)
    base = label / PARENT
    try:
        try:
            fd = _open_dir(PARENT, dir_fd=top)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise NotFound(
                    f"no {PARENT}/ directory in {label} (mdevctl's vfio_ap parent)"
                ) from None
            raise _refuse(base, err) from None
    finally:
        os.close(top)
    out: list[Definition] = []
    try:
        try:
            names = sorted(os.listdir(fd))
        except OSError as err:
            raise InvalidArgument(f"cannot list {base}: {err.strerror}") from None
        for name in names:
            if name.startswith("."):
                continue
            data = _read_regular(base / name, fd)
            if data is None:
                continue
            out.append(parse_file(base / name, data))
    finally:
        os.close(fd)
    return sorted(out, key=lambda d: d.uuid)


def _read_regular(path: Path, dir_fd: int | None = None) -> bytes | None:
    """A regular file's bytes, or None for anything else (a link, a FIFO, a directory): opened
    without following a link and without blocking, so nothing swapped in can stall a read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path.name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):  # a link; a socket
            return None
        raise _fail(path, f"unreadable: {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE:
                raise _fail(path, "larger than 1 MiB")
        return b"".join(chunks)
    except OSError as err:
        raise _fail(path, f"unreadable: {err.strerror}") from None
    finally:
        os.close(fd)


def assignments(
    adapters: Iterable[int], domains: Iterable[int], control_domains: Iterable[int]
) -> list[tuple[str, str]]:
    """A matrix as the sysfs writes that make it, in the order they are made: adapters, usage
    domains, control domains, each ascending, in the kernel's hex widths (``0x05``,
    ``0x0047``). mdevctl's ``attrs`` and libvirt's node device ``<attr>`` elements."""
    out = [("assign_adapter", f"0x{a:02x}") for a in sorted(adapters)]
    out += [("assign_domain", f"0x{d:04x}") for d in sorted(domains)]
    out += [("assign_control_domain", f"0x{d:04x}") for d in sorted(control_domains)]
    return out


def format_definition(
    adapters: frozenset[int] | tuple[int, ...],
    domains: frozenset[int] | tuple[int, ...],
    control_domains: frozenset[int] | tuple[int, ...],
    autostart: bool,
    mdev_type: str = TYPES[0],
) -> bytes:
    """The file mdevctl would write for this matrix (ids in the kernel's hex widths)."""
    attrs = [{k: v} for k, v in assignments(adapters, domains, control_domains)]
    obj = {"mdev_type": mdev_type, "start": "auto" if autostart else "manual", "attrs": attrs}
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_dir(config_dir: ConfigDir, files: dict[str, bytes]) -> Path:
    """Write ``<config_dir>/matrix/<uuid>`` for each of ``files``, each crash-safe; files of
    other UUIDs are left alone. OSError as it comes (a refused directory: InvalidArgument).

    Root writes where a caller said, so every step goes through directory fds: ``matrix`` is
    opened (or made) without following a link, each file is written to a fresh ``O_EXCL``
    temporary in it and renamed over its name (a link planted there is replaced, never
    followed), and the directory is fsync'd."""
    top, label = _top(config_dir)
    base = label / PARENT
    try:
        try:
            fd = _open_dir(PARENT, dir_fd=top)
        except FileNotFoundError:
            os.mkdir(PARENT, 0o755, dir_fd=top)
            os.fsync(top)
            try:
                fd = _open_dir(PARENT, dir_fd=top)
            except OSError as err:
                raise _refuse(base, err) from None
        except OSError as err:
            raise _refuse(base, err) from None
    finally:
        os.close(top)
    try:
        for uuid, data in files.items():
            _write_at(fd, uuid, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return base


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    if "/" in name or name.startswith("."):
        raise InvalidArgument(f"not a definition file name: {name!r}")
    replace_at(dir_fd, name, data)  # 0644, what mdevctl writes


Fingerprint = tuple[int, int, int]
"""(inode, mtime_ns, size) of a definition file: re-read only what changed since."""


@dataclass
class Scan:
    """What one look at mdevctl's directory found (see :func:`scan_dir`)."""

    present: dict[str, Fingerprint]  # every definition file there, by UUID
    read: dict[str, Definition]  # the new or changed ones that parsed
    broken: dict[str, str]  # new or changed ones that did not: uuid -> why


def _open_parent(config_dir: str, absent: type[OSError]) -> int | None:
    """An fd of ``<config_dir>/matrix`` (no link followed), or None on ``absent``."""
    try:
        top = _open_dir(config_dir)
    except absent:
        return None
    try:
        return _open_dir(PARENT, dir_fd=top)
    except absent:
        return None
    finally:
        os.close(top)


def scan_dir(config_dir: str, seen: dict[str, Fingerprint]) -> Scan:
    """The definitions under ``<config_dir>/matrix`` that differ from ``seen``.

    Each file is stat'ed (cheap: the rescan does this every 30 s) and only new or changed
    ones are read, through directory fds without following links, as :func:`read_dir` does.
    No directory (mdevctl not installed, or nothing defined yet) is an empty scan. Only
    files whose name is a UUID count: mdevctl names its files so."""
    fd = _open_parent(config_dir, OSError)
    if fd is None:
        return Scan({}, {}, {})
    base = Path(config_dir) / PARENT
    out = Scan({}, {}, {})
    try:
        for name in sorted(os.listdir(fd)):
            try:
                uuid = normalize_uuid(name)
            except InvalidArgument:
                continue
            try:
                s = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if not stat.S_ISREG(s.st_mode):
                continue
            fp = (s.st_ino, s.st_mtime_ns, s.st_size)
            out.present[uuid] = fp
            if seen.get(uuid) == fp:
                continue
            try:
                data = _read_regular(base / name, fd)
                if data is None:
                    del out.present[uuid]
                    continue
                out.read[uuid] = parse_file(base / name, data)
            except InvalidArgument as err:
                out.broken[uuid] = str(err)
    finally:
        os.close(fd)
    return out


def remove_at(config_dir: str, uuid: str) -> bool:
    """Remove ``<config_dir>/matrix/<uuid>`` if it is a regular file; True if removed.
    OSError as it comes; nothing there is False."""
    fd = _open_parent(config_dir, FileNotFoundError)
    if fd is None:
        return False
    try:
        s = os.stat(uuid, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(s.st_mode):
            return False
        os.unlink(uuid, dir_fd=fd)
        os.fsync(fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
