"""In-process checks of the small pieces: sd_notify, CreateMatrix options, polkit replies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid as uuidlib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageFlag, MessageType, Variant

from apmatrixd import notify
from apmatrixd.auth import Authority
from apmatrixd.bus.objects import Ids, Options, Str, parse_options
from apmatrixd.core import InvalidArgument


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_notify_reaches_abstract_and_path_sockets(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if kind == "abstract":
            name = f"apmatrixd-unit-{uuidlib.uuid4().hex}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            sock.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify.notify("READY=1", "STATUS=hi")
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"


def test_notify_unset_is_a_noop_and_errors_do_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.notify("READY=1") is False  # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.notify("READY=1") is False


def test_notify_never_hangs_on_a_receiver_that_stops_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full datagram queue drops the message at once (or after ``wait``): the daemon's loop
    must not freeze in send() while its supervisor is busy (found by tests/reliability)."""
    import time

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sent = 0
        while notify.notify(f"STATUS=serving {sent} matrices"):
            sent += 1
            assert sent < 100_000
        assert sent > 0
        # a blocking send() would hang here until pytest's timeout: returning at all is the test
        assert notify.notify("STATUS=full") is False
        t0 = time.monotonic()
        assert notify.notify("STOPPING=1", wait=0.2) is False
        assert time.monotonic() - t0 >= 0.15  # it did wait for room, as asked
        assert sock.recv(100) == b"STATUS=serving 0 matrices"
        assert notify.notify("STATUS=room again")


def test_watchdog_interval_honours_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert notify.watchdog_interval() is None


def test_options_are_checked_by_key_and_type() -> None:
    got = parse_options({"adapters": Variant("au", [5]), "start": Variant("b", False)})
    assert got == {"adapters": [5], "start": False}
    with pytest.raises(InvalidArgument, match="'colour'"):
        parse_options({"colour": Variant("s", "red")})
    with pytest.raises(InvalidArgument, match="'autostart' must be of type b, not s"):
        parse_options({"autostart": Variant("s", "yes")})


class FakeBus:
    """Answers GetConnectionUnixUser with ``uid`` and CheckAuthorization with ``result``."""

    def __init__(self, uid: int, result: Any) -> None:
        self.uid, self.result, self.calls = uid, result, 0

    async def call(self, msg: Message) -> Message:
        if msg.member == "GetConnectionUnixUser":
            return reply("u", [self.uid])
        self.calls += 1
        if isinstance(self.result, str):
            return Message(
                message_type=MessageType.ERROR,
                reply_serial=1,
                error_name=self.result,
                signature="s",
                body=["no"],
            )
        return reply("(bba{ss})", [self.result])


def reply(sig: str, body: list[Any]) -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature=sig, body=body)


def authorise(
    bus: FakeBus, member: str, interactive: bool = False, calls: str | None = None
) -> None:
    """Authorise a message calling ``calls`` (default: ``member``) as ``member``."""
    flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
    iface, _, name = (calls or member).rpartition(".")
    msg = Message(
        path="/x", interface=iface or None, member=name, sender=":1.9", serial=1, flags=flags
    )
    asyncio.run(Authority(bus).authorise(msg, member))  # type: ignore[arg-type]


def test_polkit_decisions_map_to_the_right_errors() -> None:
    create = "org.apmatrix.Apmatrix1.Manager.CreateMatrix"
    root = FakeBus(0, (False, False, {}))
    authorise(root, create)
    assert root.calls == 0  # root never asks
    authorise(FakeBus(1000, (True, False, {})), create)
    with pytest.raises(DBusError) as e:
        authorise(FakeBus(1000, (False, True, {})), create)
    assert e.value.type == "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
    with pytest.raises(DBusError) as e:
        authorise(FakeBus(1000, (False, True, {})), create, interactive=True)
    assert e.value.type == "org.freedesktop.DBus.Error.AccessDenied"
    with pytest.raises(DBusError) as e:
        authorise(FakeBus(1000, "org.freedesktop.DBus.Error.ServiceUnknown"), create)
    assert (e.value.type, "unreachable" in e.value.text) == (
        "org.freedesktop.DBus.Error.AccessDenied",
        True,
    )
    # reads need nothing; a method missing from the table is refused even to root
    authorise(FakeBus(1000, "x.Fail"), "org.apmatrix.Apmatrix1.Manager.Check")
    with pytest.raises(DBusError) as e:
        authorise(FakeBus(0, (True, False, {})), "org.apmatrix.Apmatrix1.Manager.NewThing")
    assert e.value.type == "org.freedesktop.DBus.Error.AccessDenied"


