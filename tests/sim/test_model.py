"""The emulated host on the upstream layout: tree, formats, errno order, guest view, uevents."""

from __future__ import annotations

import dataclasses
import errno
import threading
from pathlib import Path

import pytest

from apmatrixd.sim.model import Host
from apmatrixd.sim.vfs import Uevent

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"
ZERO64 = "0" * 64
FULL = "0x" + "f" * 64 + "\n"


def err(host: Host, path: str, data: bytes | str) -> int:
    """0 on success, else the errno of the write."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        assert host.write(path, raw) == len(raw[:4096])
    except OSError as exc:
        return exc.errno or -1
    return 0


def text(host: Host, path: str) -> str:
    return host.read(path).decode()


def create(host: Host, uuid: str) -> str:
    assert err(host, f"{host.mdev_type_dir}/create", uuid) == 0
    return host.mdev_dir(uuid.lower())


@pytest.fixture
def host() -> Host:
    return Host.from_name("default")


@pytest.fixture
def events(host: Host) -> list[Uevent]:
    got: list[Uevent] = []
    host.subscribe(got.append)
    return got


def release(host: Host, adapters: str = "-5-6", domains: str | None = None) -> None:
    """Hand APQNs to vfio_ap, as an admin would before assigning them."""
    assert err(host, "bus/ap/apmask", adapters) == 0
    if domains is not None:
        assert err(host, "bus/ap/aqmask", domains) == 0


# ----------------------------------------------------------------- the tree


def test_names_and_limits(host: Host) -> None:
    assert host.layout == "upstream"
    assert host.matrix_dir == "devices/vfio_ap/matrix"
    assert host.mdev_type == "vfio_ap-passthrough"
    assert (host.max_adapter_id, host.max_domain_id) == (255, 255)
    assert isinstance(host.lock, type(threading.RLock()))


def test_tree_shape(host: Host) -> None:
    assert host.listdir("") == ["bus", "class", "devices"]
    assert host.listdir("devices") == ["ap", "vfio_ap"]
    assert [n for n in host.listdir("devices/ap") if n.startswith("card")] == ["card05", "card06"]
    assert host.listdir("bus/ap/devices")[:2] == ["card05", "05.0004"]
    assert sorted(host.listdir("bus/ap/drivers")) == ["cex4card", "cex4queue", "vfio_ap"]
    assert set(host.listdir(host.matrix_dir)) >= {
        "features",
        "mdev_supported_types",
        "driver",
        "subsystem",
        "uevent",
    }
    assert text(host, f"{host.matrix_dir}/features") == "guest_matrix hotplug ap_config\n"
    t = host.mdev_type_dir
    assert text(host, f"{t}/available_instances") == "65536\n"
    assert text(host, f"{t}/name") == "VFIO AP Passthrough Device\n"
    assert text(host, f"{t}/device_api") == "vfio-ap\n"
    assert host.listdir(f"{t}/devices") == []
    assert host.readlink("class/mdev_bus/matrix") == "../../devices/vfio_ap/matrix"
    assert host.readlink("bus/matrix/devices/matrix") == "../../../devices/vfio_ap/matrix"
    assert host.readlink(f"{host.matrix_dir}/driver") == "../../../bus/matrix/drivers/vfio_ap"


def test_links_resolve_like_the_vfs(host: Host) -> None:
    assert host.kind("bus/ap/devices/card05") == "link"
    assert host.readlink("bus/ap/devices/card05") == "../../../devices/ap/card05"
    assert host.kind("bus/ap/devices/card05/") == "dir"
    assert text(host, "bus/ap/devices/card05/type") == "CEX5C\n"
    assert text(host, "bus/ap/devices/05.00ab/online") == "1\n"
    assert host.readlink("devices/ap/card05/driver") == "../../../bus/ap/drivers/cex4card"
    assert (
        host.readlink("devices/ap/card05/05.0004/driver") == "../../../../bus/ap/drivers/cex4queue"
    )
    assert host.readlink("bus/ap/drivers/cex4queue/06.00ff") == (
        "../../../../devices/ap/card06/06.00ff"
    )
    assert text(host, "devices/ap/card05/../card06/hwtype") == "11\n"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("nope", errno.ENOENT),
        ("devices/ap/card07", errno.ENOENT),
        ("devices/ap/card5", errno.ENOENT),
        ("devices/ap/card05/05.0005", errno.ENOENT),
        ("devices/ap/card05/06.0004", errno.ENOENT),
        ("bus/ap/apmask/x", errno.ENOTDIR),
        ("devices/ap\0", errno.ENOENT),
    ],
)
def test_lookup_errors(host: Host, path: str, code: int) -> None:
    with pytest.raises(OSError) as exc:
        host.kind(path)
    assert exc.value.errno == code


def test_modes_and_permissions(host: Host) -> None:
    m = create(host, U1)
    assert host.mode("bus/ap/apmask") == 0o644
    assert host.mode("bus/ap/ap_max_domain_id") == 0o444
    assert host.mode(f"{m}/assign_adapter") == 0o200
    assert host.mode(f"{m}/matrix") == 0o444
    assert host.mode(m) == 0o755 and host.mode(f"{m}/mdev_type") == 0o777
    assert err(host, f"{m}/matrix", "5") == errno.EACCES
    assert err(host, "devices/ap/card05/hwtype", "5") == errno.EACCES
    with pytest.raises(OSError) as exc:
        host.read(f"{m}/assign_adapter")
    assert exc.value.errno == errno.EACCES
    with pytest.raises(OSError) as exc:
        host.read(m)
    assert exc.value.errno == errno.EISDIR
    assert err(host, m, "x") == errno.EISDIR


def test_card_and_queue_attributes(host: Host) -> None:
    c = "devices/ap/card05"
    assert text(host, f"{c}/hwtype") == "11\n" and text(host, f"{c}/raw_hwtype") == "11\n"
    assert text(host, f"{c}/modalias") == "ap:t0B\n"
    assert text(host, f"{c}/ap_functions").startswith("0x") and text(host, f"{c}/config") == "1\n"
    assert text(host, "devices/ap/card06/type") == "CEX5A\n"
    assert text(host, f"{c}/uevent") == (
        "DEVTYPE=ap_card\nDRIVER=cex4card\nDEV_TYPE=000B\nMODALIAS=ap:t0B\nMODE=cca\n"
    )
    q = f"{c}/05.0047"
    assert {"online", "mkvps", "driver", "request_count", "config"} <= set(host.listdir(q))
    assert "status" not in host.listdir(q)
    assert text(host, f"{q}/uevent") == "DEVTYPE=ap_queue\nDRIVER=cex4queue\nMODE=cca\n"
    assert text(host, f"{q}/mkvps").count("\n") == 9


def test_bus_attributes(host: Host) -> None:
    b = "bus/ap"
    assert text(host, f"{b}/apmask") == FULL and text(host, f"{b}/aqmask") == FULL
    assert text(host, f"{b}/ap_max_adapter_id") == "255\n"
    assert text(host, f"{b}/ap_adapter_mask") == "0x06" + "0" * 62 + "\n"
    usage = mask(4, 0x47, 0xAB, 0xFF) + "\n"
    assert text(host, f"{b}/ap_usage_domain_mask") == usage
    assert text(host, f"{b}/ap_control_domain_mask") == usage
    assert text(host, f"{b}/bindings") == "8/8 (complete)\n"
    assert text(host, f"{b}/ap_domain") == "4\n"
    assert err(host, f"{b}/ap_domain", "0x47") == 0 and text(host, f"{b}/ap_domain") == "71\n"
    assert err(host, f"{b}/ap_domain", "256") == errno.EINVAL
    assert err(host, f"{b}/config_time", "4") == errno.EINVAL
    assert err(host, f"{b}/config_time", "60") == 0
    # With adapter interrupts in use the kernel never starts the poll thread: the write
    # succeeds and poll_thread stays 0 (ap_poll_thread_start returns early on ap_irq_flag).
    assert text(host, f"{b}/ap_interrupts") == "1\n"
    assert err(host, f"{b}/poll_thread", "y") == 0 and text(host, f"{b}/poll_thread") == "0\n"
    polled = Host(dataclasses.replace(host.scenario, interrupts=False))
    assert text(polled, f"{b}/ap_interrupts") == "0\n"
    assert err(polled, f"{b}/poll_thread", "y") == 0 and text(polled, f"{b}/poll_thread") == "1\n"
    assert err(polled, f"{b}/poll_thread", "x") == errno.EINVAL
    assert "APXA" in text(host, f"{b}/features")


# ----------------------------------------------------------------- mdev core


def test_create_rules(host: Host, events: list[Uevent]) -> None:
    t = f"{host.mdev_type_dir}/create"
    upper = "ABCDEF01-2345-6789-ABCD-EF0123456789"
    assert err(host, t, upper + "\n") == 0
    assert host.kind(host.mdev_dir(upper.lower())) == "dir"
    assert err(host, t, upper.lower()) == errno.EEXIST
    assert err(host, t, U1[:-1]) == errno.EINVAL  # 35 bytes
    assert err(host, t, U1 + "\n\n") == errno.EINVAL  # 38 bytes
    assert err(host, t, U1[:-1] + "g") == errno.EINVAL
    assert err(host, t, U1 + "x") == 0  # the 37th byte is not looked at
    assert text(host, f"{host.mdev_type_dir}/available_instances") == "65534\n"
    assert host.readlink(f"{host.mdev_type_dir}/devices/{U1}") == f"../../../{U1}"
    assert host.readlink(f"bus/mdev/devices/{U1}") == f"../../../devices/vfio_ap/matrix/{U1}"
    m = host.mdev_dir(U1)
    assert host.readlink(f"{m}/mdev_type") == "../mdev_supported_types/vfio_ap-passthrough"
    assert [(e.action, e.subsystem, e.driver) for e in events] == [
        ("add", "mdev", None),
        ("bind", "mdev", "vfio_ap_mdev"),
    ] * 2
    assert events[0].devpath == f"/devices/vfio_ap/matrix/{upper.lower()}"


def test_remove(host: Host, events: list[Uevent]) -> None:
    m = create(host, U1)
    assert err(host, f"{m}/remove", "0") == 0 and host.exists(m)
    assert err(host, f"{m}/remove", "junk") == errno.EINVAL
    assert err(host, f"{m}/remove", "99999999999999999999999") == errno.EINVAL  # not ERANGE
    assert err(host, f"{m}/remove", "1\n") == 0 and not host.exists(m)
    assert [e.action for e in events] == ["add", "bind", "unbind", "remove"]
    assert text(host, f"{host.mdev_type_dir}/available_instances") == "65536\n"


def test_mdev_attributes_in_kernel_order(host: Host) -> None:
    m = create(host, U1)
    assert host.listdir(m)[:10] == [
        "assign_adapter",
        "unassign_adapter",
        "assign_domain",
        "unassign_domain",
        "assign_control_domain",
        "unassign_control_domain",
        "ap_config",
        "control_domains",
        "matrix",
        "guest_matrix",
    ]
    assert {"remove", "mdev_type", "driver", "subsystem", "uevent"} <= set(host.listdir(m))
    assert text(host, f"{m}/matrix") == "" and text(host, f"{m}/control_domains") == ""
    assert text(host, f"{m}/ap_config") == f"0x{ZERO64},0x{ZERO64},0x{ZERO64}\n"


# ----------------------------------------------------------------- assign rules


def test_assign_errno_order(host: Host) -> None:
    m = create(host, U1)
    a = f"{m}/assign_adapter"
    assert err(host, a, "junk") == errno.EINVAL
    assert err(host, a, "08") == errno.EINVAL
    assert err(host, a, "-1") == errno.EINVAL
    assert err(host, a, "18446744073709551616") == errno.ERANGE
    assert err(host, a, "256") == errno.ENODEV
    assert err(host, a, "5") == 0  # empty AQM: the cross product is empty, so it is fine
    assert err(host, f"{m}/assign_domain", "4") == errno.EADDRNOTAVAIL  # 05.0004 is the host's
    release(host)
    assert err(host, f"{m}/assign_domain", "4") == 0
    assert text(host, f"{m}/matrix") == "05.0004\n"
    assert err(host, a, "5") == 0  # idempotent


def test_number_forms(host: Host) -> None:
    release(host, "-0-255", "-0-255")
    m = create(host, U1)
    for form in ("47", "0x2f", "057", "+47", "47\n", "0X2F"):
        assert err(host, f"{m}/assign_domain", form) == 0
    assert text(host, f"{m}/matrix") == ".002f\n"
    assert err(host, f"{m}/assign_domain", "047") == 0  # octal: 39
    assert text(host, f"{m}/matrix") == ".0027\n.002f\n"


def test_matrix_formats(host: Host) -> None:
    release(host, "-0-255", "-0-255")
    m = create(host, U1)
    assert err(host, f"{m}/assign_adapter", "6") == 0
    assert err(host, f"{m}/assign_adapter", "0x05") == 0
    assert text(host, f"{m}/matrix") == "05.\n06.\n"
    assert err(host, f"{m}/unassign_adapter", "5") == 0
    assert err(host, f"{m}/unassign_adapter", "6") == 0
    assert err(host, f"{m}/assign_domain", "0xab") == 0
    assert err(host, f"{m}/assign_domain", "4") == 0
    assert text(host, f"{m}/matrix") == ".0004\n.00ab\n"
    assert err(host, f"{m}/assign_adapter", "5") == 0
    assert text(host, f"{m}/matrix") == "05.0004\n05.00ab\n"
    assert err(host, f"{m}/assign_control_domain", "0xff") == 0
    assert err(host, f"{m}/assign_control_domain", "7") == 0
    assert text(host, f"{m}/control_domains") == "0007\n00ff\n"
    apm, aqm, adm = text(host, f"{m}/ap_config").rstrip("\n").split(",")
    assert apm == "0x04" + "0" * 62
    assert aqm == "0x08" + "0" * 40 + "10" + "0" * 20
    assert adm == "0x01" + "0" * 60 + "01"


def test_unassign_checks_range_only(host: Host) -> None:
    m = create(host, U1)
    for kind in ("adapter", "domain", "control_domain"):
        assert err(host, f"{m}/unassign_{kind}", "9") == 0
        assert err(host, f"{m}/unassign_{kind}", "256") == errno.ENODEV
        assert err(host, f"{m}/unassign_{kind}", "x") == errno.EINVAL


def test_kernel_doc_example_1_shared_adapter_different_domains(host: Host) -> None:
    release(host, "-5-6")
    m1, m2 = create(host, U1), create(host, U2)
    for path, data in ((m1, "4"), (m2, "0x47")):
        assert err(host, f"{path}/assign_adapter", "5") == 0
        assert err(host, f"{path}/assign_domain", data) == 0
    assert text(host, f"{m1}/matrix") == "05.0004\n"
    assert text(host, f"{m2}/matrix") == "05.0047\n"


def test_kernel_doc_example_3_overlap_is_eaddrinuse(host: Host) -> None:
    release(host, "-5-6")
    m1, m2 = create(host, U1), create(host, U2)
    assert err(host, f"{m1}/assign_adapter", "5") == 0
    assert err(host, f"{m1}/assign_adapter", "6") == 0
    assert err(host, f"{m1}/assign_domain", "4") == 0
    assert err(host, f"{m2}/assign_domain", "4") == 0
    assert err(host, f"{m2}/assign_adapter", "6") == errno.EADDRINUSE
    assert text(host, f"{m2}/matrix") == ".0004\n"  # rolled back
    assert host.dmesg[-1] == (
        f"vfio_ap_mdev {U2}: Userspace may not assign queue 06.0004 to mdev: "
        f"already assigned to {U1}"
    )


def test_sharing_names_the_newest_holder_and_follows_every_change(host: Host) -> None:
    """vfio_ap walks its head-inserted mdev list: of two holders the newer is named. Who
    holds an APQN must follow assign, unassign, ap_config and remove alike."""
    release(host, "-5-6")
    m1, m2, m3 = create(host, U1), create(host, U2), create(host, U3)
    assert err(host, f"{m1}/ap_config", f"{mask(5)},{mask(4)},{mask()}") == 0
    assert err(host, f"{m2}/assign_adapter", "6") == 0
    assert err(host, f"{m2}/assign_domain", "4") == 0
    both = f"{mask(5, 6)},{mask(4)},{mask()}"
    assert err(host, f"{m3}/ap_config", both) == errno.EADDRINUSE
    assert host.dmesg[-1].endswith(f"queue 06.0004 to mdev: already assigned to {U2}")
    assert text(host, "bus/ap/devices/06.0004/status") == "assigned\n"
    assert err(host, f"{m2}/unassign_adapter", "6") == 0
    assert text(host, "bus/ap/devices/06.0004/status") == "unassigned\n"
    assert err(host, f"{m3}/ap_config", both) == errno.EADDRINUSE
    assert host.dmesg[-1].endswith(f"queue 05.0004 to mdev: already assigned to {U1}")
    assert err(host, f"{m1}/ap_config", f"{mask(6)},{mask(4)},{mask()}") == 0  # 05 let go
    assert text(host, "bus/ap/devices/05.0004/status") == "unassigned\n"
    assert err(host, f"{m3}/assign_adapter", "5") == 0
    assert err(host, f"{m3}/assign_domain", "4") == 0
    assert err(host, f"{m3}/assign_adapter", "6") == errno.EADDRINUSE
    assert err(host, f"{m1}/remove", "1") == 0
    assert err(host, f"{m3}/assign_adapter", "6") == 0  # the removed mdev holds nothing
    assert text(host, f"{m3}/matrix") == "05.0004\n06.0004\n"
    assert err(host, f"{m2}/assign_adapter", "5") == errno.EADDRINUSE
    assert text(host, f"{m2}/matrix") == ".0004\n"


def test_sharers_by_the_mdev_list_and_by_the_adapter_index_agree(host: Host) -> None:
    """The holders of an APQN are found by the kernel's walk of the mdev list, or through the
    adapter index where the mdevs outnumber the adapters asked about: the same, newest first."""
    assert err(host, "bus/ap/apmask", "0x" + ZERO64) == 0
    uuids = [f"{i:08x}-0000-0000-0000-000000000000" for i in range(1, 6)]
    for i, u in enumerate(uuids, 1):  # adapters overlapping widely, one domain each
        m = create(host, u)
        assert err(host, f"{m}/ap_config", f"{mask(*range(i, 12 + i))},{mask(i)},{mask()}") == 0
    newest_first = [host.mdevs[u] for u in reversed(uuids)]
    for apm in ({3}, {16}, set(range(20)), set(range(40))):  # the index, then the list
        for aqm in ({1}, {2, 4}, {1, 3, 5}, {9}):
            want = [m for m in newest_first if m.apm & apm and m.aqm & aqm]
            assert host.sharers(uuids[0], apm, aqm) == [m for m in want if m.uuid != uuids[0]]
            assert host.sharers("", apm, aqm) == want
    m6 = create(host, "66666666-0000-0000-0000-000000000000")
    wide = f"{mask(*range(40))},{mask(2, 4)},{mask()}"
    assert err(host, f"{m6}/ap_config", wide) == errno.EADDRINUSE
    assert host.dmesg[-1].endswith(f"queue 0f.0004 to mdev: already assigned to {uuids[3]}")
    assert err(host, f"{m6}/assign_adapter", "4") == 0
    assert err(host, f"{m6}/assign_domain", "2") == errno.EADDRINUSE  # the index: few adapters
    assert host.dmesg[-1].endswith(f"queue 04.0002 to mdev: already assigned to {uuids[1]}")


def test_control_domains_are_shareable_and_unchecked(host: Host) -> None:
    m1, m2 = create(host, U1), create(host, U2)
    for m in (m1, m2):
        assert err(host, f"{m}/assign_control_domain", "4") == 0  # in the host pool: fine
    assert err(host, f"{m1}/assign_control_domain", "256") == errno.ENODEV


def test_design_document_example(host: Host) -> None:
    """Two guests on the 2017 document's host: adapters 05/06, domains 04/47/ab/ff."""
    assert err(host, "bus/ap/aqmask", "-4,-0x47,-0xab") == 0  # domain ff stays the host's
    g1, g2 = create(host, U1), create(host, U2)
    for a in ("5", "6"):
        assert err(host, f"{g1}/assign_adapter", a) == 0
    assert err(host, f"{g1}/assign_domain", "4") == 0
    assert err(host, f"{g1}/assign_control_domain", "4") == 0
    for d in ("0x47", "0xab"):
        assert err(host, f"{g2}/assign_domain", d) == 0
    assert err(host, f"{g2}/assign_adapter", "5") == 0
    assert err(host, f"{g2}/assign_domain", "4") == errno.EADDRINUSE
    assert err(host, f"{g2}/assign_domain", "0xff") == errno.EADDRNOTAVAIL  # still the host's
    assert text(host, f"{g1}/guest_matrix") == "05.0004\n06.0004\n"
    assert text(host, f"{g2}/guest_matrix") == "05.0047\n05.00ab\n"
    assert text(host, "bus/ap/devices/05.0004/status") == "assigned\n"
    assert text(host, "bus/ap/devices/06.0047/status") == "unassigned\n"
    assert text(host, "bus/ap/devices/05.00ff/online") == "1\n"


