"""Resource abuse: clients that misbehave must not stall the daemon for the others.

While the abuse goes on, a well-behaved client keeps calling (Ping, GetAll, Check, and root
changes: CreateMatrix + Remove) and every one of its calls must be answered (a call not
answered within STALL is a stall; the worst latencies are printed). The abusers, on raw
sockets (no library to be polite for them):

- a subscriber to every signal of the daemon that never reads its socket (a tiny receive
  buffer), while the victim's changes make signals;
- a flooder that pipelines thousands of calls without reading a reply (Ping,
  GetManagedObjects, Check; with and without NO_REPLY_EXPECTED, which dbus-daemon does not
  bound; among them Checks of the whole 256 x 256 host with NO_REPLY_EXPECTED);
- callers that disconnect mid-call: root sending a change and closing at once, and nobody
  sending changes that wait for polkit and leaving before the answer.

dbus-daemon's own limits may disconnect an abuser: that is fine. At the end the daemon is
alive, logged no traceback, and the rules hold (registry = kernel = state directory).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from typing import Any

from busrig import (
    MANAGER,
    MATRIX,
    NOBODY,
    ROOT,
    SYSTEM_PYTHON,
    Client,
    as_user,
    world_readable_client,
)
from dbus_fast import Message, MessageFlag, Variant
from relrig import Raw, SimFactory, check_all, long_mode, path_of

# A stall, not a speed figure: answers normally take well under 0.3 s here; a daemon stalled
# by an abuser does not answer at all (the latencies are printed, not asserted).
STALL = 10.0
NAME = "org.apmatrix.Apmatrix1"


def subscribe_and_sleep(address: str) -> Raw:
    raw = Raw(address, rcvbuf=4096)
    for rule in (f"type='signal',sender='{NAME}'", "type='signal'"):
        raw.send(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )
    return raw  # and never read


def flood(address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    calls = [
        Message(destination=NAME, path=ROOT, interface="org.freedesktop.DBus.Peer", member="Ping"),
        Message(
            destination=NAME,
            path=ROOT,
            interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects",
        ),
        Message(
            destination=NAME,
            path=ROOT,
            interface=MANAGER,
            member="Check",
            signature="auaus",
            body=[[5, 6], [4, 0x47, 0xAB], ""],
        ),
    ]
    costly = Message(  # the whole 256 x 256 host: the largest Check there is
        destination=NAME,
        path=ROOT,
        interface=MANAGER,
        member="Check",
        signature="auaus",
        body=[list(range(256)), list(range(256)), ""],
        flags=MessageFlag.NO_REPLY_EXPECTED,  # dropped unread (bus/base.py)
    )
    while not stop.is_set():
        raw = Raw(address)
        counts["connections"] += 1
        i = 0
        while not stop.is_set():
            msg = calls[i % len(calls)] if i % 4 else costly
            if msg is not costly:
                msg.flags = MessageFlag.NO_REPLY_EXPECTED if i % 2 else MessageFlag.NONE
            if not raw.send(msg):
                counts["thrown out"] += 1
                break
            counts["sent"] += 1
            i += 1
        raw.close()


def hang_up_mid_call(address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """root: a change sent, the connection closed before the answer."""
    n = 0
    while not stop.is_set():
        raw = Raw(address)
        uuid = f"{n:08x}-0000-4000-8000-000000000000"
        opts = {"adapters": Variant("au", [6]), "domains": Variant("au", [0x47])}
        raw.send(
            Message(
                destination=NAME,
                path=ROOT,
                interface=MANAGER,
                member="CreateMatrix",
                signature="sa{sv}",
                body=[uuid, opts],
            )
        )
        raw.send(Message(destination=NAME, path=path_of(uuid), interface=MATRIX, member="Remove"))
        raw.close()
        counts["hung up"] += 1
        n += 1
        time.sleep(0.005)


NOBODY_SCRIPT = """
import asyncio, sys
from dbus_fast import Message
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    for i in range(int(sys.argv[2])):
        bus.send(Message(destination="org.apmatrix.Apmatrix1", path=sys.argv[3],
                         interface="org.apmatrix.Apmatrix1.Matrix", member="Stop"))
    await asyncio.sleep(0)
    bus.disconnect()
asyncio.run(main())
"""


def nobody_leaves(address: str, target: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """nobody: changes that wait for polkit, the caller gone before polkit answers."""
    env = dict(os.environ, PYTHONPATH=world_readable_client()[1])
    while not stop.is_set():
        subprocess.run(
            [*as_user(NOBODY), SYSTEM_PYTHON, "-c", NOBODY_SCRIPT, address, "20", target],
            env=env,
            cwd="/",
            capture_output=True,
            timeout=30,
            check=True,
        )
        counts["nobody left"] += 20


async def victim(address: str, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """Rounds of reads and changes for ``seconds``, and at least ``rounds`` of them (a loaded
    machine is slower, not a failure: each call still has to come within STALL)."""
    c = await Client.connect(address)
    worst: dict[str, float] = {}
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or n < rounds:
        uuid = f"ffffffff-ffff-4fff-8fff-{n:012x}"
        steps: list[tuple[str, str, str, str, list[Any]]] = [
            (ROOT, "org.freedesktop.DBus.Peer", "Ping", "", []),
            (ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER]),
            (ROOT, MANAGER, "Check", "auaus", [[5], [4], ""]),
            (ROOT, MANAGER, "CreateMatrix", "sa{sv}", [uuid, {"adapters": Variant("au", [5])}]),
            (path_of(uuid), MATRIX, "Remove", "", []),
        ]
        for path, iface, member, sig, body in steps:
            t0 = time.monotonic()
            await asyncio.wait_for(c.ok(path, iface, member, sig, body), STALL)
            worst[member] = max(worst.get(member, 0.0), time.monotonic() - t0)
        n += 1
    c.close()
    return {"rounds": n, "worst": worst}


def abused(counts: dict[str, int]) -> bool:
    """Each abuser has done enough to count."""
    return counts["sent"] > 1000 and counts["hung up"] > 10 and counts["nobody left"] > 0


def test_abusers_do_not_stall_the_others(sim: SimFactory) -> None:
    s = sim()
    seconds = 30.0 if long_mode() else 4.0

    async def setup() -> None:
        c = await Client.connect(s.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        opts = {"adapters": Variant("au", [6]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", opts])
        c.close()

    asyncio.run(setup())
    sleeper = subscribe_and_sleep(s.address)
    counts: dict[str, int] = {k: 0 for k in ("connections", "sent", "thrown out", "hung up")}
    counts["nobody left"] = 0
    stop = threading.Event()
    target = path_of("ffffffff-ffff-4fff-8fff-000000000000")
    threads = [
        threading.Thread(target=flood, args=(s.address, stop, counts)),
        threading.Thread(target=hang_up_mid_call, args=(s.address, stop, counts)),
        threading.Thread(target=nobody_leaves, args=(s.address, target, stop, counts)),
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # the abuse is in full swing
        result = asyncio.run(victim(s.address, seconds))
        enough = time.monotonic() + 30  # as much abuse as asserted below, on a slow machine too
        while not abused(counts) and time.monotonic() < enough:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        sleeper.close()
    print(f"\nabuse: {counts}; victim {result['rounds']} rounds, worst {result['worst']}")
    assert result["rounds"] >= 3  # each call of each round was answered within STALL
    assert abused(counts), counts

    async def after() -> None:
        c = await Client.connect(s.address)
        await asyncio.sleep(0.5)  # the hung-up changes are done
        problems, _ = await check_all(c, s)
        assert problems == []
        c.close()

    asyncio.run(after())
    assert s.alive()
