"""Kernel(OsSysfs) against the emulator mounted with FUSE: real open/write/close, real errno."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs import force_unmount, is_mount, need_fuse, wait_unmounted

from apmatrixd.core import HostPool, Matrix
from apmatrixd.kernel import Kernel, KernelError, OsSysfs

pytestmark = pytest.mark.e2e

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"


@pytest.fixture(params=["default", "rfc2017"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    need_fuse()
    pytest.importorskip("apmatrixd.sim.model")
    mnt = tmp_path / "sys"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apmatrixd.sim.cli", "mount", str(mnt), "--scenario", request.param],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("mounted"):
            proc.wait(timeout=10)
            assert proc.stderr is not None
            pytest.fail(f"emulator did not mount: {line!r} {proc.stderr.read()!r}")
        assert is_mount(mnt)
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(mnt)], capture_output=True, check=False)
        wait_unmounted(mnt)
        force_unmount(mnt)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_guests_through_a_real_mount(mounted: Path) -> None:
    kernel = Kernel(OsSysfs(mounted))
    snap = kernel.read_host()
    assert sorted(snap.adapters) == [5, 6]
    g1 = Matrix(U1, frozenset({5, 6}), frozenset({0x04}), frozenset({0x04}))
    g2 = Matrix(U2, frozenset({5, 6}), frozenset({0x47}), frozenset({0x47}))
    gone = {*g1.apqns(), *g2.apqns()}
    if snap.pool.queues is not None:
        new = HostPool(queues=snap.pool.queues - gone)
    else:
        new = HostPool(snap.pool.adapters, snap.pool.domains - {0x04, 0x47})
    kernel.set_pool(snap.pool, new)
    kernel.apply_matrix(U1, None, g1)
    kernel.apply_matrix(U2, None, g2)
    snap = kernel.read_host()
    assert snap.pool == new
    assert {u: m.matrix() for u, m in snap.mdevs.items()} == {U1: g1, U2: g2}
    assert snap.mdevs[U1].guest_apqns == set(g1.apqns())
    assert kernel.mdev_sysfs_path(U1) == f"{mounted}/{kernel.mdev_path(U1)}"

    with pytest.raises(KernelError) as info:  # 05.0004 is U1's: write(2) says EADDRINUSE
        kernel.apply_matrix(U2, g2, g2.with_sets(domains={0x04, 0x47}))
    assert info.value.errno == errno.EADDRINUSE
    assert kernel.read_host() == snap

    kernel.apply_matrix(U1, g1, None)
    assert not kernel.mdev_exists(U1)
