"""The daemon's bus connection when the bus stops reading it (bounded, then dropped) and when
the bus goes away as the daemon stops (it exits at once, quietly)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from busrig import PrivateBus, start_daemon
from dbus_fast import Message
from dbus_fast.aio import MessageBus

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


class _CountingSocket:
    """The bus socket, counting the writes made to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes: list[str] = []

    def send(self, data: memoryview) -> int:
        self.writes.append("send")
        return self.sock.send(data)

    def sendmsg(self, buffers: list[memoryview], ancdata: list[Any]) -> int:
        self.writes.append("sendmsg")
        return self.sock.sendmsg(buffers, ancdata)


def test_a_change_s_signals_and_reply_go_out_in_one_write() -> None:
    """What two turns of the loop queue (a change's signals, then its reply a turn later)
    is one send(), in order; a message with descriptors still goes alone, with them."""
    bus_daemon = PrivateBus.start()
    test = ("/t", "org.apmatrix.Test")

    async def go() -> tuple[list[str], list[Message]]:
        heard: list[Message] = []
        got_all = asyncio.Event()
        address = bus_daemon.address
        listener = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()

        def hear(msg: Message) -> None:
            if msg.interface == test[1]:
                heard.append(msg)
                if msg.member == "Fd":
                    got_all.set()

        listener.add_message_handler(hear)
        match = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                        body=[f"interface='{test[1]}'"])  # fmt: skip
        await listener.call(match)
        bus = await ApmatrixBus(bus_address=bus_daemon.address).connect()
        await bus.call(match)  # whatever connect() queued is written by now
        counting = _CountingSocket(bus._writer.sock)  # type: ignore[union-attr]
        bus._writer.sock = counting  # type: ignore[union-attr,assignment]
        bus.send(Message.new_signal(*test, "S0", "s", ["0"]))
        bus.send(Message.new_signal(*test, "S1", "s", ["1"]))
        await asyncio.sleep(0)  # the next turn, as a change's reply
        bus.send(Message.new_signal(*test, "S2", "s", ["2"]))
        for _ in range(3):
            await asyncio.sleep(0)
        r, w = os.pipe()
        bus.send(Message.new_signal(*test, "Fd", "h", [0], unix_fds=[r]))
        await asyncio.wait_for(got_all.wait(), 10)
        os.close(r)
        os.close(w)
        bus.disconnect()
        listener.disconnect()
        return counting.writes, heard

    try:
        writes, heard = asyncio.run(go())
    finally:
        bus_daemon.stop()
    assert writes == ["send", "sendmsg"], writes
    assert [m.member for m in heard] == ["S0", "S1", "S2", "Fd"]
    assert len(heard[-1].unix_fds) == 1
    os.close(heard[-1].unix_fds[0])
