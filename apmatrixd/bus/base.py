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
import asyncio
import collections
import collections.abc
import contextlib
import functools
import inspect
import logging
import os
import socket
import typing
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dbus_fast import DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.constants import ErrorType
from dbus_fast.signature import get_signature_tree

from apmatrixd.bus import names
from apmatrixd.bus.introspect import STANDARD, introspect

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
    if isinstance(suffix, str) and isinstance(getattr(exc, "name", None), str):
        suffix = exc.name  # type: ignore[attr-defined]  # one refusal of several names its own
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
        (names.MANAGER_IFACE, "CheckWithOptions"),
        (names.MATRIX_IFACE, "LibvirtXML"),
    }
)


def drop_unwanted_reads(msg: Message) -> bool:
    """A message handler: True (handled, nothing to do) for a read nobody wants answered."""
    if (
        msg.message_type == MessageType.METHOD_CALL
        and bool(msg.flags & MessageFlag.NO_REPLY_EXPECTED)
        and (msg.interface, msg.member) in _READS
    ):
        _close_all(msg.unix_fds)  # dropped: so are the descriptors it carried
        return True
    return False


@dataclass(frozen=True)
class Sig:
    """The D-Bus signature of an ``Annotated`` type (``Annotated[list[int], Sig("au")]``).

    Ours, not ``dbus_fast.annotations`` (4.0+): what dbus-fast is handed is always the plain
    signature string, which every version from Debian 12's 1.84 on reads."""

    signature: str


@dataclass(frozen=True)
class Method:
    """One of our D-Bus methods, as :class:`Dispatcher` runs it."""

    member: str
    in_signature: str
    out_signature: str
    out_count: int
    fds: tuple[int, ...]
    """Positions of the ``h`` arguments: the message carries indices, the handler gets fds."""
    fn: Handler
    queues: bool = False
    """``fn`` only queues a command and returns its future (``-> Awaitable[...]``, not
    ``async def``): run in the message's own callback, answered from the future."""


METHOD_ATTR = "__apmatrixd_method__"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"


def call(fn: Handler) -> Any:
    """Declare a D-Bus method: authorised against its message, run, errors named.

    ``fn`` answers a read at once, or returns the future of the command it queued (every
    change), which the :class:`Dispatcher` awaits: the loop serves other calls meanwhile.
    The D-Bus signature comes from the annotations (``Annotated`` aliases), resolved here
    once. Only the :class:`Dispatcher` runs it: nothing is registered with dbus-fast, so a
    call the dispatcher does not take (another signature) is the library's UnknownMethod.
    """
    member = fn.__name__
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())[1:]
    ret = hints.get("return", inspect.Signature.empty)
    queues = typing.get_origin(ret) is collections.abc.Awaitable
    if queues:  # a queued change: what it gives
        (ret,) = typing.get_args(ret)
    in_types = [_signature_of(hints.get(p.name, p.annotation)) for p in params]
    out_sig = "" if ret in (None, type(None), inspect.Signature.empty) else _signature_of(ret)
    setattr(
        fn,
        METHOD_ATTR,
        Method(
            member,
            "".join(in_types),
            out_sig,
            len(get_signature_tree(out_sig).types),
            tuple(i for i, t in enumerate(in_types) if t == "h"),
            fn,
            queues and not inspect.iscoroutinefunction(fn),
        ),
    )
    return fn


def _signature_of(annotation: Any) -> str:
    """The D-Bus signature of an ``Annotated[..., DBusSignature(...)]`` alias or a plain
    signature string (what dbus-fast accepts in annotations)."""
    if isinstance(annotation, str):
        return annotation
    for meta in getattr(annotation, "__metadata__", ()):
        text = getattr(meta, "signature", None)
        if isinstance(text, str):
            return text
    raise TypeError(f"no D-Bus signature in {annotation!r}")


def methods_of(cls: type) -> dict[str, Method]:
    """``member`` -> :class:`Method` of every :func:`call` of an exported class."""
    out: dict[str, Method] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            method = getattr(value, METHOD_ATTR, None)
            if isinstance(method, Method):
                out[method.member] = method
    return out


