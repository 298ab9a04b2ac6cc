"""The unmodified daemon in real-host mode over the FUSE emulator of each kernel generation,
with real uevents through pyudev (the rig of test_udev_e2e.py), a fake guest attached from a
shell (``apmatrixd-sim guest attach``), and busctl-level D-Bus calls.

Per generation: create and update; Stop/Remove of the running guest's matrix refused with
Busy, then forced (6.0+: answered once QEMU lets go, while another client's Ping and GetAll
are answered; before 6.0: still Busy); driver_override refusal (6.19); autostart held until
the AP bus reports BINDINGS=complete.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, arun
from dbus_fast import Variant
from rigs import NsRig, need_fuse, need_netns, need_tool

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
P1 = f"{ROOT}/matrices/{G1.replace('-', '_')}"
P2 = f"{ROOT}/matrices/{G2.replace('-', '_')}"
ERR = "org.apmatrix.Apmatrix1.Error."
GENERATION = {"5.15": "before 6.0", "6.0": "6.0+", "6.10": "6.10+", "6.19": "6.19+"}


@pytest.fixture(params=sorted(GENERATION))
def nsrig(request: pytest.FixtureRequest) -> Iterator[NsRig]:
    need_fuse()
    need_netns()
    need_tool("nsenter", "util-linux")
    rig = NsRig.start(f"default@{request.param}", prefix="apmatrixd-gen-")
    rig.kernel = request.param  # type: ignore[attr-defined]
    try:
        yield rig
    finally:
        rig.close()


def guest(rig: NsRig, action: str, uuid: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "apmatrixd.sim.cli", "guest", action, str(rig.root), uuid]
    r = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


async def until(check: object, what: str, t: float = 10) -> None:
    deadline = time.monotonic() + t
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.e2e
def test_each_generation_end_to_end(nsrig: NsRig, system_bus: str) -> None:
    kernel: str = nsrig.kernel  # type: ignore[attr-defined]
    state = nsrig.top / "state"
    daemon, _ = nsrig.daemon(system_bus, state, "--in-use-timeout", "20", timeout=20)
    root = nsrig.root

    async def first() -> None:
        c = await Client.connect(daemon.address)
        host = await c.props(ROOT, MANAGER)
        assert host["KernelGeneration"] in (GENERATION[kernel], "6.0-6.11 or older (known once "
                                            "a matrix exists)"), host  # fmt: skip
        if kernel == "6.19":
            # The CEX DRA driver's way of taking a queue: override, unbind, probe.
            q = root / "devices/ap/card05/05.00ab"
            (q / "driver_override").write_text("vfio_ap\n")
            (root / "bus/ap/drivers/cex4queue/unbind").write_text("05.00ab\n")
            (root / "bus/ap/drivers_probe").write_text("05.00ab\n")

            async def shown() -> bool:
                a5 = await c.props(f"{ROOT}/adapters/05", "org.apmatrix.Apmatrix1.Adapter")
                return bool(a5["DriverOverrides"] == [[0xAB, "vfio_ap"]])

            await until(shown, "the override is shown")
            name, text = await c.error(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
            assert name == ERR + "DriverOverride" and "05.00ab -> vfio_ap" in text, text
            # The DRA driver lets go of it: the masks are free again.
            (q / "driver_override").write_text("\n")
            (root / "bus/ap/drivers/vfio_ap/unbind").write_text("05.00ab\n")
            (root / "bus/ap/drivers_probe").write_text("05.00ab\n")

            async def gone() -> bool:
                return not await shown()

            await until(gone, "the override is gone")
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47, 0xAB]])
        opts = {"adapters": Variant("au", [5]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts])
        await c.ok(P1, MATRIX, "Update", "auauau", [[5, 6], [4, 0x47], []])
        props = await c.props(P1, MATRIX)
        assert props["State"] == "active" and len(props["GuestApqns"]) == 4, props
        assert (await c.props(ROOT, MANAGER))["KernelGeneration"] == GENERATION[kernel]

        # A guest starts with it (QEMU opens the mdev): Stop and Remove say Busy.
        guest(nsrig, "attach", G1, "--release-after", "1")
        for member in ("Stop", "Remove"):
            name, text = await c.error(P1, MATRIX, member)
            assert (name, text[:14]) == (ERR + "Busy", "guest running:"), (name, text)
        assert (await c.props(P1, MATRIX))["InUse"] is True
        forced = {"force": Variant("b", True), "timeout": Variant("u", 10)}
        if kernel == "5.15":
            name, text = await c.error(P1, MATRIX, "StopWithOptions", "a{sv}", [forced])
            assert name == ERR + "Busy" and "even forced" in text, text
            name, _ = await c.error(P1, MATRIX, "Update", "auauau", [[5], [4], []])
            assert name == ERR + "Busy"
            guest(nsrig, "detach", G1)
            await c.ok(P1, MATRIX, "Stop")
        else:
            # Forced: the remove waits for the guest; another client is served meanwhile.
            other = await Client.connect(daemon.address)
            t0 = time.monotonic()
            stop = asyncio.ensure_future(c.ok(P1, MATRIX, "StopWithOptions", "a{sv}", [forced]))
            await asyncio.sleep(0.2)
            for _ in range(5):  # answered while the Stop still waits (how fast: bench/)
                await other.call(ROOT, "org.freedesktop.DBus.Peer", "Ping")
                got = await other.call(ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                       [MANAGER])  # fmt: skip
                assert got.body
                assert not stop.done()
            await stop
            assert time.monotonic() - t0 >= 0.9  # QEMU took its second
            other.close()
        props = await c.props(P1, MATRIX)
        assert props["State"] == "defined" and props["InUse"] is False

        # Autostart matrix for the restart below, stopped now.
        opts = {"adapters": Variant("au", [6]), "domains": Variant("au", [0xAB]),
                "autostart": Variant("b", True), "start": Variant("b", False)}  # fmt: skip
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G2, opts])

        c.close()

    try:
        arun(first())
    finally:
        rc = daemon.terminate()
        log = daemon.stderr()
        daemon.close()
    assert rc == 0 and "Traceback" not in log, log

    # A queue not yet probed when the daemon starts: autostart waits for BINDINGS=complete.
    (root / "bus/ap/drivers/vfio_ap/unbind").write_text("06.00ff\n")  # card 06 is reserved
    assert "(complete)" not in (root / "bus/ap/bindings").read_text()
    daemon, _ = nsrig.daemon(system_bus, state, timeout=20)

    async def second() -> None:
        c = await Client.connect(daemon.address)
        assert (await c.props(P2, MATRIX))["State"] == "defined"
        (root / "bus/ap/drivers_probe").write_text("06.00ff\n")
        (root / "bus/ap/scans").write_text("1\n")  # the scan finds every queue bound

        async def started() -> bool:
            return bool((await c.props(P2, MATRIX))["State"] == "active")

        await until(started, "autostart after BINDINGS=complete")
        c.close()

    try:
        arun(second())
    finally:
        rc = daemon.terminate()
        log = daemon.stderr()
        daemon.close()
    assert rc == 0 and "Traceback" not in log, log
    assert "autostart waits for BINDINGS=complete" in log, log
