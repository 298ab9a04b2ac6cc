"""The daemon's bus connection when the bus stops reading it: bounded, then dropped."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from busrig import PrivateBus
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
