"""Kernel generations and running guests in the emulator (kernel-facts §1.6, §7 item 1)."""

from __future__ import annotations

import dataclasses
import errno
import threading
import time

import pytest

from apmatrixd.sim.model import Host
from apmatrixd.sim.profile import PROFILES
from apmatrixd.sim.scenario import load_scenario, parse_scenario
from tests.sim.test_model import U1, U2, create, err, text

B = "bus/ap"


def host_on(kernel: str, name: str = "default") -> Host:
    return Host(dataclasses.replace(load_scenario(name), kernel=kernel))


def reserved(kernel: str) -> tuple[Host, str]:
    """A host with adapters 05/06 given to vfio_ap and one mdev holding 05 x 04."""
    host = host_on(kernel)
    assert err(host, f"{B}/apmask", "-5-6") == 0
    mdev = create(host, U1)
    assert err(host, f"{mdev}/assign_adapter", "5") == 0
    assert err(host, f"{mdev}/assign_domain", "4") == 0
    return host, mdev


# ----------------------------------------------------------------- the files of each generation

FILES = {
    # kernel: (guest_matrix, ap_config, matrix features, bindings_complete_count, driver_override)
    "5.15": (False, False, False, False, False),
    "6.0": (True, False, False, False, False),
    "6.10": (True, True, False, False, False),
    "6.12": (True, True, True, False, False),
    "6.15": (True, True, True, False, False),
    "6.19": (True, True, True, True, True),
}


@pytest.mark.parametrize("kernel", sorted(PROFILES))
def test_each_generation_has_its_files(kernel: str) -> None:
    host = host_on(kernel)
    mdev = create(host, U1)
    guest, ap_config, features, count, override = FILES[kernel]
    assert host.exists(f"{mdev}/guest_matrix") is guest
    assert host.exists(f"{mdev}/ap_config") is ap_config
    assert host.exists(f"{host.matrix_dir}/features") is features
    assert host.exists(f"{B}/bindings_complete_count") is count
    assert host.exists("devices/ap/card05/05.0004/driver_override") is override
    assert host.exists(f"{B}/features") is (kernel != "5.15")
    for name in ("matrix", "control_domains", "assign_adapter", "remove"):
        assert host.exists(f"{mdev}/{name}")


def test_scenario_kernel_key() -> None:
    assert load_scenario("default").kernel == "6.19"
    sc = parse_scenario('kernel = "5.15"\nusage_domains = [4]\n', "x", "<t>")
    assert sc.kernel == "5.15"
    with pytest.raises(ValueError, match=r"kernel '5\.4' is not one of .*5\.15, 6\.0"):
        parse_scenario('kernel = "5.4"\n', "x", "<t>")
    with pytest.raises(ValueError, match="upstream layout only"):
        parse_scenario('layout = "rfc2017"\nkernel = "6.0"\n', "x", "<t>")


# ----------------------------------------------------------------- before 6.0


def test_515_assign_needs_bound_queues_and_has_no_shortcut() -> None:
    host = host_on("5.15")
    mdev = create(host, U1)
    # Everything is in the host pool: no queue of adapter 05 is bound to vfio_ap.
    assert err(host, f"{mdev}/assign_adapter", "5") == errno.EADDRNOTAVAIL
    assert err(host, f"{mdev}/assign_adapter", "9") == errno.EADDRNOTAVAIL  # no such card
    assert err(host, f"{mdev}/assign_adapter", "256") == errno.ENODEV
    assert err(host, f"{B}/apmask", "-5") == 0
    assert err(host, f"{mdev}/assign_adapter", "5") == 0
    assert err(host, f"{mdev}/assign_domain", "4") == 0
    assert err(host, f"{mdev}/assign_domain", "0x10") == errno.EADDRNOTAVAIL  # no queue 05.0010
    # No idempotency shortcut: re-assigning re-checks, and a queue taken back fails it.
    assert err(host, f"{B}/apmask", "+5") == 0  # no in_use callback before 6.0: not EBUSY
    assert text(host, f"{mdev}/matrix") == "05.0004\n"
    assert err(host, f"{mdev}/assign_adapter", "5") == errno.EADDRNOTAVAIL
    assert text(host, f"{mdev}/matrix") == "05.0004\n"