class Dispatcher:
    """Answers every call to our objects: our methods (authorise *this* message, run, reply),
    Properties, GetManagedObjects and Introspect.

    A message handler on the bus, consulted before dbus-fast's dispatch (nothing of ours is
    exported to dbus-fast): a call whose path, interface (or none), member and signature name
    one of our methods is taken here, and so are Properties calls to our objects, every
    GetManagedObjects and the introspection of our objects and the nodes above them.
    Everything else (Peer, a signature that fits nothing, a path with no object) is left to
    dbus-fast, whose answers are the library's errors as before. The caller's identity is
    read from the message in hand, so no call can be judged by another call's sender. File
    descriptors a message carries are closed once it has been handled: a handler that keeps
    one duplicates it. Properties are public reads (the bus policy says who may ask), as
    dbus-fast served them.
    """

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._objects: dict[str, dict[str, Exported]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: collections.Counter[str] = collections.Counter()  # sender -> its tasks
        # Told the error name of every call answered with an error (Manager.Statistics).
        self.on_refused: Callable[[str], None] | None = None

    def add(self, path: str, obj: Exported) -> None:
        self._objects.setdefault(path, {})[obj.name] = obj

    def remove(self, path: str) -> list[Exported]:
        """Every interface at ``path`` dropped; the objects that were there."""
        return list(self._objects.pop(path, {}).values())

    def find(self, msg: Message) -> tuple[Exported, Method] | None:
        ifaces = self._objects.get(msg.path or "")
        if not ifaces:
            return None
        candidates = ifaces.values() if msg.interface is None else [ifaces.get(msg.interface)]
        for obj in candidates:
            if obj is None:
                continue
            method = obj.methods.get(msg.member or "")
            if method is not None and method.in_signature == msg.signature:
                return obj, method
        return None

    def children(self, path: str) -> set[str]:
        prefix = path.rstrip("/") + "/"
        return {p[len(prefix) :].split("/", 1)[0] for p in self._objects if p.startswith(prefix)}

    def __call__(self, msg: Message) -> bool | Message:
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        iface = msg.interface
        found = None
        answer: bool | Message = False
        if iface == PROPERTIES:
            answer = self._properties(msg)
        elif iface == INTROSPECTABLE and msg.member == "Introspect" and not msg.signature:
            answer = self._introspect(msg)
        elif iface == OBJECT_MANAGER and msg.member == "GetManagedObjects":  # any signature, as
            answer = self._managed_objects(msg)  # dbus-fast took it
        else:
            found = self.find(msg)
        if found is None:
            # None of these, nor anything of dbus-fast's, takes a descriptor: closed now,
            # before the answer, so a caller that has its reply knows the daemon holds none of
            # its descriptors (a later callback would wait behind every message in the socket).
            _close_all(msg.unix_fds)
            return answer
        obj, method = found
        key = f"{obj.name}.{method.member}"
        sender = msg.sender or ""
        if method.queues and not self._busy[sender] and obj.authority.allowed_now(msg, key):
            # A change by root, as already known: nobody to ask, so no task for the call;
            # it is answered from its command's future. Everything else runs in a task of
            # its own (a flood of costly reads must not hold up each message's callback),
            # and so does a change sent behind a call of the same sender still in a task:
            # its command must not be queued before that call's (calls keep their order).
            pending = self._start(msg, obj, method, key)
            if pending is not None:
                self._spawn(sender, self._await(msg, method, key, pending))
        else:
            self._spawn(sender, self._authorise(msg, obj, method, key))
        return True

    def _spawn(self, sender: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        self._busy[sender] += 1
        task.add_done_callback(functools.partial(self._done, sender))

    def _done(self, sender: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._busy[sender] -= 1
        if not self._busy[sender]:
            del self._busy[sender]

    def _introspect(self, msg: Message) -> bool | Message:
        """Ours, from the shipped XML (argument names included), and the nodes above ours
        (``/``, ``/org``, ...) with their children, so ``busctl tree`` finds everything."""
        path = msg.path or "/"
        ifaces = self._objects.get(path)
        children = self.children(path)
        if ifaces is None and not children:
            return False  # not ours: dbus-fast's empty node
        return Message.new_method_return(msg, "s", [introspect(path, ifaces or (), children)])

    def _managed_objects(self, msg: Message) -> Message:
        """Every object below the path (every one for ``/``), as dbus-fast answered it."""
        base = msg.path or "/"
        prefix = base.rstrip("/") + "/"
        try:
            found = {
                path: {name: obj.properties() for name, obj in ifaces.items()}
                for path, ifaces in self._objects.items()
                if base == "/" or path.startswith(prefix)
            }
        except Exception as exc:  # a value that does not fit its signature
            return self._error(msg, exc, "ObjectManager.GetManagedObjects")
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [found])

    def _properties(self, msg: Message) -> bool | Message:
        """Get, GetAll and Set (every property is read-only) of our objects, with dbus-fast's
        errors; a bad signature, an empty interface or a path not ours is the library's."""
        member = msg.member or ""
        ifaces = self._objects.get(msg.path or "")
        if _PROPERTY_CALLS.get(member) != msg.signature or ifaces is None or not msg.body[0]:
            return False
        iface = msg.body[0]
        obj = ifaces.get(iface)
        if obj is None:
            if iface in STANDARD or iface == OBJECT_MANAGER:  # they have no properties
                if member == "GetAll":
                    return Message.new_method_return(msg, "a{sv}", [{}])
                return _unknown_property(msg, iface, msg.body[1])
            return Message.new_error(
                msg,
                ErrorType.UNKNOWN_INTERFACE.value,
                f'could not find an interface "{iface}" at path: "{msg.path}"',
            )
        try:
            if member == "GetAll":
                return Message.new_method_return(msg, "a{sv}", [obj.properties()])
            spec = obj.declared.get(msg.body[1])
            if spec is None:
                return _unknown_property(msg, iface, msg.body[1])
            if member == "Set":
                return Message.new_error(
                    msg, ErrorType.PROPERTY_READ_ONLY.value, "the property is readonly"
                )
            signature, read = spec
            return Message.new_method_return(msg, "v", [Variant(signature, read(obj))])
        except Exception as exc:  # a value that does not fit its signature
            return self._error(msg, exc, f"{iface}.{member}")

    def _error(self, msg: Message, exc: Exception, key: str) -> Message:
        err = to_dbus_error(exc, key)
        self._refused(err.type)
        return Message.new_error(msg, err.type, err.text)

    async def _authorise(self, msg: Message, obj: Exported, method: Method, key: str) -> None:
        try:
            await obj.authority.authorise(msg, key)
        except Exception as exc:
            self._finish(msg, self._error(msg, exc, key))
            return
        except BaseException:  # cancelled (the daemon stops): no answer, no descriptor kept
            _close_all(msg.unix_fds)
            raise
        pending = self._start(msg, obj, method, key)
        if pending is not None:  # in this task: a handler of its own runs before later calls
            await self._await(msg, method, key, pending)

    def _start(self, msg: Message, obj: Exported, method: Method, key: str) -> Any:
        """Run the authorised call: a read is answered now, a change when it is committed;
        a handler of its own (async def) is returned, for the caller to await."""
        try:
            args = list(msg.body)
            for i in method.fds:
                index = args[i]
                if not 0 <= index < len(msg.unix_fds):
                    raise DBusError(
                        names.error_name("InvalidArgument"), f"no file descriptor #{index}"
                    )
                args[i] = msg.unix_fds[index]
            result = method.fn(obj, *args)
        except Exception as exc:
            self._finish(msg, self._error(msg, exc, key))
            return None
        if isinstance(result, asyncio.Future):  # a change: queued as a command
            result.add_done_callback(functools.partial(self._committed, msg, method, key))
        elif inspect.isawaitable(result):  # a handler of its own (async def)
            return result
        else:
            self._finish(msg, self._reply(msg, method, result))
        return None

    async def _await(self, msg: Message, method: Method, key: str, pending: Any) -> None:
        try:
            result = await pending
        except Exception as exc:
            self._finish(msg, self._error(msg, exc, key))
            return
        except BaseException:
            _close_all(msg.unix_fds)
            raise
        self._finish(msg, self._reply(msg, method, result))

    def _committed(self, msg: Message, method: Method, key: str, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():  # the daemon stops: nobody answers, as an awaiting task did not
            _close_all(msg.unix_fds)
            return
        exc = fut.exception()
        if exc is None:
            self._finish(msg, self._reply(msg, method, fut.result()))
        elif isinstance(exc, Exception):
            self._finish(msg, self._error(msg, exc, key))
        else:  # SystemExit and the like stop the loop where they were raised
            _close_all(msg.unix_fds)

    @staticmethod
    def _reply(msg: Message, method: Method, result: Any) -> Message:
        if method.out_count == 0:
            body: list[Any] = []
        elif method.out_count == 1:
            body = [result]
        else:
            body = list(result)
        return Message.new_method_return(msg, method.out_signature, body)

    def _finish(self, msg: Message, reply: Message) -> None:
        """Close the descriptors the call carried (a handler that keeps one duplicated it),
        then reply unless the caller asked for none."""
        _close_all(msg.unix_fds)
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED or not self._bus.connected:
            return
        try:
            self._bus.send(reply)
        except Exception as exc:  # an answer that does not fit its signature: said, not raised
            err = to_dbus_error(exc, f"the reply to {msg.interface}.{msg.member}")
            self._bus.send(Message.new_error(msg, err.type, err.text))

    def _refused(self, name: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(name)
            except Exception:  # counting must never cost the caller its answer
                log.exception("counting a refused call failed")


_PROPERTY_CALLS = {"Get": "ss", "GetAll": "s", "Set": "ssv"}


def _unknown_property(msg: Message, iface: str, name: str) -> Message:
    return Message.new_error(
        msg,
        ErrorType.UNKNOWN_PROPERTY.value,
        f'interface "{iface}" does not have property "{name}"',
    )


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def signal(signature: str) -> Callable[[Handler], Any]:
    """Declare a D-Bus signal whose arguments have ``signature``: calling the method sends it
    from every path the object is exported at, with the arguments the method returns."""

    def decorate(fn: Handler) -> Any:
        member = fn.__name__

        @functools.wraps(fn)
        def emit(self: Exported, *args: Any) -> Any:
            body = fn(self, *args)
            self.send_signal(self.name, member, signature, body)
            return body

        setattr(emit, _SIGNAL, (member, signature))
        return emit

    return decorate


def prop(name: str, signature: str) -> Any:
    """A read-only property served from the object's value cache."""
    return live_prop(name, signature, lambda self: self.values[name])


def live_prop(name: str, signature: str, read: Callable[[Any], Any]) -> Any:
    """A read-only property computed at each read (``read(obj)``), neither cached nor
    signalled (the XML says EmitsChangedSignal false): counters that change too often for
    a signal each time."""

    def getter(self: Exported) -> Any:
        return read(self)

    getter.__name__ = name
    getter.__qualname__ = name
    setattr(getter, _DECLARED, (name, signature, read))
    return property(getter)


_DECLARED = "apmatrixd_property"
"""Attribute of a :func:`live_prop` getter: (D-Bus name, signature, read)."""
_SIGNAL = "apmatrixd_signal"
"""Attribute of a :func:`signal` method: (member, signature)."""

PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = names.OBJECT_MANAGER_IFACE


class Exported:
    """An exported interface: methods (run by :class:`Dispatcher`), properties from
    :attr:`values`, signals; published with :meth:`ApmatrixBus.publish`.

    Not a dbus-fast ``ServiceInterface``: the dispatcher answers calls, Properties and
    GetManagedObjects for our objects itself, from the declarations collected once per class
    here (a ServiceInterface inspects its class for each object: ~0.2 ms an object, a quarter
    of start-up with 1,000 matrices, and its PropertiesChanged walks every property)."""

    declared: ClassVar[dict[str, tuple[str, Callable[[Any], Any]]]] = {}
    """Every property of the class (prop and live_prop): name -> (signature, read)."""
    signals: ClassVar[dict[str, str]] = {}
    """Every :func:`signal` of the class: member -> signature."""
    methods: ClassVar[dict[str, Method]] = {}
    """Every :func:`call` of the class: member -> Method."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, tuple[str, Callable[[Any], Any]]] = {}
        sigs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(getattr(attr, "fget", None), _DECLARED, None)
                if spec is not None:
                    found[spec[0]] = (spec[1], spec[2])
                sig = getattr(attr, _SIGNAL, None)
                if sig is not None:
                    sigs[sig[0]] = sig[1]
        cls.declared, cls.signals, cls.methods = found, sigs, methods_of(cls)

    def __init__(self, interface: str, authority: Authority, values: dict[str, Any]) -> None:
        self.name = interface
        self.authority = authority
        self.values = values
        self.at: list[tuple[MessageBus, str]] = []
        """Where it is published (bus, path): where its signals go."""

    def properties(self) -> dict[str, Variant]:
        """Every property as GetAll answers it (and InterfacesAdded, GetManagedObjects)."""
        return {n: Variant(sig, read(self)) for n, (sig, read) in self.declared.items()}

    def refresh(self, values: dict[str, Any]) -> None:
        """Store new values; one PropertiesChanged with only those that differ."""
        old, declared = self.values, self.declared
        changed = {
            k: Variant(declared[k][0], v)
            for k, v in values.items()
            if old.get(k) != v and k in declared
        }
        self.values = values
        if changed:
            self.send_signal(PROPERTIES, "PropertiesChanged", "sa{sv}as", [self.name, changed, []])

    def send_signal(self, interface: str, member: str, signature: str, body: list[Any]) -> None:
        for bus, path in self.at:
            bus.send(Message.new_signal(path, interface, member, signature, body))


class PatientWriter(_MessageWriter):
    """dbus-fast's socket writer, except that a full socket means "wait until writable", and
    a change's signals and its reply go out in one write.

    dbus-fast 5.2.0 (as python-dbus-next, issue #153) takes the BlockingIOError of a
    non-blocking ``send()`` for a broken connection and drops the bus: a burst of signals
    larger than the socket buffer (a storm, thousands of matrices) cut the daemon off.
    Here the message stays where it was, the loop's writer callback stays registered, and the
    write goes on when the socket drains. Any other error still ends the connection.

    dbus-fast sends each message at once: a ``send()`` each, and a wake-up of dbus-daemon
    each (~0.1 ms of the daemon's CPU on a busy machine). A change's PropertiesChanged are
    sent in the turn of the loop its command completes, its reply in the next (the caller's
    task wakes then); so what is queued is written two turns later, consecutive messages
    without descriptors joined into one ``send()`` (up to :attr:`JOIN` bytes), in order.
    Past :attr:`JOIN` bytes queued it is written at once (128 whole-host Checks answered in
    one turn are 150 MB: held back they passed :attr:`LIMIT`).

    The queue is bounded: past :attr:`LIMIT` bytes waiting, the bus has stopped reading from
    us (dbus-daemon itself bounds what it holds for a slow client), so the connection is
    dropped instead of growing without end; the daemon exits and systemd restarts it.
    """

    LIMIT = 64 << 20
    """Bytes of marshalled messages that may wait for the socket."""

    JOIN = 256 << 10
    """Bytes of consecutive messages joined into one write."""

    queued = 0
    corked = False
    futs: tuple[asyncio.Future[None] | None, ...] = ()  # those of the buffer being written

    def schedule_write(
        self, msg: Message | None = None, future: asyncio.Future[None] | None = None
    ) -> None:
        if not self.bus.connected:  # gone (dropped, or the bus went away): nothing to write to
            if future is not None and not future.done():
                future.set_exception(ConnectionError("the bus connection is closed"))
                # Marked as seen: a signal sent as the bus goes away is awaited by nobody, and
                # the loss is logged once ("lost the bus connection"), not per message.
                future.exception()
            return
        if msg is not None:
            self.buffer_message(msg, future)
        if not self.bus.unique_name:
            pass  # before Hello's reply dbus-fast waits too
        elif self.queued >= self.JOIN:
            self.flush()  # big replies (a whole-host Check) go at once: bounded, as before
        elif not self.corked:
            self.corked = True
            self.loop.call_soon(self.loop.call_soon, self.uncork)
        if self.queued > self.LIMIT:
            err = ConnectionError(
                f"{self.queued >> 20} MiB wait to be sent and the bus reads none of it "
                f"(limit {self.LIMIT >> 20} MiB): dropping the connection"
            )
            log.error("%s", err)
            self._owner().drop(err)

    def uncork(self) -> None:
        """Write what the last two turns queued; the rest when the socket drains."""
        self.corked = False
        self.flush()

    def flush(self) -> None:
        """Write what is queued now, as far as the socket takes it."""
        if self.fd is None or not self.bus.connected:
            return
        self.write_callback(remove_writer=False)
        if self.buf is not None or self.messages:
            self.loop.add_writer(self.fd, self.write_callback)

    def buffer_message(self, msg: Message, future: asyncio.Future[None] | None = None) -> None:
        super().buffer_message(msg, future)
        self.queued += len(self.messages[-1][0])

    def _owner(self) -> ApmatrixBus:
        assert isinstance(self.bus, ApmatrixBus)  # installed by ApmatrixBus only
        return self.bus

    def _next(self) -> None:
        """The next buffer to write: a message with descriptors alone, else consecutive
        ones without, joined."""
        buf, self.unix_fds, fut = self.messages.popleft()
        futs = [fut]
        if not self.unix_fds and self.messages and not self.messages[0][1]:
            joined = bytearray(buf)
            while self.messages and not self.messages[0][1] and len(joined) < self.JOIN:
                more, _fds, fut = self.messages.popleft()
                joined += more
                futs.append(fut)
            buf = joined
        self.futs = tuple(futs)
        self.buf, self.offset = memoryview(buf), 0
        self.queued -= len(buf)

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
                    self._next()
                assert self.buf is not None
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
                for f in self.futs:
                    if f is not None and not f.done():
                        f.set_result(None)
                self.futs = ()
        except Exception as err:
            disconnecting = self._owner().disconnecting
            for f in self.futs:
                if f is not None and not f.done():
                    if disconnecting:
                        f.set_result(None)
                    else:
                        f.set_exception(err)
            self.futs = ()
            self._owner().drop(err)


class ApmatrixBus(MessageBus):
    """A MessageBus that serves our objects through :class:`Dispatcher`, sends the
    ObjectManager's signals from the manager's path, and drops read-only calls nobody wants
    answered (:func:`drop_unwanted_reads`).

    Objects are published here (:meth:`publish`, :meth:`withdraw`), not exported to
    dbus-fast. InterfacesAdded/Removed go out from the ObjectManager's path, where clients
    (GDBus, sd-bus) match on them (dbus-rig.md §3), with the properties of our own
    declarations (:meth:`Exported.properties`).
    """

    SNDBUF = 4 << 20
    """Socket send buffer: a burst of signals goes out in few writes (a full socket no
    longer drops the connection: :class:`PatientWriter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("negotiate_unix_fd", True)  # ImportMdevctlFd/ExportMdevctlFd take one
        super().__init__(*args, **kwargs)
        self.add_message_handler(drop_unwanted_reads)
        self.dispatcher = Dispatcher(self)
        self.add_message_handler(self.dispatcher)
        # Before the name is ours nobody can be watching our objects: the start-up export
        # of thousands of matrices sends no InterfacesAdded flood (it overran the socket).
        self.announce = False

    def drop(self, err: Exception) -> None:
        """End the connection for ``err`` (dbus-fast's own teardown: its futures fail)."""
        self._finalize(err)

    def disconnect(self) -> None:
        """Write what the writer holds back for the next turns first (replies, signals)."""
        if isinstance(self._writer, PatientWriter) and self._writer.corked:
            self._writer.uncork()
        super().disconnect()

    @property
    def disconnecting(self) -> bool:
        """True once we asked to disconnect (a write failing then is no error)."""
        return bool(self._user_disconnect)

    def publish(self, path: str, obj: Exported) -> None:
        """Serve ``obj`` at ``path`` (InterfacesAdded once we own the name)."""
        self.dispatcher.add(path, obj)
        obj.at.append((self, path))
        if not self._announced(path):
            return
        try:
            values = obj.properties()
        except Exception:  # a value that does not fit its signature: GetAll names it too
            log.exception("properties of %s at %s unreadable", obj.name, path)
            return
        self._manager_signal("InterfacesAdded", "oa{sa{sv}}", [path, {obj.name: values}])

    def withdraw(self, path: str) -> None:
        """Serve nothing at ``path`` any more (InterfacesRemoved once we own the name)."""
        gone = self.dispatcher.remove(path)
        for obj in gone:
            with contextlib.suppress(ValueError):
                obj.at.remove((self, path))
        if gone and self._announced(path):
            self._manager_signal("InterfacesRemoved", "oas", [path, [o.name for o in gone]])

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

    def _announced(self, path: str) -> bool:
        return (
            self.announce and not self._disconnected and path.startswith(names.MANAGER_PATH + "/")
        )

    def _manager_signal(self, member: str, signature: str, body: list[Any]) -> None:
        self.send(Message.new_signal(path=names.MANAGER_PATH, interface=names.OBJECT_MANAGER_IFACE,
                                     member=member, signature=signature, body=body))  # fmt: skip


__all__ = [
    "ApmatrixBus",
    "Dispatcher",
    "Exported",
    "Method",
    "call",
    "drop_unwanted_reads",
    "live_prop",
    "methods_of",
    "prop",
    "to_dbus_error",
]
