"""The unmodified daemon in real-host mode against the FUSE emulator: what an admin does behind
its back is drift, never written back, and counted in every decision.

The reproductions of the one-writer issue, end to end (rig: ``rigs.NsRig``, as
test_udev_e2e.py): a restart after an admin's ``echo`` into an mdev keeps the admin's change
(and says so with a Drift); a drift the registry cannot adopt makes a later Start a named
Conflict before any write, and an Update of the drifted matrix leaves the kernel as asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, arun, path_of
from dbus_fast import Message, Variant
from rigs import NsRig, need_fuse, need_netns, need_tool

from apmatrixd.store import Store

G = "11111111-1111-4111-8111-111111111111"
D = "22222222-2222-4222-8222-222222222222"
ERR = "org.apmatrix.Apmatrix1.Error."

pytestmark = pytest.mark.e2e


@pytest.fixture
def nsrig() -> Iterator[NsRig]:
    need_fuse()
    need_netns()
    need_tool("nsenter", "util-linux")
    rig = NsRig.start("default", prefix="apmatrixd-1w-")
    try:
        yield rig
    finally:
        rig.close()


def mdev(root: Path, uuid: str, attr: str) -> Path:
    return root / "devices/vfio_ap/matrix" / uuid / attr


async def create(c: Client, uuid: str, adapters: list[int], domains: list[int], **kw: bool) -> None:
    opts = {"adapters": Variant("au", adapters), "domains": Variant("au", domains)}
    opts |= {k: Variant("b", v) for k, v in kw.items()}
    await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [uuid, opts])


async def drift_listener(address: str) -> tuple[Client, list[Message]]:
    """A client that hears every Drift, also one sent by a daemon not started yet."""
    c = await Client.connect(address)
    rule = "type='signal',interface='org.apmatrix.Apmatrix1.Manager',member='Drift'"
    await c.listen(rule, settle=False)
    return c, c.signals


def test_a_restart_keeps_an_admins_edit(nsrig: NsRig, system_bus: str) -> None:
    state = nsrig.top / "state"
    daemon, _ = nsrig.daemon(system_bus, state)

    async def before() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        await create(c, G, [5, 6], [4], autostart=True)
        c.close()

    arun(before())
    assert daemon.terminate() == 0
    daemon.close()
    # The daemon is stopped (a package upgrade): the admin gives the guest domain 47.
    mdev(nsrig.root, G, "assign_domain").write_text("0x47\n")

    async def after() -> None:
        listener, drifts = await drift_listener(system_bus)
        again, _ = nsrig.daemon(system_bus, state)
        try:
            c = await Client.connect(again.address)
            props = await c.props(path_of(G), MATRIX)
            assert props["Domains"] == [4, 0x47] and props["State"] == "active"
            for _ in range(100):  # sent right after READY=1
                if drifts:
                    break
                await asyncio.sleep(0.02)
            ((path, what),) = [m.body for m in drifts]
            assert path == path_of(G) and "domains: kernel 04,47 vs stored 04" in what
            c.close()
        finally:
            listener.close()
            assert again.terminate() == 0
            again.close()

    arun(after())
    matrix = mdev(nsrig.root, G, "matrix").read_text().split()
    assert matrix == ["05.0004", "05.0047", "06.0004", "06.0047"]  # never written back
    assert Store(state).load().matrices[G].domains == {4, 0x47}  # adopted and kept


def test_a_drift_that_cannot_be_adopted_counts_in_every_decision(
    nsrig: NsRig, system_bus: str
) -> None:
    daemon, _ = nsrig.daemon(system_bus, nsrig.top / "state", "--rescan-interval", "0.1")

    async def go() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0xAB]])
        await create(c, G, [5, 6], [4])
        await create(c, D, [6], [0xAB], start=False)  # only defined: it holds 06.00ab
        # Behind the daemon's back: the kernel accepts it, d is not live.
        mdev(nsrig.root, G, "assign_domain").write_text("0xab\n")
        for _ in range(200):
            props = await c.props(path_of(G), MATRIX)
            if props["Domains"] == [4, 0xAB]:
                break
            await asyncio.sleep(0.02)
        assert props["Domains"] == [4, 0xAB]  # the kernel's truth is shown
        before = mdev(nsrig.root, G, "matrix").read_text()
        name, text = await c.error(path_of(D), MATRIX, "Start")
        assert name == ERR + "Conflict", (name, text)
        assert "06.00ab" in text and G in text, text
        assert not mdev(nsrig.root, D, "matrix").exists()  # refused before any write
        assert mdev(nsrig.root, G, "matrix").read_text() == before
        # An Update of the drifted matrix is written from what sysfs holds.
        await c.ok(path_of(G), MATRIX, "Update", "auauau", [[5, 6], [4], [4]])
        assert mdev(nsrig.root, G, "matrix").read_text().split() == ["05.0004", "06.0004"]
        props = await c.props(path_of(G), MATRIX)
        assert props["Domains"] == [4] and props["ControlDomains"] == [4]
        await c.ok(path_of(D), MATRIX, "Start")  # nothing holds 06.00ab any more
        assert mdev(nsrig.root, D, "matrix").read_text().split() == ["06.00ab"]
        c.close()

    try:
        arun(go())
    finally:
        assert daemon.terminate() == 0
        daemon.close()