# ----------------------------------------------------------------- ap_config


def mask(*ids: int) -> str:
    value = 0
    for i in ids:
        value |= 1 << (255 - i)
    return f"0x{value:064x}"


def test_a_recreated_mdev_is_a_new_one(host: Host) -> None:
    """Removed and created again under the same UUID, an mdev starts empty, and its files
    write to the new one (the tree keeps an mdev's directory while that mdev stands)."""
    release(host, "-0-255")
    m = create(host, U1)
    assert err(host, f"{m}/assign_adapter", "5") == 0
    assert err(host, f"{m}/assign_domain", "4") == 0
    assert text(host, f"{m}/matrix") == "05.0004\n"
    assert err(host, f"{m}/remove", "1") == 0
    assert not host.exists(m)
    m = create(host, U1)
    assert text(host, f"{m}/matrix") == ""
    assert err(host, f"{m}/assign_adapter", "6") == 0
    assert err(host, f"{m}/assign_domain", "0x47") == 0
    assert text(host, f"{m}/matrix") == "06.0047\n"
    assert text(host, f"{m}/guest_matrix") == "06.0047\n"
    assert host.mdevs[U1].apm == {6}


def test_ap_config_round_trip_and_atomic(host: Host, events: list[Uevent]) -> None:
    release(host)
    m = create(host, U1)
    before = len(events)
    value = f"{mask(5, 6)},{mask(4, 0x47)},{mask(4)}\n"
    assert err(host, f"{m}/ap_config", value) == 0
    assert text(host, f"{m}/ap_config") == value
    assert text(host, f"{m}/matrix") == "05.0004\n05.0047\n06.0004\n06.0047\n"
    assert err(host, f"{m}/ap_config", value) == 0  # same value: a no-op
    assert err(host, f"{m}/ap_config", f"{mask(5)},{mask(4)}\n") == 0  # third mask empty
    assert text(host, f"{m}/matrix") == "05.0004\n"
    assert len(events) == before  # vfio_ap sends nothing


