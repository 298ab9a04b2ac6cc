"""The FUSE face: sysfs semantics for plain system calls, over a small fake tree.

The operations are first checked directly (no mount); then one in-process mount shows that the
kernel side really behaves like sysfs: errno reaches ``echo``, no caching, one store per write.
The real emulator behind ``apmatrixd-sim mount`` is exercised in ``test_cli.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakesysfs import FakeTree
from rigs import force_unmount, is_mount, need_fuse

from apmatrixd.sim.fuse import PAGE_SIZE, Mount, SysfsOperations, mount
from apmatrixd.sim.model import Host

CARD = "/devices/ap/card05"


@pytest.fixture
def tree() -> FakeTree:
    return FakeTree()


@pytest.fixture
def ops(tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> SysfsOperations:
    monkeypatch.setattr(SysfsOperations, "_caller_uid", staticmethod(lambda: 0))
    return SysfsOperations(tree)


def as_user(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    monkeypatch.setattr(SysfsOperations, "_caller_uid", staticmethod(lambda: uid))


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """The model's OSError and the face's own FuseOSError both reach libfuse as -errno."""
    with pytest.raises(OSError) as info:
        yield
    assert info.value.errno == code, info.value


# -- operations, called directly ---------------------------------------------------------------
def test_getattr_looks_like_sysfs(ops: SysfsOperations) -> None:
    attr = ops.getattr(f"{CARD}/type")
    assert stat.S_ISREG(attr["st_mode"]) and stat.S_IMODE(attr["st_mode"]) == 0o444
    assert attr["st_size"] == PAGE_SIZE and attr["st_uid"] == 0
    assert stat.S_IMODE(ops.getattr(f"{CARD}/assign")["st_mode"]) == 0o200
    assert stat.S_ISDIR(ops.getattr("/")["st_mode"])
    link = ops.getattr("/bus/ap/devices/card05")
    assert stat.S_ISLNK(link["st_mode"]) and link["st_size"] == len("../../../devices/ap/card05")
    with raises_errno(errno.ENOENT):
        ops.getattr("/devices/nothing")


def test_listing_and_links(ops: SysfsOperations) -> None:
    assert list(ops.readdir(CARD, 0)) == [".", "..", "assign", "config", "type"]
    assert ops.readlink("/bus/ap/devices/card05") == "../../../devices/ap/card05"


def test_open_refuses_a_direction_the_attribute_lacks_even_for_root(ops: SysfsOperations) -> None:
    with raises_errno(errno.EACCES):
        ops.open(f"{CARD}/type", os.O_WRONLY)
    with raises_errno(errno.EACCES):
        ops.open(f"{CARD}/assign", os.O_RDONLY)
    with raises_errno(errno.EACCES):
        ops.open(f"{CARD}/assign", os.O_RDWR)
    with raises_errno(errno.EISDIR):
        ops.open(CARD, os.O_RDONLY)
    ops.release(f"{CARD}/config", ops.open(f"{CARD}/config", os.O_RDWR))


def test_other_users_read_but_never_write(
    ops: SysfsOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, 65534)
    fh = ops.open(f"{CARD}/config", os.O_RDONLY)
    assert ops.read(f"{CARD}/config", 4096, 0, fh) == b"1\n"
    with raises_errno(errno.EACCES):
        ops.open(f"{CARD}/config", os.O_WRONLY)
    with raises_errno(errno.EACCES):
        ops.access(f"{CARD}/config", os.W_OK)
    with raises_errno(errno.EACCES):
        ops.truncate(f"{CARD}/config", 0)
    assert ops.access(f"{CARD}/config", os.R_OK) == 0


def test_each_write_is_one_store_and_errno_passes_through(
    ops: SysfsOperations, tree: FakeTree
) -> None:
    fh = ops.open(f"{CARD}/assign", os.O_WRONLY | os.O_TRUNC)
    assert ops.truncate(f"{CARD}/assign", 0, fh) == 0  # O_TRUNC from `echo >`: accepted
    assert ops.write(f"{CARD}/assign", b"5\n", 0, fh) == 2
    with raises_errno(errno.EADDRINUSE):
        ops.write(f"{CARD}/assign", b"4\n", 2, fh)
    with raises_errno(errno.ENODEV):
        ops.write(f"{CARD}/assign", b"999", 4, fh)
    with raises_errno(errno.EINVAL):
        ops.write(f"{CARD}/assign", b"junk", 4, fh)
    with raises_errno(errno.E2BIG):
        ops.write(f"{CARD}/assign", b"1" * (PAGE_SIZE + 1), 0, fh)
    assert [d for _p, d in tree.stores_called] == [b"5\n", b"4\n", b"999", b"junk"]


def test_a_read_shows_once_at_offset_zero_and_slices_after(
    ops: SysfsOperations, tree: FakeTree
) -> None:
    fh = ops.open("/devices/ap/ticker", os.O_RDONLY)
    first = b"".join(ops.read("", 100, off, fh) for off in range(0, 9000, 100))
    assert tree.show_count == 1
    assert first == b"00000001\n" * 1000
    assert ops.read("", 100, 9000, fh) == b""
    assert ops.read("", 9, 0, fh) == b"00000002\n"  # offset 0 again: a fresh show()
    assert tree.show_count == 2


def test_namespace_changes_are_refused_as_sysfs_does(ops: SysfsOperations) -> None:
    with raises_errno(errno.EACCES):
        ops.create("/devices/new", 0o644)
    refused: list[Callable[[], object]] = [
        lambda: ops.mkdir("/devices/d", 0o755),
        lambda: ops.rmdir(CARD),
        lambda: ops.unlink(f"{CARD}/type"),
        lambda: ops.rename(f"{CARD}/type", f"{CARD}/t"),
        lambda: ops.symlink("/devices/l", "x"),
        lambda: ops.link("/devices/l", f"{CARD}/type"),
        lambda: ops.mknod("/devices/n", 0o644, 0),
        lambda: ops.chmod(f"{CARD}/type", 0o666),
        lambda: ops.chown(f"{CARD}/type", 1, 1),
    ]
    for call in refused:
        with raises_errno(errno.EPERM):
            call()
    assert ops.utimens(f"{CARD}/type") == 0


def test_the_face_takes_the_models_own_lock() -> None:
    host = Host.from_name("default")
    assert SysfsOperations(host)._lock is host.lock
    assert SysfsOperations(FakeTree())._lock is not None


def test_init_turns_every_cache_off(ops: SysfsOperations) -> None:
    class Config:
        entry_timeout = attr_timeout = negative_timeout = 1.0
        direct_io = kernel_cache = auto_cache = 0

    ready: list[bool] = []
    ops.on_ready = lambda: ready.append(True)
    config = Config()
    ops.init_with_config(None, config)
    assert (config.entry_timeout, config.attr_timeout, config.negative_timeout) == (0, 0, 0)
    assert config.direct_io == 1 and ready == [True]


# -- a real mount of the fake tree, served from a thread of this process ----------------------
@pytest.fixture(scope="module")
def mounted() -> Iterator[tuple[Path, FakeTree]]:
    need_fuse()
    with tempfile.TemporaryDirectory(prefix="apmatrixd-fuse-") as top:
        os.chmod(top, 0o755)  # pytest's tmp dirs are 0700: nobody could not reach the mount
        mnt = Path(top) / "sys"
        mnt.mkdir()
        fake = FakeTree()
        server = mount(fake, mnt, foreground=False)
        assert isinstance(server, Mount)
        try:
            yield mnt, fake
        finally:
            server.stop()
            force_unmount(mnt)
        assert not is_mount(mnt)


def sh(command: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=10, check=False, **kw
    )
    return done


@pytest.mark.e2e
def test_shell_sees_kernel_errnos(mounted: tuple[Path, FakeTree]) -> None:
    mnt, _ = mounted
    cases = {
        f"echo 5 > {mnt}{CARD}/assign": "",
        f"echo 4 > {mnt}{CARD}/assign": "Address already in use",
        f"echo 999 > {mnt}{CARD}/assign": "No such device",
        f"echo x > {mnt}{CARD}/type": "Permission denied",
        f"touch {mnt}/devices/newfile": "Permission denied",
        f"mkdir {mnt}/devices/newdir": "Operation not permitted",
        f"rm -f {mnt}{CARD}/type": "Operation not permitted",
    }
    for command, error in cases.items():
        done = sh(command)
        assert (done.returncode != 0) == bool(error), command
        assert error in done.stderr, (command, done.stderr)


@pytest.mark.e2e
def test_nothing_is_cached(mounted: tuple[Path, FakeTree]) -> None:
    mnt, fake = mounted
    name = f"m{os.getpid()}"
    assert not (mnt / "devices/ap" / name).exists()  # a negative lookup must not stick
    (mnt / "devices/ap/create").write_text(name)
    assert (mnt / "devices/ap" / name / "remove").exists()
    assert os.stat(mnt / "devices/ap/create").st_size == PAGE_SIZE
    config = mnt / "devices/ap/card05/config"
    (config).write_text("0\n")
    assert config.read_text() == "0\n"
    with fake.lock:
        fake.values["devices/ap/card05/config"] = b"1\n"  # changed behind the kernel's back
    assert config.read_text() == "1\n"


@pytest.mark.e2e
def test_one_write_call_is_one_store_and_reads_are_consistent(
    mounted: tuple[Path, FakeTree],
) -> None:
    mnt, fake = mounted
    before = len(fake.stores_called)
    fd = os.open(mnt / "devices/ap/card05/assign", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.write(fd, b"5") == 1
        assert os.write(fd, b"6\n") == 2
        with pytest.raises(OSError) as info:
            os.write(fd, b"4")
        assert info.value.errno == errno.EADDRINUSE
    finally:
        os.close(fd)
    assert [d for _p, d in fake.stores_called[before:]] == [b"5", b"6\n", b"4"]
    fd = os.open(mnt / "devices/ap/ticker", os.O_RDONLY)
    try:
        chunks = iter(lambda: os.read(fd, 512), b"")
        lines = set(b"".join(chunks).splitlines())
    finally:
        os.close(fd)
    assert len(lines) == 1  # one show() per open, sliced over 18 reads


@pytest.mark.e2e
def test_other_users_can_read_the_tree_but_not_write(mounted: tuple[Path, FakeTree]) -> None:
    mnt, _ = mounted
    config = f"{mnt}{CARD}/config"
    done = sh(
        f"cat {mnt}{CARD}/type; ls {mnt}/bus/ap/devices; echo 0 > {config}",
        user=65534,
        group=65534,
        extra_groups=[],
    )
    assert done.stdout.split() == ["CEX5C", "card05"]
    assert "Permission denied" in done.stderr and done.returncode == 1
