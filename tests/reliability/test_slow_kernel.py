"""A change that waits on the kernel: the daemon keeps answering, and says what it waits for.

On a 6.x kernel a write to ``remove`` of an mdev that QEMU holds open blocks until QEMU lets
go. The emulator's delay hook (``PATH:delay=SECONDS`` in ``APMATRIXD_TEST_FAULTS``) makes that
write block 6 s in the daemon's worker thread; meanwhile other clients' Ping, GetAll and
Check must be answered, the Manager's ``Pending`` names the write, a second change queues
behind the first (and is answered after it), and once the write returns everything is as if
nothing had been slow.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client, arun
from dbus_fast import MessageType, Variant
from relrig import SimFactory, check_all, path_of

G1 = "11111111-1111-4111-8111-111111111111"
DELAY = 6.0
GUARD = DELAY / 2
"""How long one round of reads may take: a loop blocked on the write would miss it, a loaded
machine (the CI runs two suites at once on two cores) does not."""


def test_reads_are_answered_while_a_change_waits_on_the_kernel(sim: SimFactory) -> None:
    remove = f"devices/vfio_ap/matrix/{G1}/remove"
    s = sim(env={"APMATRIXD_TEST_FAULTS": f"{remove}:delay={DELAY}"})

    async def go() -> None:
        c = await Client.connect(s.address)
        other = await Client.connect(s.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4]])
        opts = {"adapters": Variant("au", [5, 6]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts])
        started = time.monotonic()
        slow = asyncio.ensure_future(c.call(path_of(G1), MATRIX, "Remove"))
        await asyncio.sleep(0.2)
        queued = asyncio.ensure_future(c.call(ROOT, MANAGER, "Reserve", "auau", [[], [0x47]]))
        reads = 0
        pending: set[str] = set()
        while not slow.done():
            # Each read must come back while the write is stuck (a stall guard, not a timing).
            get_matrix = ("org.freedesktop.DBus.Properties", "GetAll", "s", [MATRIX])
            calls: list[Any] = [
                other.ok(ROOT, "org.freedesktop.DBus.Peer", "Ping"),
                other.call(path_of(G1), *get_matrix),  # gone the moment the Remove is done
                other.ok(ROOT, MANAGER, "Check", "auaus", [[5], [4], ""]),
                other.props(ROOT, MANAGER),
            ]
            _, reply, (clashes,), manager = await asyncio.wait_for(asyncio.gather(*calls), GUARD)
            if reply.message_type != MessageType.METHOD_RETURN:
                await asyncio.wait_for(slow, GUARD)  # only after the Remove committed
                break
            matrix = {k: v.value for k, v in reply.body[0].items()}
            if not slow.done():
                reads += 1
                assert matrix["State"] == "active"  # nothing is shown before it is done
                assert [list(row) for row in clashes] == [[5, 4, G1]]
                pending.add(manager["Pending"])
                assert not queued.done()  # changes wait their turn
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= DELAY  # the write really blocked
        reply = slow.result()
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reads >= 10, reads
        waits = [p for p in pending if p]
        assert waits and all(f"writing '1' to {remove}" in p for p in waits), pending
        assert (await asyncio.wait_for(queued, 5)).message_type == MessageType.METHOD_RETURN
        assert (await c.props(ROOT, MANAGER))["Pending"] == ""
        assert (await c.props(ROOT, MANAGER))["HostDomains"].count(0x47) == 0
        problems, _ = await check_all(c, s)
        assert problems == []
        c.close()
        other.close()

    arun(go())
    assert "still waiting after" in s.daemon.stderr()
