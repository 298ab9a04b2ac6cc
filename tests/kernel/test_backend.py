"""Kernel against the emulator, in process, on both layouts: reads, applies, and undoes."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

import pytest

from apmatrixd.core import Apqn, HostPool, Matrix, cross
from apmatrixd.kernel import HostSnapshot, Kernel, KernelError, TreeSysfs

model = pytest.importorskip("apmatrixd.sim.model")

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"
DOMAINS = {0x04, 0x47, 0xAB, 0xFF}
GUEST1 = Matrix(U1, frozenset({5, 6}), frozenset({0x04}), frozenset({0x04}))
GUEST2 = Matrix(U2, frozenset({5, 6}), frozenset({0x47}), frozenset({0x47}))
SCENARIOS = ["default", "default@6.0", "rfc2017"]  # 6.19: ap_config; 6.0: one write per id


class FailingIO(TreeSysfs):
    """Fails the n-th write (1-based) with ``code``; counts every write it sees."""

    def __init__(self, inner: TreeSysfs, fail_at: int, code: int = errno.EIO) -> None:
        super().__init__(inner.tree)
        self.fail_at = fail_at
        self.code = code
        self.writes: list[tuple[str, str]] = []

    def write(self, path: str, data: str) -> None:
        self.writes.append((path, data))
        if len(self.writes) == self.fail_at:
            raise OSError(self.code, "injected", path)
        super().write(path, data)


@pytest.fixture(params=SCENARIOS)
def host(request: pytest.FixtureRequest) -> object:
    return model.Host.from_name(request.param)


@pytest.fixture
def kernel(host: object) -> Kernel:
    return Kernel(TreeSysfs(host))  # type: ignore[arg-type]


def pool_without(kernel: Kernel, pool: HostPool, apqns: Iterable[Apqn]) -> HostPool:
    """The host pool with these APQNs handed to vfio, in the layout's own terms."""
    gone = set(apqns)
    if pool.queues is not None:
        return HostPool(queues=pool.queues - gone)
    # Upstream masks: give away the domains (every adapter of the default host joins in).
    return HostPool(adapters=pool.adapters, domains=pool.domains - {q.domain for q in gone})


def reserve_two_guests(kernel: Kernel) -> HostSnapshot:
    before = kernel.read_host()
    new = pool_without(kernel, before.pool, [*GUEST1.apqns(), *GUEST2.apqns()])
    kernel.set_pool(before.pool, new)
    return kernel.read_host()


def test_read_host_default(kernel: Kernel, host: object) -> None:
    snap = kernel.read_host()
    assert snap.layout == ("rfc2017" if kernel.layout == "rfc2017" else "upstream")
    assert (snap.limits.max_adapter, snap.limits.max_domain) == (255, 255)
    assert sorted(snap.adapters) == [5, 6]
    a5, a6 = snap.adapters[5], snap.adapters[6]
    assert (a5.type, a5.mode, a6.type, a6.mode) == ("CEX5C", "CCA-Coproc", "CEX5A", "Accelerator")
    for a in (a5, a6):
        assert a.online and a.configured
        assert a.domains == DOMAINS
        assert a.guest_domains == frozenset()
        assert a.host_domains == DOMAINS
    every = set(cross({5, 6}, DOMAINS))
    assert all(snap.pool.owns(q) for q in every)
    if kernel.layout == "upstream":
        assert snap.pool.adapters == snap.pool.domains == frozenset(range(256))
    else:
        assert snap.pool.queues == every
    assert snap.mdevs == {}
    if snap.usage_domains is not None:
        assert snap.usage_domains == DOMAINS


