"""The 2017 RFC layout: ap_matrix names, per-queue reservation, adapters/domains files."""

from __future__ import annotations

import errno

import pytest

from apmatrixd.sim.model import Host
from apmatrixd.sim.vfs import Uevent

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
DRV = "bus/ap/drivers"


def err(host: Host, path: str, data: str) -> int:
    try:
        host.write(path, data.encode())
    except OSError as exc:
        return exc.errno or -1
    return 0


def text(host: Host, path: str) -> str:
    return host.read(path).decode()


@pytest.fixture
def host() -> Host:
    return Host.from_name("rfc2017")


def create(host: Host, uuid: str) -> str:
    assert err(host, f"{host.mdev_type_dir}/create", uuid) == 0
    return host.mdev_dir(uuid)


def reserve(host: Host, *apqns: str) -> None:
    """The RFC's reservation: unbind from cex4queue, bind to vfio_ap_matrix."""
    for q in apqns:
        assert err(host, f"{DRV}/cex4queue/unbind", q) == 0
        assert err(host, f"{DRV}/vfio_ap_matrix/bind", q) == 0


def test_names(host: Host) -> None:
    assert host.layout == "rfc2017"
    assert host.matrix_dir == "devices/ap_matrix/matrix"
    assert host.mdev_type == "ap_matrix-passthrough"
    assert host.listdir("devices") == ["ap", "ap_matrix"]
    assert host.listdir("bus") == ["ap", "ap_matrix", "mdev"]
    assert sorted(host.listdir(DRV)) == ["cex4card", "cex4queue", "vfio_ap_matrix"]
    assert host.listdir(f"{DRV}/vfio_ap_matrix") == ["bind", "unbind", "uevent"]
    assert "apmask" not in host.listdir("bus/ap") and "aqmask" not in host.listdir("bus/ap")
    assert "features" not in host.listdir(host.matrix_dir)
    assert host.readlink("class/mdev_bus/matrix") == "../../devices/ap_matrix/matrix"
    assert host.readlink(f"{host.matrix_dir}/driver") == "../../../bus/ap_matrix/drivers/ap_matrix"
    assert text(host, "bus/ap/bindings") == "8/8 (complete)\n"
    boot = list(host.boot_uevents())
    assert (boot[-1].devpath, boot[-1].subsystem) == ("/devices/ap_matrix/matrix", "ap_matrix")
    assert all(e.driver in (None, "cex4card", "cex4queue", "ap_matrix") for e in boot)


def test_mdev_files(host: Host) -> None:
    m = create(host, U1)
    assert host.listdir(m)[:9] == [
        "assign_adapter",
        "unassign_adapter",
        "assign_domain",
        "unassign_domain",
        "assign_control_domain",
        "unassign_control_domain",
        "adapters",
        "domains",
        "control_domains",
    ]
    for gone in ("matrix", "guest_matrix", "ap_config"):
        assert gone not in host.listdir(m)
    assert host.readlink(f"{m}/driver") == "../../../../bus/mdev/drivers/vfio_mdev"
    assert host.readlink(f"{m}/mdev_type") == "../mdev_supported_types/ap_matrix-passthrough"
    assert err(host, f"{m}/assign_adapter", "6") == 0
    assert err(host, f"{m}/assign_adapter", "5") == 0
    assert err(host, f"{m}/assign_control_domain", "0xab") == 0
    assert err(host, f"{m}/assign_control_domain", "4") == 0
    assert text(host, f"{m}/adapters") == "05\n06\n"
    assert text(host, f"{m}/domains") == ""
    assert text(host, f"{m}/control_domains") == "0004\n00ab\n"


def test_assign_needs_the_queues_off_cex4queue(host: Host) -> None:
    m = create(host, U1)
    assert err(host, f"{m}/assign_adapter", "5") == 0
    assert err(host, f"{m}/assign_domain", "4") == errno.EADDRNOTAVAIL
    assert err(host, f"{m}/assign_domain", "0x10") == 0  # no such queue: nothing host-owned
    assert err(host, f"{m}/assign_domain", "256") == errno.ENODEV
    assert err(host, f"{m}/assign_domain", "x") == errno.EINVAL
    assert err(host, f"{DRV}/cex4queue/unbind", "05.0004") == 0
    assert err(host, f"{m}/assign_domain", "4") == 0  # driverless is not host-owned
    assert text(host, f"{m}/domains") == "0004\n0010\n"
    assert err(host, f"{DRV}/cex4queue/bind", "05.0004") == errno.EBUSY  # held by the mdev
    assert err(host, f"{DRV}/vfio_ap_matrix/bind", "05.0004") == 0
    q = "devices/ap/card05/05.0004"
    assert host.readlink(f"{q}/driver") == "../../../../bus/ap/drivers/vfio_ap_matrix"
    assert "online" not in host.listdir(q) and "status" not in host.listdir(q)


def test_overlap_is_eaddrinuse(host: Host) -> None:
    reserve(host, "05.0004", "05.0047", "06.0004")
    m1, m2 = create(host, U1), create(host, U2)
    assert err(host, f"{m1}/assign_adapter", "5") == 0
    assert err(host, f"{m1}/assign_domain", "4") == 0
    assert err(host, f"{m2}/assign_adapter", "5") == 0
    assert err(host, f"{m2}/assign_domain", "0x47") == 0  # shared adapter, other domain
    assert err(host, f"{m2}/assign_domain", "4") == errno.EADDRINUSE
    assert err(host, f"{m2}/unassign_adapter", "5") == 0
    assert err(host, f"{m2}/assign_adapter", "6") == errno.EADDRNOTAVAIL  # 06.0047: cex4queue
    assert text(host, f"{m2}/adapters") == "" and text(host, f"{m2}/domains") == "0047\n"


def test_bind_rules(host: Host) -> None:
    assert err(host, f"{DRV}/vfio_ap_matrix/bind", "05.0004") == errno.EBUSY
    assert err(host, f"{DRV}/vfio_ap_matrix/unbind", "05.0004") == errno.ENODEV
    assert err(host, f"{DRV}/vfio_ap_matrix/bind", "card05") == errno.ENODEV
    assert err(host, f"{DRV}/cex4queue/unbind", "05.0004") == 0
    assert text(host, "bus/ap/bindings") == "7/8\n"
    assert err(host, f"{DRV}/cex4queue/bind", "05.0004") == 0  # not held: back to the host


def test_no_uevents_for_matrix_changes_but_some_for_reservation(host: Host) -> None:
    got: list[Uevent] = []
    host.subscribe(got.append)
    reserve(host, "06.00ff")
    assert [(e.action, e.driver) for e in got] == [("unbind", None), ("bind", "vfio_ap_matrix")]
    m = create(host, U1)
    got.clear()
    assert err(host, f"{m}/assign_adapter", "6") == 0
    assert err(host, f"{m}/assign_domain", "0xff") == 0
    assert got == []


def test_plugged_queue_of_a_held_apqn_goes_to_vfio_ap_matrix(host: Host) -> None:
    m = create(host, U1)
    assert err(host, f"{m}/assign_adapter", "7") == 0
    assert err(host, f"{m}/assign_domain", "4") == 0  # adapter 7 is not there yet
    host.plug_adapter(7, "CEX7C")
    assert host.readlink("devices/ap/card07/07.0004/driver").endswith("/vfio_ap_matrix")
    assert host.readlink("devices/ap/card07/07.0047/driver").endswith("/cex4queue")
    assert text(host, "devices/ap/card07/type") == "CEX7C\n"
