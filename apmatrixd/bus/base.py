"""What every exported object stands on: authorise, call, name the error; cached properties.

Every D-Bus method is declared with :func:`call`, which authorises first (deny by default,
see :mod:`apmatrixd.auth`), runs the handler, and turns what it raises into one of our named
errors. An unexpected exception becomes ``Error.Failed`` plus a log line with the traceback:
never a traceback on the bus, never a dead daemon.

Properties are served from a per-object cache of D-Bus-ready values, so PropertiesChanged
carries exactly the values that differ from what clients last saw.

Floods (tests/reliability/test_abuse.py): dbus-daemon bounds the calls a client may have
waiting for a reply, but not those sent with NO_REPLY_EXPECTED. A read-only call sent that way
changes nothing and nobody wants its answer, so it is dropped unread
(:func:`drop_unwanted_reads`): a client cannot queue up unbounded work for the daemon with it.
"""

from __future__ import annotations

import array
import collections.abc
import functools
import inspect
import logging
import socket
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import DBusError, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from apmatrixd.bus import names

if TYPE_CHECKING:
    from apmatrixd.auth import Authority

log = logging.getLogger(__name__)

Handler = Callable[..., Any]


def to_dbus_error(exc: BaseException, member: str) -> DBusError:
    """Our named error for ``exc``.

    Core and kernel errors carry their D-Bus suffix as the class attribute ``name``; matching
    on it keeps the bus layer from importing the kernel backends.
    """
    if isinstance(exc, DBusError):
        return exc
    suffix = getattr(type(exc), "name", None)
    if isinstance(exc, Exception) and isinstance(suffix, str) and suffix in names.ERRORS:
        return DBusError(names.error_name(suffix), str(exc) or suffix)
    log.error("%s failed unexpectedly", member, exc_info=exc)
    return DBusError(
        names.FAILED, f"internal error in {member} ({type(exc).__name__}); see the apmatrixd log"
    )


_READS = frozenset(
    {
        ("org.freedesktop.DBus.Properties", "Get"),
        ("org.freedesktop.DBus.Properties", "GetAll"),
        ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
        ("org.freedesktop.DBus.Introspectable", "Introspect"),
        ("org.freedesktop.DBus.Peer", "Ping"),
        ("org.freedesktop.DBus.Peer", "GetMachineId"),
        (names.MANAGER_IFACE, "Check"),
    }
)


def drop_unwanted_reads(msg: Message) -> bool:
    """A message handler: True (handled, nothing to do) for a read nobody wants answered."""
    return (
        msg.message_type == MessageType.METHOD_CALL
        and bool(msg.flags & MessageFlag.NO_REPLY_EXPECTED)
        and (msg.interface, msg.member) in _READS
    )


def call(fn: Handler) -> Any:
    """Declare a D-Bus method: authorise, run ``fn``, then map errors.

    ``fn`` answers a read at once, or returns the future of the command it queued (every
    change), which is awaited here: the loop serves other calls meanwhile.

    dbus-fast reads the D-Bus signature from the annotations (``Annotated`` aliases); they are
    resolved here once, and ``-> None`` is dropped (dbus-fast would take it for a signature).
    """
    member = fn.__name__
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
    ]
    ret = hints.get("return", inspect.Signature.empty)
    if typing.get_origin(ret) is collections.abc.Awaitable:  # a queued change: what it gives
        (ret,) = typing.get_args(ret)

    @functools.wraps(fn)
    async def wrapper(self: Exported, *args: Any) -> Any:
        key = f"{self.name}.{member}"
        try:
            await self.authority.authorise(key)
            result = fn(self, *args)
            if inspect.isawaitable(result):  # a change: queued as a command, await its commit
                result = await result
            return result
        except DBusError:
            raise
        except Exception as exc:
            raise to_dbus_error(exc, key) from None

    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params,
        return_annotation=inspect.Signature.empty if ret is type(None) else ret,
    )
    return dbus_method()(wrapper)


def prop(name: str, signature: str) -> Any:
    """A read-only property served from the object's value cache."""

    def getter(self: Exported) -> Any:
        return self.values[name]

    getter.__name__ = name
    getter.__qualname__ = name
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ, name=name)(getter)