def test_two_guests_of_the_design_document(kernel: Kernel) -> None:
    snap = reserve_two_guests(kernel)
    for q in [*GUEST1.apqns(), *GUEST2.apqns()]:
        assert not snap.pool.owns(q)
    assert snap.pool.owns(Apqn(5, 0xAB))
    assert snap.adapters[5].guest_domains == {0x04, 0x47}

    kernel.apply_matrix(U1, None, GUEST1)
    kernel.apply_matrix(U2, None, GUEST2)
    snap = kernel.read_host()
    assert set(snap.mdevs) == {U1, U2}
    for m in (GUEST1, GUEST2):
        got = snap.mdevs[m.uuid]
        assert got.matrix() == m
        assert got.guest_apqns == set(m.apqns())
        assert kernel.read_mdev(m.uuid) == got
        assert kernel.mdev_exists(m.uuid)
    assert kernel.mdev_sysfs_path(U1).endswith(f"/matrix/{U1}")

    # Update in place (drop adapter 06, add control domain ab), then remove.
    smaller = GUEST1.with_sets(adapters={5}, control_domains={0x04, 0xAB})
    kernel.apply_matrix(U1, GUEST1, smaller)
    assert kernel.read_mdev(U1).matrix() == smaller
    kernel.apply_matrix(U1, smaller, None)
    assert not kernel.mdev_exists(U1)
    assert set(kernel.read_host().mdevs) == {U2}


def test_conflicting_matrix_is_refused_and_nothing_changes(kernel: Kernel) -> None:
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    before = kernel.read_host()

    with pytest.raises(KernelError) as info:
        kernel.apply_matrix(U3, None, Matrix(U3, frozenset({5}), frozenset({0x04})))
    assert info.value.errno == errno.EADDRINUSE
    last = "ap_config" if kernel.features.ap_config else "assign_domain"
    assert info.value.path.endswith(f"{U3}/{last}")
    assert "Address already in use" in str(info.value)
    assert kernel.read_host() == before
    assert not kernel.mdev_exists(U3)

    kernel.apply_matrix(U2, None, GUEST2)
    before = kernel.read_host()
    grab = GUEST2.with_sets(adapters={6}, domains={0x04, 0x47})  # 06.0004 is U1's
    with pytest.raises(KernelError) as info:
        kernel.apply_matrix(U2, GUEST2, grab)
    assert info.value.errno == errno.EADDRINUSE
    assert kernel.read_host() == before


def test_host_owned_apqn_is_refused(kernel: Kernel) -> None:
    before = kernel.read_host()
    with pytest.raises(KernelError) as info:
        kernel.apply_matrix(U1, None, GUEST1)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert kernel.read_host() == before


def test_create_rolls_back_on_injected_fault(kernel: Kernel, host: object) -> None:
    """Each attribute the create writes after the mdev (one ``ap_config`` on 6.10+, else one
    file per id), failed in turn: the mdev is gone again and the host as it was."""
    reserve_two_guests(kernel)
    before = kernel.read_host()
    one = Matrix(U1, frozenset({5}), frozenset({0x04}), frozenset({0x04}))
    per_id = ["assign_adapter", "assign_domain", "assign_control_domain"]
    for attr in ["ap_config"] if kernel.features.ap_config else per_id:
        path = f"{kernel.mdev_path(U1)}/{attr}"
        host.inject_fault(path, errno.EIO)  # type: ignore[attr-defined]
        with pytest.raises(KernelError) as info:
            kernel.apply_matrix(U1, None, one)
        assert (info.value.errno, info.value.path) == (errno.EIO, path)
        assert not kernel.mdev_exists(U1)
        assert kernel.read_host() == before


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_failing_write_of_an_update_is_undone(scenario: str) -> None:
    """Fail write 1, 2, ... n of a create-then-update; each time nothing is left behind."""
    new = GUEST1.with_sets(adapters={6}, domains={0x04, 0x47}, control_domains={0xAB})
    n = 0
    while True:
        n += 1
        host = model.Host.from_name(scenario)
        kernel = Kernel(TreeSysfs(host))
        reserve_two_guests(kernel)
        kernel.apply_matrix(U1, None, GUEST1)
        before = kernel.read_host()
        failing = FailingIO(TreeSysfs(host), fail_at=n)
        kernel.io = failing
        try:
            kernel.apply_matrix(U1, GUEST1, new)
        except KernelError as e:
            assert e.errno == errno.EIO
            kernel.io = TreeSysfs(host)
            assert kernel.read_host() == before, f"write {n} left a trace"
            continue
        kernel.io = TreeSysfs(host)
        assert kernel.read_mdev(U1).matrix() == new
        assert n > 1
        break


