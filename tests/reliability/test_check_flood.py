"""A flood of costly Checks must not stall the other clients (issue #8 item 5, issue #7).

One client pipelines as many Checks of the whole 256 x 256 host as dbus-daemon lets it have
waiting for a reply (128, its ``max_replies_per_connection``), each answered with some 65,536
clashing APQNs, and reads the answers as they come. Meanwhile another client's Ping and a
small Check must be answered. The daemon answers one message after the other, so they wait
for whatever it does before them: when each whole-host Check walked the cross product APQN by
APQN (~0.3 s with the reply, 128 of them ~40 s), the Ping went unanswered for 20 s and
dbus-daemon gave up (NoReply, 25 s) on the flooder's last 50 Checks. Now the whole flood is
answered in ~9 s on a loaded 2-core machine, mostly marshalling 128 replies of 1.2 MB.

The guard is a generous liveness bound, not a speed figure (bench/checkbench.py measures).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections import Counter

from busrig import MANAGER, ROOT, Client
from dbus_fast import Message, MessageType
from relrig import Raw, SimFactory

NAME = "org.apmatrix.Apmatrix1"
FLOOD = 128  # dbus-daemon's max_replies_per_connection (system bus default)
GUARD = 20.0  # seconds: answered at all, well before dbus-daemon's 25 s reply timeout
EVERY = list(range(256))


class Flooder(Raw):
    """A raw connection that pipelines calls and counts the replies, parsing headers only."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.got: Counter[MessageType] = Counter()
        self.bytes = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        """Count each message by type once it is all in; skip bodies unparsed, uncopied (a
        reply is ~1.2 MB: a slow reader would hold the daemon up at its socket)."""
        head = bytearray()  # the start of the next message
        skip = 0  # bytes of the current message still to come
        kind = MessageType.METHOD_RETURN
        while True:
            try:
                chunk = memoryview(self.sock.recv(1 << 20))
            except OSError:
                return
            if not chunk:
                return
            self.bytes += len(chunk)
            while chunk:
                if skip:
                    took = min(skip, len(chunk))
                    skip, chunk = skip - took, chunk[took:]
                    if not skip:
                        self.got[kind] += 1
                    continue
                want = 16 - len(head)
                head += chunk[:want]
                chunk = chunk[want:]
                if len(head) < 16:
                    break
                order = "<" if head[:1] == b"l" else ">"
                body, _serial, fields = struct.unpack(order + "III", head[4:16])
                kind = MessageType(head[1])
                skip = fields + (-fields % 8) + body
                head.clear()
                if not skip:
                    self.got[kind] += 1

    def close(self) -> None:
        self.sock.close()
        self.reader.join(5)


async def victim(address: str) -> dict[str, float]:
    """Ping and a small Check; each must be answered (not an error, not dbus-daemon's NoReply)."""
    c = await Client.connect(address)
    took: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        reply = await asyncio.wait_for(c.call(ROOT, "org.freedesktop.DBus.Peer", "Ping"), GUARD)
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        took["Ping"] = time.monotonic() - t0
        t0 = time.monotonic()
        reply = await asyncio.wait_for(
            c.call(ROOT, MANAGER, "Check", "auaus", [[5], [4], ""]), GUARD
        )
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        assert [list(row) for row in reply.body[0]] == [[5, 4, "host"]]
        took["Check"] = time.monotonic() - t0
    finally:
        c.close()
    return took


def test_a_flood_of_whole_host_checks_does_not_stall_the_others(sim: SimFactory) -> None:
    s = sim()
    flooder = Flooder(s.address)
    try:
        costly = Message(
            destination=NAME,
            path=ROOT,
            interface=MANAGER,
            member="Check",
            signature="auaus",
            body=[EVERY, EVERY, ""],
        )
        for _ in range(FLOOD):
            flooder.send(costly)
        time.sleep(0.2)  # the flood is queued at the daemon before the victim asks
        t0 = time.monotonic()
        took = asyncio.run(victim(s.address))
        print(f"\ncheck flood: victim answered after {took} s ({time.monotonic() - t0:.1f} s)")
        # The flood was real: every Check answered in full (Hello's reply is one more).
        deadline = time.monotonic() + 120
        while flooder.got[MessageType.METHOD_RETURN] < FLOOD + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        got = flooder.got
        assert (got[MessageType.METHOD_RETURN], got[MessageType.ERROR]) == (FLOOD + 1, 0), got
        assert flooder.bytes > FLOOD * 65536 * 12, flooder.bytes
    finally:
        flooder.close()
    assert s.alive()
