"""The daemon on each kernel generation: what it detects from sysfs and how it writes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from apmatrixd.core import Busy
from apmatrixd.core.errors import DriverOverride, GuestRunning, Unavailable
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.kernel.errors import KernelTimeout
from apmatrixd.service import Changes, Service, sync
from apmatrixd.sim.model import Host
from apmatrixd.sim.profile import PROFILES
from apmatrixd.store import Store

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"

GENERATIONS = {
    "5.15": "before 6.0",
    "6.0": "6.0+",
    "6.10": "6.10+",
    "6.12": "6.12+",
    "6.15": "6.12+",  # 6.15 adds only an eventfd: sysfs cannot tell it from 6.12
    "6.19": "6.19+",
}


class Counting(TreeSysfs):
    """Every path written, in order."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.paths: list[str] = []

    def write(self, path: str, data: str) -> None:
        self.paths.append(path.rsplit("/", 1)[-1])
        super().write(path, data)


@pytest.mark.parametrize("kernel", sorted(PROFILES))
def test_generation_is_told_from_sysfs(kernel: str) -> None:
    host = Host.from_name(f"default@{kernel}")
    svc = Service(Kernel(TreeSysfs(host)))
    svc.load()
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    svc.kernel.detect_features()
    assert svc.kernel.features.generation == GENERATIONS[kernel]


@pytest.mark.parametrize(("kernel", "writes"), [("6.10", ["ap_config"]), ("6.19", ["ap_config"]),
    ("6.0", ["assign_adapter", "assign_domain", "assign_control_domain"])])  # fmt: skip
def test_update_of_a_live_matrix_is_one_ap_config_write(kernel: str, writes: list[str]) -> None:
    host = Host.from_name(f"default@{kernel}")
    io = Counting(host)
    svc = Service(Kernel(io))
    svc.load()
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    host.attach_guest(G1)
    io.paths.clear()
    svc.update(G1, [5, 6], [4, 0x47], [4, 0x47])
    assert io.paths == writes
    guest = host.guest(G1)
    assert guest is not None and guest.updates == len(writes)  # one hot plug per write
    assert len(svc.matrix(G1).guest_apqns) == 4


# -- the release rule ------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "refused"), [("6.0", False), ("6.15", False), ("6.19", True)])
def test_release_rule_follows_the_generation(kernel: str, refused: bool) -> None:
    """Domain 04 handed back while adapter 05 stays reserved gives the host nothing of G1:
    6.0-6.18 allow it, 6.19 counts every adapter of the domain and says Busy."""
    svc = loaded(kernel)
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    if refused:
        with pytest.raises(Busy):
            svc.release([], [4])
    else:
        svc.release([], [4])
        assert 4 in svc.host.host_domains and 5 not in svc.host.host_adapters
    with pytest.raises(Busy):  # adapter 05 back to the host would take 05.0004: never
        svc.release([5], [])


def loaded(kernel: str, host: Host | None = None) -> Service:
    svc = Service(Kernel(TreeSysfs(host or Host.from_name(f"default@{kernel}"))))
    svc.load()
    return svc


# -- running guests --------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["6.0", "6.19"])
def test_stop_and_remove_of_a_running_guest(kernel: str) -> None:
    host = Host.from_name(f"default@{kernel}")
    svc = loaded(kernel, host)
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    host.attach_guest(G1)
    for refused in (svc.stop, svc.remove):
        with pytest.raises(GuestRunning, match="guest running: matrix .* is in use by a guest"):
            refused(G1)
    assert svc.matrix(G1).in_use and host.exists(svc.kernel.mdev_path(G1))
    # Hot plug into the running guest is fine on 6.0+.
    svc.update(G1, [5, 6], [4], [4])
    guest = host.guest(G1)
    assert guest is not None and guest.updates == 1
    # Forced, with QEMU letting go after a while: the Stop waits, then goes through.
    host.detach_guest(G1)
    host.attach_guest(G1, release_after=0.2)
    svc.stop(G1, force=True)
    assert svc.matrix(G1).state == "defined" and not svc.matrix(G1).in_use
    assert host.guest(G1) is None