def test_set_pool_rolls_back_on_injected_fault(kernel: Kernel, host: object) -> None:
    before = kernel.read_host()
    gone = [Apqn(5, 0x04), Apqn(6, 0x47)]
    if kernel.layout == "upstream":
        new = HostPool(before.pool.adapters - {5}, before.pool.domains - {0x47})
        failing = "bus/ap/aqmask"  # apmask is written first, so it must be put back
    else:
        assert before.pool.queues is not None
        new = HostPool(queues=before.pool.queues - set(gone))
        failing = "bus/ap/drivers/vfio_ap_matrix/bind"  # after the first unbind
    host.inject_fault(failing, errno.EIO)  # type: ignore[attr-defined]
    with pytest.raises(KernelError) as info:
        kernel.set_pool(before.pool, new)
    assert (info.value.errno, info.value.path) == (errno.EIO, failing)
    assert kernel.read_host() == before
    kernel.set_pool(before.pool, new)  # the fault was one-shot: now it goes through
    assert kernel.read_host().pool == new


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_failing_write_of_set_pool_is_undone(scenario: str) -> None:
    n = 0
    while True:
        n += 1
        host = model.Host.from_name(scenario)
        kernel = Kernel(TreeSysfs(host))
        before = kernel.read_host()
        if kernel.layout == "upstream":
            new = HostPool(before.pool.adapters - {5}, before.pool.domains - {0x47})
        else:
            assert before.pool.queues is not None
            new = HostPool(queues=before.pool.queues - {Apqn(5, 4), Apqn(6, 0x47)})
        kernel.io = FailingIO(TreeSysfs(host), fail_at=n)
        try:
            kernel.set_pool(before.pool, new)
        except KernelError:
            kernel.io = TreeSysfs(host)
            assert kernel.read_host() == before, f"write {n} left a trace"
            continue
        kernel.io = TreeSysfs(host)
        assert kernel.read_host().pool == new
        break


def test_pool_cannot_take_back_a_held_apqn(kernel: Kernel) -> None:
    snap = reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    before = kernel.read_host()
    if kernel.layout == "upstream":
        back = HostPool(snap.pool.adapters, snap.pool.domains | {0x04})
    else:
        assert snap.pool.queues is not None
        back = HostPool(queues=snap.pool.queues | {Apqn(5, 0x04)})
    with pytest.raises(KernelError) as info:
        kernel.set_pool(snap.pool, back)
    assert info.value.errno == errno.EBUSY
    assert kernel.read_host() == before


