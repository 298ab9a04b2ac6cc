"""The service on the in-process emulator: registry first, then kernel, then signal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apmatrixd.core import (
    AlreadyExists,
    ApmatrixError,
    Apqn,
    Busy,
    Conflict,
    HostOwned,
    InvalidArgument,
    NotFound,
)
from apmatrixd.kernel import Kernel, KernelError, TreeSysfs
from apmatrixd.service import Changes, Service, ops
from apmatrixd.service.executor import Command, Progress, Worker
from apmatrixd.sim.model import Host

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
G3 = "33333333-3333-4333-8333-333333333333"
T = TypeVar("T")


@pytest.fixture(params=["default", "default@6.0", "rfc2017"])
def host(request: pytest.FixtureRequest) -> Host:
    return Host.from_name(request.param)


@pytest.fixture
def svc(host: Host) -> Service:
    s = Service(Kernel(TreeSysfs(host)))
    s.load()
    return s


def kernel_view(svc: Service) -> object:
    snap = svc.kernel.read_host()
    return (snap.pool, dict(snap.mdevs))


def test_fresh_host_everything_with_the_host(svc: Service) -> None:
    assert svc.host.layout in ("upstream", "rfc2017")
    assert [a.id for a in svc.adapters()] == [5, 6]
    assert svc.adapter(5).type == "CEX5C" and svc.adapter(5).mode == "CCA-Coproc"
    assert svc.adapter(6).mode == "Accelerator"
    assert svc.matrices() == []
    with pytest.raises(HostOwned):
        svc.create_matrix(G1, adapters=[5], domains=[4])


def test_design_document_two_guests_and_a_refused_third(svc: Service) -> None:
    seen: list[Changes] = []
    svc.subscribe(seen.append)
    svc.reserve([5, 6], [4, 0x47])
    g1 = svc.create_matrix(G1, adapters=[5, 6], domains=[4], name="guest1")
    g2 = svc.create_matrix(G2, adapters=[5, 6], domains=[0x47], name="guest2")
    assert g1.state == "active" and g2.state == "active"
    assert g1.apqns == (Apqn(5, 4), Apqn(6, 4))
    assert set(g1.guest_apqns) == {Apqn(5, 4), Apqn(6, 4)}
    assert g1.control_domains == (4,)  # usage domains are control domains by default
    assert svc.kernel.read_mdev(G1).adapters == {5, 6}
    before = kernel_view(svc)
    with pytest.raises(Conflict) as exc:
        svc.create_matrix(G3, adapters=[6], domains=[0x47], name="guest3")
    assert "06.0047 owned by guest2" in str(exc.value)
    assert kernel_view(svc) == before
    assert G3 not in svc.registry.matrices
    assert svc.adapter(5).owners == {4: G1, 0x47: G2}
    assert seen[0].host_changed and G1 in seen[1].matrices_added
    clashes = [(str(c.apqn), c.owner) for c in svc.check([6, 7], [0x47, 0xAB])]
    if svc.host.layout == "upstream":  # the masks still give the host adapter 07 x domain ab
        assert clashes == [("06.0047", G2), ("07.00ab", "host")]
    else:  # queue by queue: adapter 07 has no queues on this host
        assert clashes == [("06.0047", G2)]
    assert svc.check([6], [0x47], G2) == []


def test_defined_then_started_then_stopped(svc: Service) -> None:
    svc.reserve([5], [])
    m = svc.create_matrix(G1, adapters=[5], domains=[4], start=False, name="g")
    assert m.state == "defined" and not svc.kernel.mdev_exists(G1)
    # A defined matrix keeps its APQNs: nobody else may take them.
    with pytest.raises(Conflict):
        svc.create_matrix(G2, adapters=[5], domains=[4])
    svc.start("g")
    assert svc.matrix(G1).state == "active" and svc.kernel.mdev_exists(G1)
    svc.stop(G1)
    assert svc.matrix(G1).state == "defined" and not svc.kernel.mdev_exists(G1)
    svc.remove(G1)
    with pytest.raises(NotFound):
        svc.matrix(G1)


def test_assign_unassign_and_update(svc: Service) -> None:
    svc.reserve([5, 6], [])
    svc.create_matrix(G1)
    svc.assign(G1, "adapter", 5)
    svc.assign(G1, "domain", 0x47)
    m = svc.matrix(G1)
    assert m.apqns == (Apqn(5, 0x47),) and m.control_domains == (0x47,)
    svc.unassign(G1, "domain", 0x47)
    assert svc.matrix(G1).control_domains == ()
    svc.update(G1, [5, 6], [4, 0xAB], [1])
    assert svc.kernel.read_mdev(G1).control_domains == {1, 4, 0xAB}
    with pytest.raises(InvalidArgument):
        svc.assign(G1, "adapter", 256)
    with pytest.raises(InvalidArgument):
        svc.create_matrix("not-a-uuid")


def test_kernel_failure_half_way_changes_nothing(svc: Service, host: Host) -> None:
    svc.reserve([5, 6], [4, 0x47])
    before = kernel_view(svc)
    last = "ap_config" if svc.kernel.features.ap_config else "assign_adapter"
    host.inject_fault(f"{svc.kernel.mdev_path(G1)}/{last}", errno.EIO, count=2)
    with pytest.raises(KernelError) as exc:
        svc.create_matrix(G1, adapters=[5, 6], domains=[4])
    assert exc.value.errno == errno.EIO
    assert kernel_view(svc) == before
    assert svc.registry.matrices == {}


def test_host_pool_cannot_take_back_held_apqns(svc: Service) -> None:
    svc.reserve([5], [])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    with pytest.raises(Busy):
        svc.release([5], [])
    assert 5 not in svc.host.host_adapters or svc.host.layout == "rfc2017"
    svc.remove(G1)
    svc.release([5], [])
    assert svc.adapter(5).guest_domains == ()


@pytest.mark.parametrize("layout", ["default", "rfc2017"])
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["assign", "unassign", "update"]),
            st.sampled_from([G1, G2]),
            st.sampled_from(["adapter", "domain"]),
            st.sampled_from([5, 6, 4, 0x47, 0xAB]),
        ),
        max_size=12,
    )
)
def test_adapter_owners_follow_every_change(
    layout: str, ops: list[tuple[str, str, str, int]]
) -> None:
    """Only the adapters a change can affect are refreshed; none may be left stale."""
    svc = Service(Kernel(TreeSysfs(Host.from_name(layout))))
    svc.load()
    svc.reserve([5, 6], [4, 0x47, 0xAB])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    svc.create_matrix(G2, adapters=[6], domains=[0x47])
    for op, uuid, kind, id in ops:
        m = svc.registry.get(uuid)
        with contextlib.suppress(ApmatrixError):
            if op == "update":
                a = m.adapters ^ {id} if kind == "adapter" else m.adapters
                d = m.domains ^ {id} if kind == "domain" else m.domains
                svc.update(uuid, a, d, m.control_domains)
            else:
                getattr(svc, op)(uuid, kind, id)
        for view in svc.adapters():
            assert view.owners == svc.registry.owners_of_adapter(view.id), (op, uuid, kind, id)


# -- Update's modes, Configure ----------------------------------------------------------------
@pytest.fixture
def two(svc: Service) -> Service:
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, name="g1", adapters=[5], domains=[4, 0x47], control_domains=[1])
    return svc


def sets(svc: Service, uuid: str = G1) -> tuple[tuple[int, ...], ...]:
    m = svc.matrix(uuid)
    return m.adapters, m.domains, m.control_domains


def test_update_modes_change_only_what_they_name(two: Service) -> None:
    assert sets(two) == ((5,), (4, 0x47), (1, 4, 0x47))
    two.update(G1, [6], [], [], mode="add", sets=["adapters"])
    assert sets(two) == ((5, 6), (4, 0x47), (1, 4, 0x47))
    two.update(G1, [], [0x47], [], mode="remove", sets=["domains"])  # takes its control domain
    assert sets(two) == ((5, 6), (4,), (1, 4))
    two.update(G1, [], [0x47], [], mode="add", sets=["domains"])
    assert sets(two) == ((5, 6), (4, 0x47), (1, 4, 0x47))
    # usage domains replaced: theirs go, the control domain of its own (01) stays
    two.update(G1, [], [], [], mode="set", sets=["adapters", "domains"])
    assert sets(two) == ((), (), (1,))
    two.update(G1, [5], [4], [], mode="set", sets=["adapters", "domains"])
    # control domains set to none: the usage domain stays one (ControlUsageDomains)
    two.update(G1, [], [], [], mode="set", sets=["control_domains"])
    assert sets(two) == ((5,), (4,), (4,))
    assert two.matrix(G1).control_usage_domains
    # one id at a time, the same rule: a usage domain stays a control domain, one removed
    # takes its control domain along
    two.unassign(G1, "control_domain", 4)
    assert sets(two) == ((5,), (4,), (4,))
    two.assign(G1, "domain", 0x47)
    two.unassign(G1, "domain", 4)
    assert sets(two) == ((5,), (0x47,), (0x47,))
    two.update(G1, [5], [4], [], mode="set", sets=["adapters", "domains"])
    for mode, which in (("merge", ["domains"]), ("set", ["queues"]), ("set", [])):
        with pytest.raises(InvalidArgument):
            two.update(G1, [], [], [], mode=mode, sets=which)
    assert sets(two) == ((5,), (4,), (4,))


def test_two_callers_adding_at_once_both_land(two: Service) -> None:
    """Each add is decided on the sets as they are when it runs, not as its caller read
    them: queued behind one another, both adapters end up assigned."""

    async def both() -> None:
        a = two.submit("Update", ops.update, G1, [6], [], [], "add", ["adapters"])
        b = two.submit("Update", ops.update, G1, [], [0x47], [], "remove", ["domains"])
        await asyncio.gather(a, b)

    asyncio.run(both())
    assert sets(two) == ((5, 6), (4,), (1, 4))


def test_configure_renames_and_sets_autostart(two: Service) -> None:
    two.create_matrix(G2, name="g2", adapters=[6], domains=[4])
    two.configure(G1, name="guest-one", autostart=True)
    m = two.matrix(G1)
    assert (m.name, m.autostart) == ("guest-one", True)
    assert two.matrix("guest-one").uuid == G1
    with pytest.raises(AlreadyExists):
        two.configure(G1, name="g2")
    for bad in ("a b", "a/b", "x;y", "cafe", "1111", "x" * 256):
        with pytest.raises(InvalidArgument):
            two.configure(G1, name=bad)
        with pytest.raises(InvalidArgument):
            two.create_matrix(G3, name=bad, adapters=[6], domains=[0x47])
    two.configure(G1, autostart=False)
    m = two.matrix(G1)
    assert (m.name, m.autostart) == ("guest-one", False)


class CountingWorker(Worker):
    """The executor's worker thread, counting the hand-offs to it."""

    def __init__(self) -> None:
        super().__init__("test-counting-worker")
        self.handoffs = 0

    def run(self, fn: Callable[[], T], progress: Progress | None = None) -> asyncio.Future[T]:
        self.handoffs += 1
        return super().run(fn, progress)


