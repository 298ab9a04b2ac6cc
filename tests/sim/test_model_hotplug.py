"""Hot plug: adapters and usage domains entering and leaving the LPAR, with the scan's uevents."""

from __future__ import annotations

import errno

import pytest

from apmatrixd.sim.model import Host
from apmatrixd.sim.vfs import Uevent

U1 = "11111111-1111-1111-1111-111111111111"


@pytest.fixture
def host() -> Host:
    return Host.from_name("default")


@pytest.fixture
def events(host: Host) -> list[Uevent]:
    got: list[Uevent] = []
    host.subscribe(got.append)
    return got


def summary(events: list[Uevent]) -> list[tuple[str, str, str | None]]:
    return [(e.action, e.devpath.removeprefix("/devices/ap/"), e.driver) for e in events]


def test_plug_adapter(host: Host, events: list[Uevent]) -> None:
    host.plug_adapter(0x0A, "CEX8P")
    s = summary(events)
    assert s[:4] == [
        ("add", "card0a", None),
        ("bind", "card0a", "cex4card"),
        ("add", "card0a/0a.0004", None),
        ("bind", "card0a/0a.0004", "cex4queue"),
    ]
    assert len(s) == 2 + 2 * 4 + 1
    assert events[-1].env == {"BINDINGS": "complete", "COMPLETECOUNT": "2"}
    assert events[0].env == {"DEV_TYPE": "000E", "MODALIAS": "ap:t0E", "MODE": "ep11"}
    assert host.read("devices/ap/card0a/type") == b"CEX8P\n"
    assert "op_modes" in host.listdir("devices/ap/card0a")
    assert host.read("bus/ap/bindings") == b"12/12 (complete)\n"
    assert [e.seqnum for e in events] == sorted({e.seqnum for e in events})


def test_plug_adapter_outside_the_pool_goes_to_vfio_ap(host: Host) -> None:
    assert host.write("bus/ap/apmask", b"-0x0a") == 5
    host.plug_adapter(0x0A)
    assert host.readlink("devices/ap/card0a/0a.0004/driver").endswith("/vfio_ap")
    assert host.read("devices/ap/card0a/0a.0004/request_count") == b"0\n"  # never cex4queue's


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda h: h.plug_adapter(5), errno.EEXIST),
        (lambda h: h.plug_adapter(256), errno.EINVAL),
        (lambda h: h.plug_adapter(7, "CEX9C"), errno.EINVAL),
        (lambda h: h.unplug_adapter(7), errno.ENODEV),
        (lambda h: h.plug_domain(4), errno.EEXIST),
        (lambda h: h.plug_domain(-1), errno.EINVAL),
        (lambda h: h.unplug_domain(5), errno.ENODEV),
    ],
)
def test_hotplug_refusals(host: Host, call: object, code: int) -> None:
    with pytest.raises(OSError) as exc:
        call(host)  # type: ignore[operator]
    assert exc.value.errno == code


def test_unplug_adapter(host: Host, events: list[Uevent]) -> None:
    host.unplug_adapter(6)
    s = summary(events)
    assert s[:2] == [("unbind", "card06/06.0004", None), ("remove", "card06/06.0004", None)]
    assert s[-2:] == [("unbind", "card06", None), ("remove", "card06", None)]
    assert len(s) == 2 * 4 + 2  # no BINDINGS: no probe happened
    assert not host.exists("devices/ap/card06") and not host.exists("bus/ap/devices/06.0004")
    assert host.read("bus/ap/bindings") == b"4/4 (complete)\n"
    assert events[-1].env["MODE"] == "accel"


def test_plug_and_unplug_domain(host: Host, events: list[Uevent]) -> None:
    host.plug_domain(0x10)
    assert summary(events)[:4] == [
        ("add", "card05/05.0010", None),
        ("bind", "card05/05.0010", "cex4queue"),
        ("add", "card06/06.0010", None),
        ("bind", "card06/06.0010", "cex4queue"),
    ]
    assert host.exists("devices/ap/card06/06.0010")
    assert host.read("bus/ap/ap_usage_domain_mask")[:7] == b"0x08008"  # 04 and 10
    events.clear()
    host.unplug_domain(4)
    assert [a for a, _, _ in summary(events)] == ["unbind", "remove"] * 2
    assert not host.exists("devices/ap/card05/05.0004")


def test_assignment_survives_the_adapter_leaving(host: Host) -> None:
    assert host.write("bus/ap/apmask", b"-5-6") == 4
    create = f"{host.mdev_type_dir}/create"
    host.write(create, U1.encode())
    m = host.mdev_dir(U1)
    host.write(f"{m}/assign_adapter", b"6")
    host.write(f"{m}/assign_domain", b"4")
    assert host.read(f"{m}/guest_matrix") == b"06.0004\n"
    host.unplug_adapter(6)
    assert host.read(f"{m}/matrix") == b"06.0004\n"  # over-provisioning is allowed
    assert host.read(f"{m}/guest_matrix") == b".0004\n"  # adapter gone, domain kept
    host.plug_adapter(6, "CEX5A")
    assert host.read(f"{m}/guest_matrix") == b"06.0004\n"
    assert host.read("bus/ap/devices/06.0004/status") == b"assigned\n"


def test_unbound_queue_blocks_bindings_complete(host: Host, events: list[Uevent]) -> None:
    host.write("bus/ap/drivers/cex4queue/unbind", b"05.0004")
    host.plug_domain(0x20)
    assert not any("BINDINGS" in e.env for e in events)
    host.write("bus/ap/drivers_probe", b"05.0004\n")
    assert host.readlink("devices/ap/card05/05.0004/driver").endswith("/cex4queue")
    host.write("bus/ap/scans", b"1")
    assert events[-1].env == {"BINDINGS": "complete", "COMPLETECOUNT": "2"}


@pytest.mark.parametrize("bad", [None, "5", [1], 1.5, -1, 2**70])
def test_hotplug_with_nonsense_is_oserror(host: Host, bad: object) -> None:
    for call in (host.plug_adapter, host.unplug_adapter, host.plug_domain, host.unplug_domain):
        with pytest.raises(OSError):
            call(bad)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        host.inject_fault("bus/ap/apmask", bad)  # type: ignore[arg-type]
    assert host.internal_errors == []
