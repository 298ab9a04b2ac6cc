"""Drift under load: sysfs changed by hand (through the FUSE mount, as an admin's ``echo``
would) while clients storm the daemon with calls is detected (a Drift signal, the registry
showing the kernel's truth) and never overwritten: the hand-made change is still in the
kernel after the storm.

Two hand changes: a domain assigned to a live matrix behind the daemon's back (mdev drift),
and an adapter taken out of the host pool in ``apmask`` (host-pool drift, on the Manager's
path), while 5 clients create, change and remove other matrices, Reserve and Release a
domain (so ``aqmask`` is written meanwhile), and read.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client
from dbus_fast import Variant
from relrig import SimFactory, check_all, long_mode, mask, matrix_file, path_of

G1 = "11111111-1111-4111-8111-111111111111"
HAND_ADAPTER = 0x20


async def storm(address: str, n: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    c = await Client.connect(address)
    uuid = f"22222222-2222-4222-8222-{n:012x}"
    domain = [0xAB, 0xFF][n % 2]
    calls: list[tuple[str, str, str, str, list[Any]]] = [
        (ROOT, MANAGER, "Check", "auaus", [[5, 6], [4, 0x47], ""]),
        (ROOT, MANAGER, "Reserve", "auau", [[], [0xFF]]),
        (
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            [uuid, {"adapters": Variant("au", [6]), "domains": Variant("au", [domain])}],
        ),
        (path_of(uuid), MATRIX, "AssignControlDomain", "u", [n]),
        (ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", []),
        (path_of(uuid), MATRIX, "Remove", "", []),
        (ROOT, MANAGER, "Release", "auau", [[], [0xFF]]),
    ]
    while not stop.is_set():
        for call in calls:
            await c.call(*call)  # refusals are fine here (the clients collide)
            counts["calls"] += 1
    c.close()


def test_hand_changes_during_a_storm_are_seen_not_overwritten(sim: SimFactory) -> None:
    s = sim(rescan=0.2)
    seconds = 20.0 if long_mode() else 2.0

    async def go() -> dict[str, Any]:
        c = await Client.connect(s.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47, 0xAB]])
        opts = {"adapters": Variant("au", [5]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts])
        watcher = await Client.connect(s.address)
        await watcher.listen()
        stop = asyncio.Event()
        counts = {"calls": 0}
        clients = [asyncio.create_task(storm(s.address, n, stop, counts)) for n in range(5)]
        await asyncio.sleep(seconds / 3)
        # by hand, through the FUSE mount, in the middle of the storm
        await asyncio.to_thread(s.write, f"devices/vfio_ap/matrix/{G1}/assign_domain", "0x47")
        await asyncio.to_thread(s.write, "bus/ap/apmask", f"-{HAND_ADAPTER:#x}")
        await asyncio.sleep(seconds * 2 / 3)
        stop.set()
        await asyncio.gather(*clients)
        # the storm is over; the daemon's rescan has had its chances
        deadline = time.monotonic() + 10
        while True:
            await watcher.settle()
            drift = [m.body for m in watcher.signals if m.member == "Drift"]
            paths = {p for p, _ in drift}
            if {path_of(G1), ROOT} <= paths or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        g1 = await c.props(path_of(G1), MATRIX)
        mgr = await c.props(ROOT, MANAGER)
        problems, _ = await check_all(c, s)
        c.close()
        watcher.close()
        return {"drift": drift, "g1": g1, "mgr": mgr, "problems": problems, **counts}

    out = asyncio.run(go())
    print(f"\ndrift under load: {out['calls']} calls, drift signals {out['drift']}")
    assert out["calls"] > 50
    # detected: a Drift for the matrix and one for the host pool, each once
    g1_drift = [w for p, w in out["drift"] if p == path_of(G1)]
    assert g1_drift == ["domains: kernel 04,47 vs registry 04"], out["drift"]
    assert len([w for p, w in out["drift"] if p == ROOT]) == 1, out["drift"]
    # shown: the registry took the kernel's truth (it breaks no rule)
    assert out["g1"]["Domains"] == [4, 0x47] and out["g1"]["State"] == "active"
    assert HAND_ADAPTER not in out["mgr"]["HostAdapters"]
    # not overwritten: the kernel still holds both hand changes
    adapters, domains = matrix_file(s.read(f"devices/vfio_ap/matrix/{G1}/matrix"))
    assert (adapters, domains) == ({5}, {4, 0x47})
    assert HAND_ADAPTER not in mask(s.read("bus/ap/apmask"))
    assert out["problems"] == []
