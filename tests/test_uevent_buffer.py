"""The uevent socket: its receive buffer (128 MiB with CAP_NET_ADMIN, else said, not silent)
and its drain (every queued uevent taken in one go, an overflow told to the pump)."""

from __future__ import annotations

import os
import subprocess
import sys

from rigs import in_netns, need_netns, need_tool, unavailable

from apmatrixd.events import RECEIVE_BUFFER

PROBE = """
import asyncio, logging
from apmatrixd.events import EventPump, UdevSource
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
pump = EventPump(asyncio.new_event_loop(), lambda batch: None)
print(UdevSource(pump).receive_buffer)
"""


def probe(*pre: str) -> tuple[int, str]:
    r = subprocess.run(
        [*pre, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), r.stderr


def test_the_buffer_is_what_was_asked_with_cap_net_admin_and_said_without() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (CAP_NET_ADMIN)", installable=False)
    need_tool("setpriv", "util-linux")
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    got, log = probe()
    assert got >= RECEIVE_BUFFER, got  # the kernel reports twice what it was given
    assert "receive buffer" not in log, log
    got, log = probe("setpriv", "--bounding-set=-net_admin", "--inh-caps=-all", "--")
    if rmem_max >= RECEIVE_BUFFER:  # this host lets anyone have the buffer: nothing to say
        assert got >= RECEIVE_BUFFER and "receive buffer" not in log, (got, log)
        return
    assert got <= 2 * rmem_max, got
    assert "uevent receive buffer stays at" in log and "CAP_NET_ADMIN" in log, log


DRAIN = """
import asyncio, socket
from apmatrixd.events import EventPump, UdevSource
from apmatrixd.sim.uevent import NetlinkSink
from apmatrixd.sim.vfs import Uevent

loop = asyncio.new_event_loop()
pump = EventPump(loop, lambda batch: None)
source = UdevSource(pump)
source.start()
sink = NetlinkSink()

def card(n, seq):
    sink.send(Uevent("change", "/devices/ap/card05", "ap", seq, "ap_card", "cex4card",
                     {"CONFIG": "1"}))
    for d in range(n):
        sink.send(Uevent("change", f"/devices/ap/card05/05.{d:04x}", "ap", seq + 1 + d,
                         "ap_queue", "vfio_ap", {"CONFIG": "1"}))
    sink.send(Uevent("change", "/devices/platform/foo", "platform", seq + n + 1))  # filtered

card(85, 1)
source._readable()  # one drain takes what is queued, and stops when nothing is left
print(pump.received, pump.scope.cards == {5} and not pump.scope.others, pump.lost)
# A buffer too small for the next burst: the kernel drops some (ENOBUFS on the next read).
with socket.fromfd(source.monitor.fileno(), socket.AF_NETLINK, socket.SOCK_RAW) as s:
    s.setsockopt(socket.SOL_SOCKET, 33, 4096)  # SO_RCVBUFFORCE
card(400, 200)
source._readable()
print(pump.overflows, pump.lost, 0 < pump.received - 86 < 401)
card(3, 1000)  # read after the overflow as ever
before = pump.received
source._readable()
print(pump.received - before)
"""


def test_a_drain_takes_every_queued_uevent_and_tells_an_overflow() -> None:
    """A card's 86 uevents queued on the monitor are all taken in one drain (the filtered
    one is not); a burst the buffer cannot hold is an overflow for the pump (ENOBUFS: the
    next batch reads everything), and what comes after is read as ever (pyudev's poll says
    POLLERR without an errno: the error stayed on the socket and every later wake-up failed
    on it)."""
    need_netns()
    r = in_netns(DRAIN)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["86 True False", "1 True True", "4"], (r.stdout, r.stderr)
