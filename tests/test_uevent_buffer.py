"""The uevent socket's receive buffer: 128 MiB with CAP_NET_ADMIN, else said, not silent."""

from __future__ import annotations

import os
import subprocess
import sys

from rigs import need_tool, unavailable

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
