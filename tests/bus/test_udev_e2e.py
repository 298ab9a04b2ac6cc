"""The unmodified daemon in real-host mode, against the FUSE emulator, with real uevents
through pyudev, on both layouts (test-rigs.md §2.3 and §5(b)).

- a private network namespace (held by ``unshare -n sleep``): the emulator's netlink
  multicasts reach only monitors in it, never the host's udev listeners;
- ``apmatrixd-sim mount --uevents netlink`` joins that namespace (``nsenter --net``) and
  mounts the emulator at ``$ROOT`` in the test's own mount namespace, so the test plays the
  hardware with plain writes to ``$ROOT``;
- the daemon joins the namespace too, in its own mount namespace with ``$ROOT`` bound on
  ``/sys``, a private ``/run`` holding ``udev/control`` (else libudev disables
  ``source='udev'`` monitors) and ``SYSTEMD_DEVICE_VERIFY_SYSFS=0`` (else libudev refuses a
  /sys that is not sysfs); no preload, no option telling it it is being tested;
- the private dbus-daemon listens on a path socket (abstract sockets are per namespace).

The daemon runs with ``--rescan-interval 0``: whatever it learns, it learns from uevents.
The rig is ``rigs.NsRig``, shared with the benchmarks (bench/hotbench.py, bench/mdevbench.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, arun
from dbus_fast import Variant
from rigs import NsRig, need_fuse, need_netns, need_tool

G1 = "11111111-1111-4111-8111-111111111111"
P1 = f"{ROOT}/matrices/{G1.replace('-', '_')}"


@pytest.fixture(params=["default", "rfc2017"])
def nsrig(request: pytest.FixtureRequest) -> Iterator[NsRig]:
    need_fuse()
    need_netns()
    need_tool("nsenter", "util-linux")
    rig = NsRig.start(request.param, prefix="apmatrixd-e2e-")
    try:
        yield rig
    finally:
        rig.close()


async def wait_state(c: Client, want: str, t: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + t
    while True:
        props = await c.props(P1, MATRIX)
        if props["State"] == want:
            return props
        assert time.monotonic() < deadline, props
        await asyncio.sleep(0.02)


@pytest.mark.e2e
def test_real_host_mode_through_pyudev(nsrig: NsRig, system_bus: str) -> None:
    daemon, _ = nsrig.daemon(system_bus, nsrig.top / "state", "-v", timeout=20)
    root = nsrig.root

    async def go() -> None:
        c = await Client.connect(daemon.address)
        layout = (await c.props(ROOT, MANAGER))["Layout"]
        assert layout in ("upstream", "rfc2017")
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        opts = {"adapters": Variant("au", [5, 6]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts])
        props = await c.props(P1, MATRIX)
        parent = "vfio_ap" if layout == "upstream" else "ap_matrix"
        assert props["State"] == "active"
        assert props["SysfsPath"] == f"/sys/devices/{parent}/matrix/{G1}"
        await c.listen()

        # card 05 leaves the configuration: a CONFIG=0 uevent, through netlink and pyudev
        (root / "devices/ap/card05/config").write_text("0\n")
        props = await wait_state(c, "degraded")
        assert props["GuestApqns"] == [[6, 4]]
        (root / "devices/ap/card05/config").write_text("1\n")
        props = await wait_state(c, "active")
        assert props["GuestApqns"] == [[5, 4], [6, 4]]
        adapter5 = await c.props(f"{ROOT}/adapters/05", "org.apmatrix.Apmatrix1.Adapter")
        assert adapter5["Configured"] is True

        # changed by hand: no uevent for that; the next uevent makes the daemon look
        (root / f"devices/{parent}/matrix/{G1}/assign_domain").write_text("0x47\n")
        (root / "devices/ap/card06/online").write_text("1\n")
        deadline = time.monotonic() + 10
        while not [m for m in c.signals if m.member == "Drift"]:
            assert time.monotonic() < deadline, daemon.stderr()
            await asyncio.sleep(0.02)
        (drift,) = [m.body for m in c.signals if m.member == "Drift"]
        assert drift == [P1, "domains: kernel 04,47 vs registry 04"]
        assert (await c.props(P1, MATRIX))["Domains"] == [4, 0x47]
        c.close()

    try:
        arun(go())
    finally:
        rc = daemon.terminate()
        log = daemon.stderr()
        daemon.close()
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "absorbed" in log and "no udev monitor" not in log, log
