"""OsSysfs on a plain directory: one write per store, errno and path kept."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from apmatrixd.kernel import Kernel, KernelError, OsSysfs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "bus/ap").mkdir(parents=True)
    (tmp_path / "bus/ap/apmask").write_text("0x" + "f" * 64 + "\n")
    (tmp_path / "devices/ap/card05").mkdir(parents=True)
    os.symlink("../../devices/ap/card05", tmp_path / "bus/ap/card05")
    return tmp_path


def test_read_write_listdir(root: Path) -> None:
    io = OsSysfs(root)
    assert io.read("bus/ap/apmask").startswith("0xff")
    (root / "bus/ap/aqmask").write_text("")
    io.write("bus/ap/aqmask", "0x00")  # no O_TRUNC, no newline: one store of these bytes
    assert (root / "bus/ap/aqmask").read_text() == "0x00"
    os.unlink(root / "bus/ap/aqmask")
    assert io.listdir("bus/ap") == ["apmask", "card05"]
    assert io.exists("bus/ap/apmask") and not io.exists("bus/ap/aqmask")
    assert io.is_dir("bus/ap/card05") and not io.is_dir("bus/ap/apmask")
    assert io.readlink("bus/ap/card05") == "../../devices/ap/card05"


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536, 524288 + 7])
def test_read_is_whole_at_every_size(root: Path, size: int) -> None:
    """A read stops at the first short chunk: a long file (a 256 x 256 guest_matrix is 512 kB)
    still comes back whole, chunk boundaries included."""
    text = "".join(f"{i % 256:02x}.{i % 65536:04x}\n" for i in range(size // 8 + 1))[:size]
    (root / "devices/ap/card05/big").write_text(text)
    assert OsSysfs(root).read("devices/ap/card05/big") == text


@pytest.mark.parametrize("op", ["read", "write", "listdir", "readlink"])
def test_errno_passthrough(root: Path, op: str) -> None:
    io = OsSysfs(root)
    with pytest.raises(OSError) as info:
        if op == "write":
            io.write("bus/ap/nonexistent", "1")
        else:
            getattr(io, op)("bus/ap/nonexistent")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "bus/ap/nonexistent"


def test_paths_cannot_leave_the_root(root: Path) -> None:
    with pytest.raises(OSError) as info:
        OsSysfs(root / "bus").read("../bus/ap/apmask")
    assert info.value.errno == errno.EINVAL


def test_kernel_error_keeps_errno_and_attribute(root: Path) -> None:
    (root / "devices/vfio_ap/matrix").mkdir(parents=True)
    kernel = Kernel(OsSysfs(root))
    assert kernel.layout == "upstream"
    with pytest.raises(KernelError) as info:
        kernel.assign("11111111-1111-1111-1111-111111111111", "domain", 4)
    err = info.value
    assert err.errno == errno.ENOENT
    assert err.path.endswith("11111111-1111-1111-1111-111111111111/assign_domain")
    assert str(err) == (
        "kernel refused writing '0x0004' to devices/vfio_ap/matrix/"
        "11111111-1111-1111-1111-111111111111/assign_domain: [Errno 2] No such file or directory"
    )


def test_no_matrix_device(root: Path) -> None:
    with pytest.raises(KernelError, match="vfio_ap module not loaded"):
        Kernel(OsSysfs(root))


def test_rfc2017_detected(root: Path) -> None:
    (root / "devices/ap_matrix/matrix").mkdir(parents=True)
    assert Kernel(OsSysfs(root)).layout == "rfc2017"


class RecordingSysfs(OsSysfs):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[tuple[str, str]] = []

    def write(self, path: str, data: str) -> None:
        self.writes.append((path, data))
        super().write(path, data)


def test_masks_are_narrowed_before_they_are_widened(root: Path) -> None:
    """apmask gains 05 while aqmask loses 04: aqmask first, or (05, 04) bounces to the host."""
    from apmatrixd.core import HostPool
    from apmatrixd.kernel.formats import format_mask

    (root / "devices/vfio_ap/matrix").mkdir(parents=True)
    (root / "bus/ap/aqmask").write_text("")
    io = RecordingSysfs(root)
    kernel = Kernel(io)
    old = HostPool(frozenset({1}), frozenset({4, 7}))
    kernel.set_pool(old, HostPool(frozenset({1, 5}), frozenset({7})))
    assert io.writes == [
        ("bus/ap/aqmask", format_mask({7})),
        ("bus/ap/apmask", format_mask({1, 5})),
    ]
    io.writes.clear()
    kernel.set_pool(old, HostPool(frozenset({5}), frozenset({4, 7, 9})))
    assert io.writes == [
        ("bus/ap/apmask", format_mask(set())),
        ("bus/ap/apmask", format_mask({5})),
        ("bus/ap/aqmask", format_mask({4, 7, 9})),
    ]
    io.writes.clear()
    kernel.set_pool(old, old)
    assert io.writes == []


def test_read_in_reads_a_directory_once_resolved(root: Path) -> None:
    """Absent attributes are None (kernels differ), a gone directory is ENOENT with its
    path, and an attribute is never reached through a link planted in its place."""
    card = root / "devices/ap/card05"
    (card / "type").write_text("CEX8C\n")
    (card / "config").write_text("1\n")
    os.symlink("../../../bus/ap/apmask", card / "online")
    io = OsSysfs(root)
    with pytest.raises(OSError) as info:
        io.read_in("devices/ap/card05", ("type", "online"))
    assert info.value.errno == errno.ELOOP
    assert info.value.filename == "devices/ap/card05/online"
    os.unlink(card / "online")
    got = io.read_in("devices/ap/card05", ("type", "online", "config"))
    assert got == {"type": "CEX8C\n", "online": None, "config": "1\n"}
    with pytest.raises(OSError) as info:
        io.read_in("devices/ap/card06", ("type",))
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "devices/ap/card06"


def test_read_in_is_the_same_on_the_in_process_tree() -> None:
    from apmatrixd.kernel import TreeSysfs
    from apmatrixd.sim.model import Host

    host = Host.from_name("rfc2017")
    tree = TreeSysfs(host)
    names = ("type", "online", "config", "nonexistent")
    got = tree.read_in("devices/ap/card05", names)
    assert got == {n: None if n == "nonexistent" else tree.read(f"devices/ap/card05/{n}")
                   for n in names}  # fmt: skip
    assert got["config"] == "1\n"
    with pytest.raises(OSError) as info:
        tree.read_in("devices/ap/card7f", names)
    assert info.value.errno == errno.ENOENT


def test_the_in_process_tree_reads_a_remembered_path_as_it_is_now() -> None:
    """A path read before resolves at once (no walk): an mdev removed is ENOENT by it, one
    created again under the same UUID reads its own (empty) sets, and a path through a link
    is still resolved, to wherever the link leads now."""
    from apmatrixd.kernel import TreeSysfs
    from apmatrixd.sim.model import Host

    host = Host.from_name("default")
    tree = TreeSysfs(host)
    u = "11111111-1111-1111-1111-111111111111"
    mdev = f"devices/vfio_ap/matrix/{u}"
    tree.write("bus/ap/apmask", "0x" + "0" * 64)
    tree.write("devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough/create", u)
    tree.write(f"{mdev}/assign_adapter", "5")
    names = ("ap_config", "nonexistent")
    assert tree.read_in(mdev, names)["ap_config"].startswith("0x04")
    assert f"{mdev}/ap_config" in tree._plain
    tree.write(f"{mdev}/remove", "1")
    for _ in range(2):
        with pytest.raises(OSError) as info:
            tree.read_in(mdev, names)
        assert (info.value.errno, info.value.filename) == (errno.ENOENT, mdev)
    tree.write("devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough/create", u)
    empty = ",".join(["0x" + "0" * 64] * 3) + "\n"
    assert tree.read_in(mdev, names) == {"ap_config": empty, "nonexistent": None}
    driver = "bus/ap/devices/05.0004/driver"
    assert tree.readlink(driver).endswith("/vfio_ap")
    assert "05.0004" in tree.listdir(driver)
    tree.write(f"{mdev}/remove", "1")
    tree.write("bus/ap/apmask", "0x" + "f" * 64)  # back to the host: the link moves
    assert tree.readlink(driver).endswith("/cex4queue")
    assert tree.read_in("bus/ap/devices/05.0004", ("online",)) == {"online": "1\n"}


def test_a_kept_directory_is_opened_below_and_found_again(root: Path) -> None:
    """Below a kept directory a path is opened relative to its descriptor, and one that was
    removed and made again (vfio_ap reloaded makes a new matrix directory) is not read
    through the old descriptor: a name not found there is looked up by the full path, and
    the new directory kept from then on."""
    io = OsSysfs(root)
    io.keep("devices/ap")
    (root / "devices/ap/card05/online").write_text("1\n")
    assert io.read("devices/ap/card05/online") == "1\n"
    kept = os.readlink(f"/proc/self/fd/{io._kept['devices/ap']}")
    assert kept == str(root / "devices/ap")
    (root / "devices/ap/card05/online").write_text("0\n")
    assert io.read("devices/ap/card05/online") == "0\n"  # a read is never a cached one
    # Gone and made again: the same path reads the new directory.
    (root / "devices/ap/card05/online").unlink()
    (root / "devices/ap/card05").rmdir()
    (root / "devices/ap").rmdir()
    (root / "devices/ap/card05").mkdir(parents=True)
    (root / "devices/ap/card05/online").write_text("1\n")
    assert io.read("devices/ap/card05/online") == "1\n"
    assert io.read("devices/ap/card05/online") == "1\n"  # now through the new one
    assert os.readlink(f"/proc/self/fd/{io._kept['devices/ap']}") == kept  # not "(deleted)"
    got = io.read_in("devices/ap/card05", ["online", "config"])
    assert got == {"online": "1\n", "config": None}
    with pytest.raises(FileNotFoundError) as err:
        io.read("devices/ap/card06/online")
    assert err.value.filename == "devices/ap/card06/online"
    io.write("devices/ap/card05/online", "0")  # writes go below it too
    assert (root / "devices/ap/card05/online").read_text() == "0\n"  # one store, no O_TRUNC
    io.close()
    assert io._kept["devices/ap"] is None


def test_opens_below_a_kept_directory_run_at_once_and_its_descriptor_outlives_them(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker and the hot plug reader open below the same kept descriptor at once (each
    open is a round trip through FUSE): neither waits for the other's. A descriptor found
    stale meanwhile is closed only once the opens relative to it are done, so its number
    never names another file under an open."""
    io = OsSysfs(root)
    io.keep("devices/ap")
    for a in (5, 6):
        (root / f"devices/ap/card{a:02x}").mkdir(parents=True, exist_ok=True)
        (root / f"devices/ap/card{a:02x}/online").write_text("1\n")
    assert io.read("devices/ap/card05/online") == "1\n"
    kept = io._kept["devices/ap"]
    assert kept is not None
    real_open = os.open
    both = threading.Barrier(2, timeout=5)
    seen: list[bool] = []

    def open_(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if dir_fd == kept:
            both.wait()  # the other thread's open must get here too, meanwhile
            if threading.current_thread().name == "first":
                io._drop("devices/ap")  # found stale by someone else, while in use here
                seen.append(os.readlink(f"/proc/self/fd/{kept}") == str(root / "devices/ap"))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    got: dict[str, str] = {}

    def read(name: str, a: int) -> None:
        got[name] = io.read(f"devices/ap/card{a:02x}/online")

    threads = [
        threading.Thread(target=read, args=(n, a), name=n) for n, a in (("first", 5), ("second", 6))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == {"first": "1\n", "second": "1\n"} and seen == [True]
    monkeypatch.setattr(os, "open", real_open)
    assert not io._users and not io._retired  # closed by its last user
    assert io.read("devices/ap/card06/online") == "1\n"  # kept anew
    assert io._kept["devices/ap"] is not None
    io.close()


def test_the_running_kernel_s_boot_id_is_read_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every change's intent names the boot; /proc is read for the first one only."""
    (root / "devices/vfio_ap/matrix").mkdir(parents=True)
    kernel = Kernel(OsSysfs(root))
    want = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert kernel.boot_id() == want
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("read again"))
    assert kernel.boot_id() == want