def test_the_message_authorised_is_the_one_dispatched() -> None:
    """Authorising one method for a message that calls another is refused, root too: the
    check judges the call in hand, never a remembered one."""
    create = "org.apmatrix.Apmatrix1.Manager.CreateMatrix"
    for other in ("org.apmatrix.Apmatrix1.Manager.Check", "org.apmatrix.Apmatrix1.Matrix.Remove"):
        bus = FakeBus(0, (True, False, {}))
        with pytest.raises(DBusError, match="does not match") as e:
            authorise(bus, create, calls=other)
        assert e.value.type == "org.freedesktop.DBus.Error.AccessDenied"
    # a call without an interface names only the member: that one must match
    authorise(FakeBus(0, (True, False, {})), create, calls=".CreateMatrix")


def test_the_dispatcher_answers_properties_objects_and_introspection() -> None:
    """Nothing of ours is exported to dbus-fast: the dispatcher answers Properties,
    GetManagedObjects and Introspect of our objects with dbus-fast's replies and errors, and
    leaves the library's own cases (a signature that fits nothing, a path not ours) to it."""
    from apmatrixd.bus.base import Dispatcher, Exported, live_prop, prop

    class Thing(Exported):
        Name = prop("Name", "s")
        Ids = prop("Ids", "au")
        Count = live_prop("Count", "u", lambda self: 7)

    root, below = "/org/apmatrix/Apmatrix1", "/org/apmatrix/Apmatrix1/matrices/x"
    iface = "org.apmatrix.Apmatrix1.Matrix"
    d = Dispatcher(None)  # type: ignore[arg-type]  # no call of ours runs: no bus needed
    d.add(root, Thing("org.apmatrix.Apmatrix1.Manager", Authority(None), {"Name": "m", "Ids": []}))
    d.add(below, Thing(iface, Authority(None), {"Name": "x", "Ids": [1, 2]}))

    def ask(path: str, member: str, sig: str = "", body: list[Any] | None = None,
            interface: str = "org.freedesktop.DBus.Properties") -> Any:  # fmt: skip
        return d(Message(destination=":1.1", path=path, interface=interface, member=member,
                         signature=sig, body=body or [], serial=1))  # fmt: skip

    def error(reply: Any) -> str:
        assert isinstance(reply, Message) and reply.message_type == MessageType.ERROR, reply
        return str(reply.error_name).rsplit(".", 1)[-1]

    got = ask(below, "GetAll", "s", [iface])
    assert got.signature == "a{sv}"
    assert {k: (v.signature, v.value) for k, v in got.body[0].items()} == {
        "Name": ("s", "x"), "Ids": ("au", [1, 2]), "Count": ("u", 7),
    }  # fmt: skip
    assert ask(below, "Get", "ss", [iface, "Count"]).body == [Variant("u", 7)]
    assert error(ask(below, "Get", "ss", [iface, "Nope"])) == "UnknownProperty"
    assert error(ask(below, "Set", "ssv", [iface, "Name", Variant("s", "y")])) == "PropertyReadOnly"
    assert error(ask(below, "GetAll", "s", ["org.nope"])) == "UnknownInterface"
    assert ask(below, "GetAll", "s", ["org.freedesktop.DBus.Peer"]).body == [{}]
    assert ask(below, "GetAll", "s", [""]) is False  # dbus-fast: NotSupported
    assert ask(below, "Get", "s", [iface]) is False  # dbus-fast: UnknownMethod
    assert ask(root + "/nope", "GetAll", "s", [iface]) is False  # dbus-fast: UnknownObject

    om = "org.freedesktop.DBus.ObjectManager"
    assert set(ask(root, "GetManagedObjects", interface=om).body[0]) == {below}
    assert set(ask("/", "GetManagedObjects", interface=om).body[0]) == {root, below}
    assert ask("/org/other", "GetManagedObjects", interface=om).body == [{}]

    intro = "org.freedesktop.DBus.Introspectable"
    assert '<node name="org"/>' in ask("/", "Introspect", interface=intro).body[0]
    text = ask(root, "Introspect", interface=intro).body[0]
    assert '<node name="matrices"/>' in text and om in text
    assert ask("/elsewhere", "Introspect", interface=intro) is False  # dbus-fast: empty node