@pytest.mark.parametrize(
    "value",
    ["0x1,0x2", "0X1,0x2,0x3", "0x1,0x2,0xg", "0x1 ,0x2,0x3", "0x" + "0" * 65 + ",0,0"],
)
def test_ap_config_einval(host: Host, value: str) -> None:
    m = create(host, U1)
    assert err(host, f"{m}/ap_config", value) == errno.EINVAL


def test_ap_config_error_order() -> None:
    host = Host.from_name(str(Path(__file__).with_name("noapxa.toml")))
    assert (host.max_adapter_id, host.max_domain_id) == (63, 15)
    m1, m2 = create(host, U1), create(host, U2)
    cfg = f"{m1}/ap_config"
    # adapter 5 x domain 4 is in the pool and adapter 64 is out of range: the pool wins.
    assert err(host, cfg, f"{mask(5, 64)},{mask(4)},{mask()}") == errno.EADDRNOTAVAIL
    assert err(host, "bus/ap/apmask", "-5,-64") == 0
    assert err(host, f"{m2}/ap_config", f"{mask(5)},{mask(4)},{mask()}") == 0
    assert err(host, cfg, f"{mask(5, 64)},{mask(4)},{mask()}") == errno.EADDRINUSE
    assert err(host, cfg, f"{mask(64)},{mask(4)},{mask()}") == errno.ENODEV
    assert err(host, cfg, f"{mask()},{mask()},{mask(16)}") == errno.ENODEV
    assert text(host, f"{m1}/matrix") == ""
    assert err(host, f"{m1}/assign_adapter", "64") == errno.ENODEV
    assert err(host, f"{m1}/assign_domain", "16") == errno.ENODEV