class NoGuestMatrix(TreeSysfs):
    """A pre-6.0 kernel: no ``guest_matrix`` file, so the backend computes the guest view."""

    def exists(self, path: str) -> bool:
        return not path.endswith("/guest_matrix") and super().exists(path)

    def read(self, path: str) -> str:
        if path.endswith("/guest_matrix"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return super().read(path)


def guest_views(host: object) -> list[dict[str, frozenset[Apqn]]]:
    """The guest views as the kernel shows them and as the backend computes them."""
    views = []
    for io in (TreeSysfs(host), NoGuestMatrix(host)):  # type: ignore[arg-type]
        snap = Kernel(io).read_host()
        views.append({u: m.guest_apqns for u, m in snap.mdevs.items()})
    return views


def test_guest_view_follows_the_host(kernel: Kernel, host: object) -> None:
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    kernel.apply_matrix(U2, None, GUEST2)
    full = {U1: frozenset(GUEST1.apqns()), U2: frozenset(GUEST2.apqns())}
    assert guest_views(host) == [full, full]

    # One queue leaves vfio: its whole adapter leaves that guest, the other guest keeps it.
    driver = kernel.vfio_driver
    TreeSysfs(host).write(f"bus/ap/drivers/{driver}/unbind", "06.0004")  # type: ignore[arg-type]
    want = {U1: frozenset({Apqn(5, 4)}), U2: full[U2]}
    assert guest_views(host) == [want, want]
    assert kernel.read_host().adapters[6].guest_domains == {0x47}
    TreeSysfs(host).write(f"bus/ap/drivers/{driver}/bind", "06.0004")  # type: ignore[arg-type]
    assert guest_views(host) == [full, full]
    assert {u: kernel.read_guest(u) for u in (U1, U2)} == full

    # Adapter 05 deconfigured, then domain 47 unplugged.
    TreeSysfs(host).write("devices/ap/card05/config", "0")  # type: ignore[arg-type]
    want = {U1: frozenset({Apqn(6, 4)}), U2: frozenset({Apqn(6, 0x47)})}
    assert guest_views(host) == [want, want]
    host.unplug_domain(0x47)  # type: ignore[attr-defined]
    want = {U1: frozenset({Apqn(6, 4)}), U2: frozenset()}
    assert guest_views(host) == [want, want]
    snap = kernel.read_host()
    assert not snap.adapters[5].configured
    assert snap.adapters[6].domains == DOMAINS - {0x47}
    assert snap.mdevs[U2].matrix() == GUEST2  # the assignment stays as written


class Corrupt(TreeSysfs):
    def __init__(self, host: object, path: str, text: str) -> None:
        super().__init__(host)  # type: ignore[arg-type]
        self.path, self.text = path, text

    def read(self, path: str) -> str:
        return self.text if path == self.path else super().read(path)


@pytest.mark.parametrize("attr", ["control_domains", "mdev_file", "bus/ap/ap_max_domain_id"])
def test_malformed_sysfs_is_eio_naming_the_file(kernel: Kernel, host: object, attr: str) -> None:
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    if kernel.features.ap_config and "/" not in attr:
        attr = "ap_config"  # the three sets in one file: the only one read for them
    elif attr == "mdev_file":
        attr = "matrix" if kernel.layout == "upstream" else "adapters"
    path = attr if "/" in attr else f"{kernel.mdev_path(U1)}/{attr}"
    broken = Kernel(Corrupt(host, path, "05.0004\nhello\n"))
    with pytest.raises(KernelError) as info:
        broken.read_host()
    assert (info.value.errno, info.value.path) == (errno.EIO, path)
    assert path in str(info.value) and "malformed" in str(info.value)


def test_tree_io_remembers_plain_paths_but_never_links(kernel: Kernel, host: object) -> None:
    """TreeSysfs caches which paths are not links: gone paths still fail, links still move."""
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    base = kernel.mdev_path(U1)
    assert kernel.read_guest(U1) == frozenset(GUEST1.apqns())
    kernel.remove_mdev(U1)
    assert not kernel.io.exists(f"{base}/control_domains")
    with pytest.raises(OSError) as exc:
        kernel.io.read(f"{base}/control_domains")
    assert exc.value.errno == errno.ENOENT
    kernel.apply_matrix(U1, None, GUEST1)
    assert kernel.read_mdev(U1).matrix() == GUEST1
    link = "bus/ap/devices/06.0004/driver"
    before = kernel.io.readlink(link)
    other = TreeSysfs(host)  # type: ignore[arg-type]
    other.write(f"bus/ap/drivers/{kernel.vfio_driver}/unbind", "06.0004")
    assert not kernel.io.exists(f"{link}/unbind") or kernel.io.readlink(link) != before
    other.write(f"bus/ap/drivers/{kernel.vfio_driver}/bind", "06.0004")
    assert kernel.io.readlink(link) == before
    assert kernel.io.exists(f"{link}/bind")


def test_equal_domain_sets_are_one_object() -> None:
    """The inventory keeps one frozenset per distinct set (memory on a 256 x 256 host)."""
    adapters = Kernel(TreeSysfs(model.Host.from_name("big"))).read_adapters()  # type: ignore[arg-type]
    assert len({id(a.domains) for a in adapters.values()}) < len(adapters) // 8
    assert all(a.domains == adapters[0].domains for a in adapters.values())


class CountingIO(TreeSysfs):
    """Keeps the path of every read (``paths``) and counts the reads of each attribute by
    its name (``reads``)."""

    def __init__(self, host: object) -> None:
        super().__init__(host)  # type: ignore[arg-type]
        self.paths: list[str] = []
        self.reads: Counter[str] = Counter()

    def read(self, path: str) -> str:
        self.paths.append(path)
        self.reads[path.rsplit("/", 1)[-1]] += 1
        return super().read(path)


def test_an_mdevs_sets_are_one_read_where_the_kernel_has_ap_config(
    kernel: Kernel, host: object
) -> None:
    """6.10+ (detected from the mdev's files): ``ap_config`` gives the three sets at once;
    older kernels and rfc2017 read them one file each. Both agree with the full read."""
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    io = CountingIO(host)
    counted = Kernel(io)
    assert counted.read_mdev_sets(U1) == GUEST1 == counted.read_mdev(U1).matrix()
    io.paths.clear()
    counted.read_mdev_sets(U1)
    files = [p.rsplit("/", 1)[1] for p in io.paths]
    if counted.features.ap_config:
        assert files == ["ap_config"]
    elif counted.layout == "upstream":
        assert files == ["control_domains", "matrix"]
    else:
        assert sorted(files) == ["adapters", "control_domains", "domains"]
    kernel.remove_mdev(U1)
    assert counted.read_mdev_sets(U1) is None


def test_malformed_ap_config_is_eio_naming_it() -> None:
    host = model.Host.from_name("default")
    kernel = Kernel(TreeSysfs(host))
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    path = f"{kernel.mdev_path(U1)}/ap_config"
    for text in ("0x" + "0" * 64 + "\n", "0x06,0x08,0x08\n", ",".join(["0x" + "0" * 64] * 4)):
        with pytest.raises(KernelError) as info:
            Kernel(Corrupt(host, path, text)).read_mdev_sets(U1)
        assert (info.value.errno, info.value.path) == (errno.EIO, path)


def test_an_mdev_s_sets_are_one_read_where_the_kernel_has_ap_config(host: object) -> None:
    io = CountingIO(host)
    kernel = Kernel(io)
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    io.reads.clear()
    assert kernel.read_mdev_sets(U1) == GUEST1
    assert kernel.read_mdevs(kernel.read_adapters(), [U1])[U1].matrix() == GUEST1
    if kernel.features.ap_config:
        assert io.reads["ap_config"] == 2
        assert not io.reads.keys() & {"matrix", "control_domains", "adapters", "domains"}
    else:
        assert io.reads["ap_config"] == 0 and io.reads["control_domains"] == 2


def test_an_mdev_whose_sets_read_as_known_keeps_its_guest_view(host: object) -> None:
    """What the rescan timer's slice passes: the guest view is read again only where the
    sets changed; InUse (a guest starting: no uevent) is read in any case."""
    io = CountingIO(host)
    kernel = Kernel(io)
    reserve_two_guests(kernel)
    kernel.apply_matrix(U1, None, GUEST1)
    cards = kernel.read_adapters()
    last = kernel.read_mdevs(cards, [U1])
    assert last[U1].guest_apqns == frozenset(GUEST1.apqns()) and not last[U1].in_use
    host.attach_guest(U1)  # type: ignore[attr-defined]
    io.reads.clear()
    again = kernel.read_mdevs(cards, [U1], last)[U1]
    running = kernel.layout == "upstream"  # the 2017 layout's queues have no status
    assert again == replace(last[U1], in_use=running)
    assert io.reads["guest_matrix"] == 0 and io.reads["status"] == 1
    # A hand edit (no uevent): the sets differ, so the guest view is read as well.
    TreeSysfs(host).write(f"{kernel.mdev_path(U1)}/unassign_adapter", "6")  # type: ignore[arg-type]
    io.reads.clear()
    edited = kernel.read_mdevs(cards, [U1], last)[U1]
    assert edited.adapters == {5} and edited.guest_apqns == {Apqn(5, 4)}
    assert edited.in_use == running
    assert io.reads["guest_matrix"] == (1 if kernel.features.dynamic else 0)