def test_reads_nobody_wants_answered_are_dropped() -> None:
    """A flood of read-only calls with NO_REPLY_EXPECTED (which dbus-daemon does not bound)
    costs nothing; changes and calls that want a reply go through (tests/reliability)."""
    from apmatrixd.bus.base import drop_unwanted_reads

    def msg(iface: str, member: str, flags: MessageFlag) -> Message:
        return Message(
            destination="org.apmatrix.Apmatrix1",
            path="/org/apmatrix/Apmatrix1",
            interface=iface,
            member=member,
            flags=flags,
        )

    no_reply = MessageFlag.NO_REPLY_EXPECTED
    assert drop_unwanted_reads(msg("org.apmatrix.Apmatrix1.Manager", "Check", no_reply))
    assert drop_unwanted_reads(msg("org.freedesktop.DBus.Properties", "GetAll", no_reply))
    assert not drop_unwanted_reads(msg("org.apmatrix.Apmatrix1.Manager", "Check", MessageFlag.NONE))
    assert not drop_unwanted_reads(msg("org.apmatrix.Apmatrix1.Manager", "Reserve", no_reply))


def test_a_full_socket_makes_the_bus_wait_not_disconnect(system_bus: str) -> None:
    """dbus-fast 5.2.0 took EAGAIN from send() for a dead connection (python-dbus-next#153):
    a burst of signals larger than the socket's buffer cut the daemon off the bus."""
    from apmatrixd.bus.base import ApmatrixBus

    async def go() -> tuple[int, bool]:
        bus = await ApmatrixBus(bus_address=system_bus).connect()
        listener = await ApmatrixBus(bus_address=system_bus).connect()
        heard = 0
        done = asyncio.Event()
        n = 300

        def on(msg: Message) -> None:
            nonlocal heard
            if msg.member == "Burst":
                heard += 1
                if heard == n:
                    done.set()

        listener.add_message_handler(on)
        await listener.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{bus.unique_name}',member='Burst'"],
            )
        )
        assert bus._sock is not None
        bus._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the smallest there is
        payload = "x" * 200_000
        for _ in range(n):  # 60 MB queued at once: send() must block many times
            bus.send(Message.new_signal("/t", "org.apmatrix.Test", "Burst", "s", [payload]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        alive = bus.connected
        bus.disconnect()
        listener.disconnect()
        return heard, alive

    heard, alive = asyncio.run(go())
    assert alive and heard == 300


ORDERED: list[str] = []
"""What the two kinds of change handler of the ordering test did, in order."""


def _ordered_manager() -> Any:
    from apmatrixd.bus.base import Exported, call

    class Manager(Exported):
        @call
        async def CreateMatrix(self, uuid: Str, options: Options) -> Str:  # a handler of its own
            ORDERED.append("create")
            return uuid

        @call
        def Reserve(self, adapters: Ids, domains: Ids) -> Awaitable[None]:  # queues a command
            ORDERED.append("reserve")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

    return Manager


def test_a_root_callers_pipelined_calls_keep_their_order() -> None:
    """A change by root known as such is queued in its message's callback (no task); one
    sent right behind a call of the same caller still in a task (an async handler, or one
    being authorised) waits its turn in a task too, so it cannot overtake it: a Reserve sent
    after a CreateMatrix of the same adapter must find the matrix there."""
    from apmatrixd.bus.base import Dispatcher

    class Bus:
        connected = True

        def __init__(self) -> None:
            self.sent: list[Message] = []

        def send(self, msg: Message) -> None:
            self.sent.append(msg)

    ORDERED.clear()
    root = "/org/apmatrix/Apmatrix1"
    iface = "org.apmatrix.Apmatrix1.Manager"

    async def go() -> None:
        bus = Bus()
        auth = Authority(bus)  # type: ignore[arg-type]
        auth._uids[":1.5"] = 0  # root, as already known from an earlier call
        d = Dispatcher(bus)  # type: ignore[arg-type]
        d.add(root, _ordered_manager()(iface, auth, {}))

        def msg(member: str, sig: str, body: list[Any], serial: int) -> Message:
            return Message(path=root, interface=iface, member=member, signature=sig,
                           body=body, sender=":1.5", serial=serial)  # fmt: skip

        assert d(msg("CreateMatrix", "sa{sv}", ["g", {}], 1)) is True
        assert d(msg("Reserve", "auau", [[5], []], 2)) is True
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(bus.sent) == 2  # both answered
        assert d(msg("Reserve", "auau", [[6], []], 3)) is True  # nothing in flight: at once
        assert ORDERED == ["create", "reserve", "reserve"]

    asyncio.run(go())