def test_515_running_guest_makes_every_change_ebusy() -> None:
    host, mdev = reserved("5.15")
    host.attach_guest(U1)
    assert text(host, "devices/ap/card05/05.0004/status") == "in use\n"
    for attr in ("assign_adapter", "unassign_adapter", "assign_domain", "unassign_domain",
                 "assign_control_domain", "unassign_control_domain"):  # fmt: skip
        assert err(host, f"{mdev}/{attr}", "junk") == errno.EBUSY  # before parsing
    assert err(host, f"{mdev}/remove", "1") == errno.EBUSY
    assert err(host, f"{mdev}/remove", "junk") == errno.EINVAL
    # The guest keeps the CRYCB it got at open, even when the host takes the queue back.
    assert err(host, f"{B}/apmask", "+5") == 0
    assert host.guest_view(host.mdevs[U1])[0] == {5}
    host.detach_guest(U1)
    assert err(host, f"{mdev}/unassign_domain", "4") == 0
    assert err(host, f"{mdev}/remove", "1") == 0


def test_515_and_60_use_the_old_instance_errno() -> None:
    assert host_on("5.15").profile.instances_errno == errno.EPERM
    assert host_on("6.0").profile.instances_errno == errno.EPERM
    assert host_on("6.10").profile.instances_errno == errno.EUSERS


# ----------------------------------------------------------------- the in_use rule


@pytest.mark.parametrize(("kernel", "expect"), [("6.0", 0), ("6.15", 0), ("6.19", errno.EBUSY)])
def test_release_rule_by_generation(kernel: str, expect: int) -> None:
    """Domain 04 handed back while adapter 05 stays reserved: 6.0-6.18 check the current
    apmask (05 is not in it: nothing of the matrix returns to the host), 6.19 all adapters."""
    host, _ = reserved(kernel)
    assert err(host, f"{B}/aqmask", "-4") == 0
    assert err(host, f"{B}/aqmask", "+4") == expect
    assert err(host, f"{B}/apmask", "+5") == errno.EBUSY


# ----------------------------------------------------------------- running guests, 6.0+


def test_guest_sees_hot_plug_and_ap_config_is_one_update() -> None:
    host, mdev = reserved("6.19")
    host.attach_guest(U1)
    guest = host.guest(U1)
    assert guest is not None
    assert text(host, "devices/ap/card05/05.0004/status") == "in use\n"
    assert err(host, f"{mdev}/assign_domain", "0x47") == 0  # hot plug into the guest
    assert err(host, f"{mdev}/assign_adapter", "6") == 0
    assert guest.updates == 2
    assert text(host, "devices/ap/card06/06.0047/status") == "in use\n"
    mask = lambda *ids: "0x" + format(sum(1 << (255 - i) for i in ids), "064x")  # noqa: E731
    new = f"{mask(5, 6)},{mask(4, 0x47, 0xAB)},{mask()}\n"
    assert err(host, f"{mdev}/ap_config", new) == 0
    assert guest.updates == 3  # three ids changed, one APCB rewrite
    assert err(host, f"{mdev}/ap_config", new) == 0
    assert guest.updates == 3  # the same value again pushes nothing