# ----------------------------------------------------------------- apmask / aqmask


def test_mask_change_reprobes_and_announces(host: Host, events: list[Uevent]) -> None:
    assert err(host, "bus/ap/apmask", "-6") == 0
    props = [e.properties() for e in events]
    assert [(p["ACTION"], p["DEVPATH"], p.get("DRIVER")) for p in props[:2]] == [
        ("unbind", "/devices/ap/card06/06.0004", None),
        ("bind", "/devices/ap/card06/06.0004", "vfio_ap"),
    ]
    assert len(events) == 9 and props[1]["MODE"] == "accel"
    last = props[-1]
    assert last["DEVPATH"] == "/devices/ap" and last["SUBSYSTEM"] == "ap"
    assert last["APMASK"] == "0x" + "f" * 1 + "d" + "f" * 62 + "\n"
    assert [e.seqnum for e in events] == list(range(events[0].seqnum, events[0].seqnum + 9))
    q = "devices/ap/card06/06.0004"
    assert host.readlink(f"{q}/driver") == "../../../../bus/ap/drivers/vfio_ap"
    assert "online" not in host.listdir(q) and text(host, f"{q}/status") == "unassigned\n"
    assert text(host, f"{q}/request_count") == "-\n"  # taken from cex4queue: uninitiated
    events.clear()
    assert err(host, "bus/ap/apmask", "-6") == 0  # no change: no reprobe, no uevent
    assert events == []