def test_a_change_reads_its_guest_view_in_its_own_worker_step(two: Service) -> None:
    """Assign, CreateMatrix and Start of a live matrix hand the worker one step each: the
    transaction reads the guest view after its writes, not a second step."""

    async def handoffs(op: Callable[..., Command[Any]], *args: Any, **kw: Any) -> int:
        worker = CountingWorker()
        two.executor._worker = worker  # the one the executor would start itself
        await two.submit("test", op, *args, **kw)
        return worker.handoffs

    async def go() -> None:
        assert await handoffs(ops.change_one, G1, "adapter", 6, add=True) == 1
        want = tuple(sorted(two.kernel.read_guest(G1)))
        assert two.matrix(G1).guest_apqns == want and Apqn(6, 4) in want
        assert await handoffs(ops.create_matrix, G2, adapters=[5], domains=[0xAB]) == 1
        assert two.matrix(G2).guest_apqns == tuple(sorted(two.kernel.read_guest(G2)))
        two.executor.close()
        two.stop(G2)
        assert await handoffs(ops.start, G2) == 1
        assert two.matrix(G2).state == "active"
        two.executor.close()

    asyncio.run(go())


class GuestUnreadable(TreeSysfs):
    """``guest_matrix`` fails to read while ``broken``."""

    broken = False

    def read(self, path: str) -> str:
        if self.broken and path.endswith("/guest_matrix"):
            raise OSError(errno.EIO, "injected", path)
        return super().read(path)


def test_a_guest_view_unreadable_after_a_change_keeps_the_change_and_asks_a_resync() -> None:
    io = GuestUnreadable(Host.from_name("default"))
    svc = Service(Kernel(io))
    svc.load()
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    asked: list[bool] = []
    svc.on_resync = lambda: asked.append(True)
    io.broken = True
    svc.assign(G1, "adapter", 6)  # done and stored: the read after it undoes nothing
    assert svc.kernel.read_mdev_sets(G1).adapters == {5, 6}  # type: ignore[union-attr]
    assert svc.matrix(G1).adapters == (5, 6)
    assert svc.matrix(G1).guest_apqns == (Apqn(5, 4),)  # the last view read stands
    assert asked == [True]