def test_remove_blocks_until_the_guest_lets_go() -> None:
    host, mdev = reserved("6.0")
    host.attach_guest(U1)
    done = threading.Event()
    result: list[int] = []

    def remove() -> None:
        result.append(err(host, f"{mdev}/remove", "1"))
        done.set()

    threading.Thread(target=remove, daemon=True).start()
    assert not done.wait(0.3)
    # The rest of the tree is served meanwhile, and the guest was asked.
    assert text(host, f"{mdev}/matrix") == "05.0004\n"
    guest = host.guest(U1)
    assert guest is not None and guest.requests == 1
    host.detach_guest(U1)
    assert done.wait(5) and result == [0]
    assert not host.exists(mdev)


def test_remove_goes_on_after_qemu_release_delay() -> None:
    host, mdev = reserved("6.19")
    host.attach_guest(U1, release_after=0.2)
    start = time.monotonic()
    assert err(host, f"{mdev}/remove", "1") == 0
    assert time.monotonic() - start > 0.15  # it waited for QEMU to let go
    assert host.guest(U1) is None and not host.exists(mdev)


def test_attach_refusals_and_control_file() -> None:
    host, _ = reserved("6.19")
    with pytest.raises(OSError) as exc:
        host.attach_guest(U2)
    assert exc.value.errno == errno.ENOENT
    assert err(host, ".apmatrixd-sim", f"attach {U1} 1.5\n") == 0
    assert err(host, ".apmatrixd-sim", f"attach {U1}\n") == errno.EBUSY
    assert text(host, ".apmatrixd-sim").startswith(f"{U1} release_after=1.5 updates=0")
    assert err(host, ".apmatrixd-sim", "launch it") == errno.EINVAL
    assert err(host, ".apmatrixd-sim", f"detach {U1}") == 0
    assert err(host, ".apmatrixd-sim", f"detach {U1}") == errno.ENOENT
    assert ".apmatrixd-sim" not in host.listdir("")  # never listed
    assert host.mode(".apmatrixd-sim") == 0o600


# ----------------------------------------------------------------- driver_override, 6.19


def test_driver_override_rules() -> None:
    host = host_on("6.19")
    q = "devices/ap/card05/05.0004"
    assert text(host, f"{q}/driver_override") == "(null)\n"
    assert err(host, f"{B}/apmask", "-6") == 0
    assert err(host, f"{q}/driver_override", "vfio_ap\n") == errno.EINVAL  # masks restricted
    assert err(host, f"{B}/apmask", "+6") == 0
    assert err(host, f"{q}/driver_override", "vfio_ap\n") == 0
    assert text(host, f"{q}/driver_override") == "vfio_ap\n"
    assert err(host, f"{B}/apmask", "-6") == errno.EINVAL  # and the other way round
    assert err(host, f"{B}/aqmask", "0x00") == errno.EINVAL
    # The override decides the next probe only.
    assert text(host, f"{q}/online") == "1\n"
    assert err(host, f"{B}/drivers/cex4queue/unbind", "05.0004") == 0
    assert err(host, f"{B}/drivers/cex4queue/bind", "05.0004") == errno.ENODEV
    assert err(host, f"{B}/drivers_probe", "05.0004") == 0
    assert host.readlink(f"{q}/driver").endswith("drivers/vfio_ap")
    assert text(host, f"{q}/status") == "unassigned\n"
    # vfio_ap may take the overridden queue, not its pooled neighbours.
    mdev = create(host, U1)
    assert err(host, f"{mdev}/assign_adapter", "5") == 0
    assert err(host, f"{mdev}/assign_domain", "4") == 0
    assert err(host, f"{mdev}/assign_domain", "0x47") == errno.EADDRNOTAVAIL
    # An override to the host's driver keeps the queue the host's.
    assert err(host, "devices/ap/card06/06.0004/driver_override", "cex4queue") == 0
    assert err(host, f"{mdev}/assign_adapter", "6") == errno.EADDRNOTAVAIL
    assert err(host, f"{q}/driver_override", "\n") == 0  # cleared; binding unchanged
    assert text(host, f"{q}/driver_override") == "(null)\n"
    assert host.readlink(f"{q}/driver").endswith("drivers/vfio_ap")