def test_aqmask_absolute_and_empty(host: Host, events: list[Uevent]) -> None:
    assert err(host, "bus/ap/aqmask", "\n") == 0  # all zero: everything to vfio_ap
    assert text(host, "bus/ap/aqmask") == f"0x{ZERO64}\n"
    assert events[-1].env == {"AQMASK": f"0x{ZERO64}\n"}
    assert len(host.listdir("bus/ap/drivers/vfio_ap")) == 3 + 8
    assert err(host, "bus/ap/aqmask", "0X1") == errno.EINVAL
    assert err(host, "bus/ap/aqmask", b"") == 0  # a zero-length write never reaches store()


def test_mask_ebusy_when_taking_back_an_assigned_apqn(host: Host) -> None:
    release(host, "-5", "-4")
    m = create(host, U1)
    assert err(host, f"{m}/assign_adapter", "5") == 0
    assert err(host, f"{m}/assign_domain", "0x47") == 0  # 05.0047: adapter 5 is out of pool
    assert err(host, "bus/ap/apmask", "+5") == errno.EBUSY
    assert err(host, "bus/ap/apmask", "0x" + "f" * 64) == errno.EBUSY
    assert "Can not reserve queue 05.0047 for host driver: in use by mdev" in host.dmesg[-1]
    assert err(host, "bus/ap/aqmask", "+4") == 0  # domain 4 is not in the mdev
    # 6.19 rule: any newly set domain of the mdev is refused, whatever the apmask says.
    assert err(host, "bus/ap/aqmask", "-0x47") == 0
    assert err(host, "bus/ap/aqmask", "+0x47") == errno.EBUSY
    assert text(host, "bus/ap/apmask").startswith("0xfb")


