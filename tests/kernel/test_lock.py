"""The s390 configuration lock (s390-tools' ap-check and chzdev take it too) is held around
every batch of AP sysfs writes: one acquisition per change, every write inside it."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from apmatrixd.core import HostPool, Matrix
from apmatrixd.kernel import Kernel, KernelError, TreeSysfs
from apmatrixd.sim.model import Host

G1 = "11111111-1111-4111-8111-111111111111"


class Watching(TreeSysfs):
    """Records, for every write, whether someone holds the lock file."""

    def __init__(self, host: Host, lock: Path) -> None:
        super().__init__(host)
        self.lock = lock
        self.writes: list[tuple[str, bool]] = []

    def held(self) -> bool:
        fd = os.open(self.lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def write(self, path: str, data: str) -> None:
        self.writes.append((path, self.held()))
        super().write(path, data)


@pytest.mark.parametrize("scenario", ["default", "default@6.0", "rfc2017"])
def test_every_write_of_a_batch_holds_the_lock(tmp_path: Path, scenario: str) -> None:
    lock = tmp_path / "s390apconfig.lock"
    host = Host.from_name(scenario)
    io = Watching(host, lock)
    k = Kernel(io, lock_path=str(lock))
    pool = k.read_pool()
    if pool.queues is None:
        new = HostPool(pool.adapters - {5, 6}, pool.domains - {4})
    else:
        new = HostPool(queues=frozenset(q for q in pool.queues if q.adapter not in (5, 6)))
    k.set_pool(pool, new)
    m = Matrix(G1, frozenset({5, 6}), frozenset({4}), frozenset({4}))
    k.apply_matrix(G1, None, m)
    k.apply_matrix(G1, m, m.with_sets(adapters=[5]))
    k.apply_matrix(G1, m.with_sets(adapters=[5]), None)
    assert len(io.writes) >= 5
    assert all(held for _, held in io.writes), io.writes
    assert not io.held()  # and released after each batch


def test_a_failed_batch_rolls_back_under_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "s390apconfig.lock"
    host = Host.from_name("default@6.0")  # one write per id: there is a batch to roll back
    io = Watching(host, lock)
    k = Kernel(io, lock_path=str(lock))
    pool = k.read_pool()
    k.set_pool(pool, HostPool(pool.adapters - {5, 6}, pool.domains - {4}))
    host.inject_fault(f"{k.mdev_path(G1)}/assign_domain", errno.EIO)
    io.writes.clear()
    with pytest.raises(KernelError):
        k.apply_matrix(G1, None, Matrix(G1, frozenset({5, 6}), frozenset({4})))
    assert [p.rsplit("/", 1)[1] for p, _ in io.writes][-1] == "remove"  # rolled back
    assert all(held for _, held in io.writes)
    assert not io.held()


def lock_kernel(tmp_path: Path) -> tuple[Kernel, Path, Matrix]:
    lock = tmp_path / "s390apconfig.lock"
    k = Kernel(TreeSysfs(Host.from_name("default")), lock_path=str(lock))
    pool = k.read_pool()
    k.set_pool(pool, HostPool(pool.adapters - {5}, pool.domains))
    return k, lock, Matrix(G1, frozenset({5}), frozenset({4}), frozenset({4}))


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    k, lock, m = lock_kernel(tmp_path)
    lock.unlink()
    lock.symlink_to(tmp_path / "target")
    with pytest.raises(KernelError) as refused:
        k.apply_matrix(G1, None, m)
    assert refused.value.errno == errno.ELOOP
    assert not (tmp_path / "target").exists() and not k.mdev_exists(G1)


def test_a_lock_file_someone_else_owns_is_refused(tmp_path: Path) -> None:
    k, lock, m = lock_kernel(tmp_path)
    os.chown(lock, 65534, 65534)  # nobody created it first
    with pytest.raises(KernelError) as refused:
        k.apply_matrix(G1, None, m)
    assert refused.value.errno == errno.EPERM and "uid 65534" in str(refused.value)
    assert not k.mdev_exists(G1)


def test_a_held_lock_is_busy_after_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apmatrixd.kernel import backend
    from apmatrixd.kernel.errors import LockBusy

    monkeypatch.setattr(backend, "LOCK_WAIT", 0.3)
    k, lock, m = lock_kernel(tmp_path)
    holder = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # chzdev is at work
        with pytest.raises(LockBusy) as refused:
            k.apply_matrix(G1, None, m)
        assert refused.value.name == "Busy" and str(lock) in str(refused.value)
        assert not k.mdev_exists(G1)
    finally:
        os.close(holder)
    k.apply_matrix(G1, None, m)  # released: it goes through
    assert k.mdev_exists(G1)