def test_a_guest_that_never_lets_go_times_out_and_changes_nothing() -> None:
    host = Host.from_name("default")
    svc = loaded("6.19", host)
    svc.in_use_timeout = 0.3
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    host.attach_guest(G1)  # QEMU ignores the kernel's request
    with pytest.raises(KernelTimeout, match="still holds the matrix") as err:
        svc.remove(G1, force=True, timeout=10)  # asked for more than the daemon allows
    assert err.value.name == "Timeout"
    assert svc.matrix(G1).state == "active"  # nothing changed on our side
    assert svc.state.meta[G1].release_pending == "forced Remove"
    host.detach_guest(G1)  # the guest lets go: the kernel's pending remove completes
    deadline = time.monotonic() + 5
    while host.exists(svc.kernel.mdev_path(G1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    seen: list[Changes] = []
    svc.subscribe(seen.append)
    svc.run(sync.resync, everything=True)
    drift = [text for c in seen for _, text in c.drift]
    assert drift == ["the guest let go: the mdev is gone after the forced Remove timed out; "
                     "kept as a definition"]  # fmt: skip
    assert svc.matrix(G1).state == "defined"
    svc.remove(G1)  # and now it goes
    assert G1 not in svc.registry.matrices


def test_before_60_a_running_guests_matrix_is_fixed() -> None:
    host = Host.from_name("default@5.15")
    svc = loaded("5.15", host)
    svc.reserve([5, 6, 7], [4, 0x47])
    with pytest.raises(Unavailable, match=r"missing: adapter 07 \(no queue bound"):
        svc.create_matrix(G1, adapters=[7], domains=[])  # no card 07: no over-provisioning
    with pytest.raises(Unavailable, match=r"missing: adapter 07 .*, 07.0004"):
        svc.create_matrix(G1, adapters=[5, 7], domains=[4])
    assert G1 not in svc.registry.matrices and svc.kernel.list_mdevs() == []
    svc.create_matrix(G1, adapters=[5], domains=[4])
    assert svc.kernel.features.generation == "before 6.0"
    host.attach_guest(G1)
    with pytest.raises(GuestRunning, match="cannot change a running guest's matrix"):
        svc.update(G1, [5, 6], [4], [4])
    with pytest.raises(GuestRunning, match="even forced"):
        svc.stop(G1, force=True)
    host.detach_guest(G1)
    svc.update(G1, [5, 6], [4], [4])
    svc.stop(G1)


def test_over_provisioned_matrix_says_why_each_apqn_is_lost() -> None:
    host = Host.from_name("default")
    svc = loaded("6.19", host)
    svc.reserve([5, 6, 7], [4, 0x10])
    svc.create_matrix(G1, adapters=[5, 6, 7], domains=[4, 0x10])  # 07 and 0x10 absent: 6.0+ ok
    assert host.write("devices/ap/card06/config", b"0")
    svc.run(sync.resync, everything=True)
    lost = {(a, d): why for a, d, _kind, why in svc.matrix(G1).lost}
    assert lost[(7, 4)] == "adapter 07 is not in the host's configuration"
    assert lost[(6, 4)] == "adapter 06 is deconfigured"
    assert lost[(5, 0x10)].startswith("domain 0010 is not a usage domain of this host")
    kinds = {(a, d): kind for a, d, kind, _why in svc.matrix(G1).lost}
    assert [kinds[(7, 4)], kinds[(6, 4)], kinds[(5, 0x10)]] == [
        "absent",
        "deconfigured",
        "no_queue",
    ]
    assert (5, 4) not in lost and svc.matrix(G1).state == "degraded"


# -- driver_override (6.19) ------------------------------------------------------------------------
def test_driver_override_queues_are_shown_and_refuse_the_masks() -> None:
    host = Host.from_name("default")
    svc = loaded("6.19", host)
    q = "devices/ap/card05/05.0004"
    # The CEX DRA driver's way: override the queue, unbind it from the host, probe again.
    host.write(f"{q}/driver_override", b"vfio_ap")
    host.write("bus/ap/drivers/cex4queue/unbind", b"05.0004")
    host.write("bus/ap/drivers_probe", b"05.0004")
    host.write("devices/ap/card06/06.0047/driver_override", b"dra_parking")
    host.write("bus/ap/drivers/cex4queue/unbind", b"06.0047")
    host.write("bus/ap/drivers_probe", b"06.0047")  # no such driver: stays unbound
    svc.run(sync.resync, everything=True)
    assert svc.adapter(5).overrides == ((4, "vfio_ap"),)
    assert svc.adapter(6).overrides == ((0x47, "dra_parking"),)
    with pytest.raises(DriverOverride, match=r"05.0004 -> vfio_ap, 06.0047 -> dra_parking"):
        svc.reserve([5], [])
    # A queue the override gives to vfio_ap may be claimed; one parked elsewhere may not.
    svc.create_matrix(G1, adapters=[5], domains=[4])
    assert svc.matrix(G1).state == "active"
    with pytest.raises(DriverOverride, match="may not claim them: .*06.0047 -> dra_parking"):
        svc.create_matrix(G2, adapters=[6], domains=[0x47])


def test_an_adapter_assigned_to_a_live_matrix_may_not_claim_a_parked_queue() -> None:
    host = Host.from_name("default")
    svc = loaded("6.19", host)
    for q, driver in (("05.0004", b"vfio_ap"), ("06.0004", b"dra_parking")):
        host.write(f"devices/ap/card{q[:2]}/{q}/driver_override", driver)
        host.write("bus/ap/drivers/cex4queue/unbind", q.encode())
        host.write("bus/ap/drivers_probe", q.encode())
    svc.run(sync.resync, everything=True)
    svc.create_matrix(G1, adapters=[5], domains=[4])  # its queue's override is vfio_ap's
    before = svc.kernel.read_mdev_sets(G1)
    with pytest.raises(DriverOverride, match=r"driver_override: 06.0004 -> dra_parking$"):
        svc.assign(G1, "adapter", 6)
    assert svc.matrix(G1).adapters == (5,) and svc.kernel.read_mdev_sets(G1) == before


def test_an_override_the_inventory_cannot_see_is_named_after_the_kernel_refuses() -> None:
    host = Host.from_name("default")
    svc = loaded("6.19", host)
    host.write("devices/ap/card06/06.00ab/driver_override", b"cex4queue")  # still on cex4queue
    svc.run(sync.resync, everything=True)
    assert svc.adapter(6).overrides == ()
    before = svc.host
    with pytest.raises(DriverOverride, match=r"06.00ab -> cex4queue"):
        svc.reserve([5], [])
    assert svc.host == before and svc.kernel.read_pool() == svc.registry.pool


# -- boot ordering ---------------------------------------------------------------------------------
def test_autostart_waits_for_the_bus_bindings(tmp_path: Path) -> None:
    host = Host.from_name("default")
    first = Service(Kernel(TreeSysfs(host)), store=Store(tmp_path))
    first.load()
    first.reserve([5], [4])
    first.create_matrix(G1, adapters=[5], domains=[4], autostart=True)
    rebooted = Host.from_name("default")  # a new boot, with one queue not yet probed
    rebooted.write("bus/ap/drivers/cex4queue/unbind", b"06.00ff")
    svc = Service(Kernel(TreeSysfs(rebooted)), store=Store(tmp_path))
    svc.load()
    assert not svc.state.bindings_ready and svc.matrix(G1).state == "defined"
    rebooted.write("bus/ap/drivers_probe", b"06.00ff")
    rebooted.scan()  # the bus scan sees every queue bound: BINDINGS=complete
    assert svc.kernel.bindings_complete()
    svc.run(sync.resync, everything=True, bindings=True)
    assert svc.state.bindings_ready and svc.matrix(G1).state == "active"