# ----------------------------------------------------------------- drivers


def test_bind_unbind_rules(host: Host, events: list[Uevent]) -> None:
    d = "bus/ap/drivers"
    assert err(host, f"{d}/vfio_ap/bind", "05.0004") == errno.EBUSY
    assert err(host, f"{d}/vfio_ap/unbind", "05.0004") == errno.ENODEV
    assert err(host, f"{d}/cex4queue/unbind", "05.0004\n") == 0
    assert text(host, "bus/ap/bindings") == "7/8\n"
    assert "driver" not in host.listdir("devices/ap/card05/05.0004")
    assert err(host, f"{d}/vfio_ap/bind", "05.0004") == errno.ENODEV  # in the host pool
    assert err(host, f"{d}/vfio_ap/bind", "card05") == errno.ENODEV  # cards never
    assert err(host, f"{d}/cex4card/bind", "05.0004") == errno.ENODEV
    assert err(host, f"{d}/cex4queue/bind", "05.0005") == errno.ENODEV
    assert err(host, f"{d}/cex4queue/bind", "05.0004") == 0
    assert [(e.action, e.driver) for e in events] == [("unbind", None), ("bind", "cex4queue")]


def test_unbound_queue_drops_its_adapter_from_the_guest_view(host: Host) -> None:
    release(host, "-0-255")
    m = create(host, U1)
    for f, v in (("assign_adapter", "5"), ("assign_adapter", "6"), ("assign_domain", "4")):
        assert err(host, f"{m}/{f}", v) == 0
    assert err(host, f"{m}/assign_domain", "0x10") == 0  # not a host domain: filtered out
    assert err(host, f"{m}/assign_adapter", "0x20") == 0  # not a host adapter: filtered out
    assert err(host, f"{m}/assign_control_domain", "0x30") == 0
    assert text(host, f"{m}/guest_matrix") == "05.0004\n06.0004\n"
    assert err(host, "bus/ap/drivers/vfio_ap/unbind", "06.0004") == 0
    assert text(host, f"{m}/guest_matrix") == "05.0004\n"
    assert text(host, f"{m}/matrix").count("\n") == 6
    assert err(host, "bus/ap/drivers/vfio_ap/bind", "06.0004") == 0
    assert err(host, "devices/ap/card05/config", "0") == 0  # deconfigured: not in host APM
    assert text(host, f"{m}/guest_matrix") == "06.0004\n"


