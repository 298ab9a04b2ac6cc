"""The daemon's bus connection when the bus stops reading it (bounded, then dropped) and when
the bus goes away as the daemon stops (it exits at once, quietly)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from busrig import PrivateBus, start_daemon
from dbus_fast import Message

from apmatrixd.bus.base import ApmatrixBus, PatientWriter


def test_a_bus_that_stops_reading_is_dropped_past_the_queue_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dbus-daemon stopped (SIGSTOP): signals pile up in the writer queue until its limit,
    then the connection is dropped (the daemon exits, systemd restarts it) instead of the
    queue growing without end. Below the limit a full socket only waits."""
    monkeypatch.setattr(PatientWriter, "LIMIT", 8 << 20)
    bus_daemon = PrivateBus.start()
    chunk = "x" * (256 << 10)

    async def go() -> tuple[int, BaseException | None]:
        bus = await ApmatrixBus(bus_address=bus_daemon.address).connect()
        os.kill(bus_daemon.proc.pid, signal.SIGSTOP)
        try:
            sent = 0
            while bus.connected and sent < 4 * PatientWriter.LIMIT:
                bus.send(Message.new_signal("/t", "org.apmatrix.Test", "Big", "s", [chunk]))
                sent += len(chunk)
                await asyncio.sleep(0)  # the writer runs: a full socket leaves it waiting
            try:
                await asyncio.wait_for(bus.wait_for_disconnect(), 5)  # type: ignore[no-untyped-call]
                err: BaseException | None = None
            except Exception as e:
                err = e
            return sent, err
        finally:
            os.kill(bus_daemon.proc.pid, signal.SIGCONT)

    try:
        sent, err = asyncio.run(go())
    finally:
        bus_daemon.stop()
    assert isinstance(err, ConnectionError) and "dropping the connection" in str(err), err
    # dropped only past the limit: what the sockets took (4 MiB send buffer and the stopped
    # daemon's receive buffer) plus the limit itself, not at the first full socket
    assert PatientWriter.LIMIT < sent < 4 * PatientWriter.LIMIT, sent


@pytest.mark.parametrize("bus_first", [True, False], ids=["bus-gone-then-sigterm", "at-once"])
def test_sigterm_while_the_bus_goes_away_exits_at_once_and_quietly(bus_first: bool) -> None:
    """At shutdown dbus-daemon may stop at the same moment as apmatrixd (a poweroff stops both).
    The daemon is frozen while its bus dies and SIGTERM arrives, so it wakes to both at once
    (or, ``bus-gone-then-sigterm``, to a bus already gone): it must exit within a few seconds,
    never wait for a reply that cannot come (systemd would kill it after 90 s), and log no
    traceback or never-retrieved exception."""
    for _ in range(3):  # both orders of the two wake-ups within one loop turn get their chance
        bus_daemon = PrivateBus.start()
        d = start_daemon(bus_daemon.address)
        try:
            os.kill(d.proc.pid, signal.SIGSTOP)
            bus_daemon.proc.kill()
            bus_daemon.proc.wait(5)
            if bus_first:
                os.kill(d.proc.pid, signal.SIGCONT)
                time.sleep(0.2)
                d.proc.send_signal(signal.SIGTERM)
            else:
                d.proc.send_signal(signal.SIGTERM)
                os.kill(d.proc.pid, signal.SIGCONT)
            try:
                rc = d.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
                pytest.fail(f"apmatrixd still running 5 s after SIGTERM: {d.stderr()}")
            err = d.stderr()
            assert rc in (0, 1), err
            for bad in ("Traceback", "never retrieved", "Errno 9", "resync failed"):
                assert bad not in err, err
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            d.close()
            bus_daemon.stop()