class Exported(ServiceInterface):
    """An exported interface whose properties come from :attr:`values`."""

    def __init__(self, interface: str, authority: Authority, values: dict[str, Any]) -> None:
        super().__init__(interface)
        self.authority = authority
        self.values = values

    def refresh(self, values: dict[str, Any]) -> None:
        """Store new values; one PropertiesChanged with only those that differ."""
        changed = {k: v for k, v in values.items() if self.values.get(k) != v}
        self.values = values
        if changed:
            self.emit_properties_changed(changed)


class PatientWriter(_MessageWriter):
    """dbus-fast's socket writer, except that a full socket means "wait until writable".

    dbus-fast 5.2.0 (as python-dbus-next, issue #153) takes the BlockingIOError of a
    non-blocking ``send()`` for a broken connection and drops the bus: a burst of signals
    larger than the socket buffer (a storm, thousands of matrices) cut the daemon off.
    Here the message stays where it was, the loop's writer callback stays registered, and the
    write goes on when the socket drains. Any other error still ends the connection.
    """

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        try:
            if sock is None or fd is None:
                raise ConnectionError("the bus socket is gone")
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, self.unix_fds, self.fut = self.messages.popleft()
                    self.buf, self.offset = memoryview(buf), 0
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        fds = array.array("i", self.unix_fds)
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                        sent = sock.sendmsg([self.buf[self.offset :]], ancdata)
                        self.unix_fds = None  # only once they are handed over
                    else:
                        sent = sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    return  # schedule_write (or the loop) keeps us registered as the writer
                self.offset += sent
                if self.offset < len(self.buf):
                    return  # the rest when the socket is writable again
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as err:
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(err)
            self.bus._finalize(err)


class ApmatrixBus(MessageBus):
    """A MessageBus whose ObjectManager signals are sent from the manager's path, and which
    drops read-only calls nobody wants answered (:func:`drop_unwanted_reads`).

    dbus-fast sends InterfacesAdded/Removed from the new object's own path; clients (GDBus,
    sd-bus) match on the ObjectManager's path and never see them (dbus-rig.md §3). These two
    hooks are private API: dbus-fast is pinned and a test checks the signal path.
    """

    SNDBUF = 4 << 20
    """Socket send buffer: a burst of signals goes out in few writes (a full socket no
    longer drops the connection: :class:`PatientWriter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_message_handler(drop_unwanted_reads)
        # Before the name is ours nobody can be watching our objects: the start-up export
        # of thousands of matrices sends no InterfacesAdded flood (it overran the socket).
        self.announce = False

    async def connect(self) -> ApmatrixBus:
        await super().connect()
        if type(self._writer) is _MessageWriter:  # the library's own: make it patient
            self._writer.__class__ = PatientWriter
        try:
            if self._sock is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SNDBUF)
        except OSError as err:  # capped by net.core.wmem_max for non-root: fine
            log.debug("cannot enlarge the bus socket's send buffer: %s", err)
        return self

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if not self.announce or self._disconnected or not path.startswith(names.MANAGER_PATH + "/"):
            return

        def send(iface: ServiceInterface, result: Any, _user: Any, err: Exception | None) -> None:
            if err is not None:
                log.error("properties of %s at %s unreadable", iface.name, path, exc_info=err)
                return
            self.send(
                Message.new_signal(
                    path=names.MANAGER_PATH,
                    interface=names.OBJECT_MANAGER_IFACE,
                    member="InterfacesAdded",
                    signature="oa{sa{sv}}",
                    body=[path, {iface.name: result}],
                )
            )

        ServiceInterface._get_all_property_values(interface, send)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if not self.announce or self._disconnected or not path.startswith(names.MANAGER_PATH + "/"):
            return
        self.send(
            Message.new_signal(
                path=names.MANAGER_PATH,
                interface=names.OBJECT_MANAGER_IFACE,
                member="InterfacesRemoved",
                signature="oas",
                body=[path, removed_interfaces],
            )
        )


__all__ = [
    "ApmatrixBus",
    "Exported",
    "call",
    "drop_unwanted_reads",
    "prop",
    "to_dbus_error",
]