# ----------------------------------------------------------------- card config / online


def test_config_and_online(host: Host, events: list[Uevent]) -> None:
    c = "devices/ap/card05"
    assert err(host, f"{c}/config", "2") == errno.EINVAL
    assert err(host, f"{c}/config", "0\n") == 0
    assert [(e.devpath, e.env.get("CONFIG")) for e in events] == [
        ("/devices/ap/card05", "0"),
        ("/devices/ap/card05/05.0004", "0"),
        ("/devices/ap/card05/05.0047", "0"),
        ("/devices/ap/card05/05.00ab", "0"),
        ("/devices/ap/card05/05.00ff", "0"),
    ]
    assert events[0].env["MODE"] == "cca" and events[0].env["DEV_TYPE"] == "000B"
    assert text(host, f"{c}/online") == "0\n" and text(host, f"{c}/05.0004/config") == "0\n"
    assert err(host, f"{c}/online", "1") == errno.ENODEV
    assert err(host, f"{c}/05.0004/online", "1") == errno.ENODEV
    assert err(host, f"{c}/05.0004/config", "1") == errno.EACCES  # RO on queues
    assert text(host, "bus/ap/ap_adapter_mask") == "0x02" + "0" * 62 + "\n"
    assert err(host, f"{c}/config", "1") == 0
    events.clear()
    assert err(host, f"{c}/online", "0") == 0
    assert [e.env["ONLINE"] for e in events] == ["0"] * 5
    assert err(host, f"{c}/05.0004/online", "1") == errno.EINVAL  # card is offline
    events.clear()
    assert err(host, f"{c}/online", "1") == 0
    assert len(events) == 5 and text(host, f"{c}/05.0004/online") == "1\n"
    assert err(host, f"{c}/05.0004/online", "0") == 0
    assert text(host, f"{c}/05.0004/online") == "0\n"


# ----------------------------------------------------------------- uevents, boot, faults


def test_no_uevent_on_assign_unassign(host: Host, events: list[Uevent]) -> None:
    release(host)
    m = create(host, U1)
    events.clear()
    for f in ("assign_adapter", "assign_domain", "assign_control_domain", "unassign_domain"):
        assert err(host, f"{m}/{f}", "4" if "domain" in f else "5") == 0
    assert events == []


def test_boot_uevents_and_seqnum(host: Host, events: list[Uevent]) -> None:
    boot = list(host.boot_uevents())
    assert [e.seqnum for e in boot] == list(range(1, len(boot) + 1))
    assert boot[0].properties() == {
        "ACTION": "add",
        "DEVPATH": "/devices/ap/card05",
        "SUBSYSTEM": "ap",
        "DEVTYPE": "ap_card",
        "DEV_TYPE": "000B",
        "MODALIAS": "ap:t0B",
        "MODE": "cca",
        "SEQNUM": "1",
    }
    assert boot[-1].env == {"MDEV_STATE": "registered"}
    assert boot[-1].devpath == "/devices/vfio_ap/matrix" and boot[-1].subsystem == "matrix"
    assert {"BINDINGS": "complete", "COMPLETECOUNT": "1"} in [e.env for e in boot]
    create(host, U1)
    assert events[0].seqnum == len(boot) + 1


def test_bindings_complete_at_next_scan(host: Host, events: list[Uevent]) -> None:
    release(host)
    events.clear()
    assert err(host, "bus/ap/scans", "1") == 0
    assert [e.env for e in events] == [{"BINDINGS": "complete", "COMPLETECOUNT": "2"}]
    assert text(host, "bus/ap/bindings_complete_count") == "2\n"
    assert err(host, "bus/ap/scans", "1") == 0 and len(events) == 1  # once per transition


def test_synthetic_uevent(host: Host, events: list[Uevent]) -> None:
    assert err(host, "devices/ap/card06/uevent", "change") == 0
    assert events[-1].env == {"SYNTH_UUID": "0", "DEV_TYPE": "000B", "MODALIAS": "ap:t0B",
                              "MODE": "accel"}  # fmt: skip
    assert err(host, "bus/ap/uevent", f"add {U1} A=1") == 0
    assert events[-1].devpath == "/bus/ap" and events[-1].env["SYNTH_ARG_A"] == "1"
    assert err(host, "devices/ap/card06/uevent", "explode") == errno.EINVAL


def test_inject_fault(host: Host) -> None:
    host.inject_fault("bus/ap/apmask", errno.EIO, count=2)
    assert err(host, "bus/ap/apmask", "-5") == errno.EIO
    assert err(host, "bus/ap/apmask", "-5") == errno.EIO
    assert text(host, "bus/ap/apmask") == FULL
    assert err(host, "bus/ap/apmask", "-5") == 0
    host.inject_fault(f"{host.matrix_dir}/{U1}/assign_adapter", errno.EAGAIN)
    m = create(host, U1)
    assert err(host, f"bus/mdev/devices/{U1}/assign_adapter", "5") == errno.EAGAIN  # via link
    assert text(host, f"{m}/matrix") == ""


def test_listener_errors_do_not_break_the_host(host: Host) -> None:
    def bad(_event: Uevent) -> None:
        raise RuntimeError("boom")

    unsubscribe = host.subscribe(bad)
    create(host, U1)
    assert "boom" in host.dmesg[-1]
    unsubscribe()
    assert host.internal_errors == []


def test_big_host() -> None:
    host = Host.from_name("big")
    assert text(host, "bus/ap/bindings") == "65536/65536 (complete)\n"
    assert host.read("bus/ap/devices/ff.00ff/online") == b"1\n"
    assert len(host.listdir("devices/ap/cardff")) > 256
    assert err(host, "bus/ap/apmask", "-0x80") == 0
    assert text(host, "devices/ap/card80/80.00ff/status") == "unassigned\n"
