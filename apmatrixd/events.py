"""Kernel uevents as typed events on the asyncio loop, absorbed in batches.

Two sources feed one :class:`EventPump`, and everything after the pump is the same code:

- :class:`UdevSource`: a pyudev monitor on ``source='udev'`` (what udevd re-broadcasts after
  processing; ``source='kernel'`` cannot be fed by anything but the kernel), filtered in the
  kernel's BPF to the AP bus, the vfio_ap matrix device (``matrix``, ``ap_matrix`` on the 2017
  layout) and mdevs, read from the loop with ``add_reader``: no thread, no polling.
- :class:`SimSource`: the in-process emulator's uevents (``--simulate``). The emulator calls
  its listeners synchronously in whatever thread wrote (a FUSE thread under ``--sim-mount``), so
  the listener only appends to a deque and wakes the loop through a pipe.

The pump drains everything readable, then waits a short settle window after the last event
(capped, so a never-ending stream still gets processed) and hands the burst to one handler
call as a :class:`Scope` (the cards, the queues and the flags it names), built as the events
arrive: no list of events is kept, so a storm costs memory per card touched, not per event.
The window adapts: as long as the burst has lasted so far, between ``settle_min`` (5 ms: a
card's uevents come back to back) and ``settle`` (50 ms, reached once a storm has been going
for that long), so a small burst is handled at once and a storm is still absorbed in few
batches. A burst that is nothing but cards flipping ``config`` is handed over as soon as
every queue it must bring has come (:class:`ConfigFlips`). While a large burst is being
absorbed, ``on_settling(True)`` is called once, and ``on_settling(False)`` once it has been
handled; a few cards' flips are not large, whatever their queues (:data:`FEW_FLIPS`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

log = logging.getLogger(__name__)

SUBSYSTEMS = ("ap", "matrix", "ap_matrix", "mdev")
"""What the monitor lets through: the AP bus, the matrix device (both layouts), mdevs."""

RECEIVE_BUFFER = 128 * 1024 * 1024
"""Socket buffer for storms (udevd uses the same); needs CAP_NET_ADMIN to exceed rmem_max."""

Kind = Literal["bus", "card", "queue", "matrix", "mdev"]


class ApEvent(NamedTuple):
    """One uevent, reduced to what the daemon acts on (which driver a queue went to is read
    from sysfs, and the order is the socket's: DRIVER= and SEQNUM= are not kept). A tuple:
    one is made per uevent, 86 for a card back, and a frozen dataclass costs 3x as much."""

    action: str  # add | remove | change | bind | unbind | ...
    kind: Kind
    devpath: str
    adapter: int | None = None  # card and queue events
    domain: int | None = None  # queue events
    uuid: str | None = None  # mdev events
    config: bool | None = None  # CONFIG=0/1
    online: bool | None = None  # ONLINE=0/1
    mask: bool = False  # APMASK= / AQMASK= on the bus root: the host pool moved
    bindings: bool = False  # BINDINGS=complete on the bus root: every queue has its driver
    mdev_state: str | None = None  # MDEV_STATE= on the matrix device (vfio_ap (un)loaded)


def _flag(value: str | None) -> bool | None:
    if value == "1":
        return True
    if value == "0":
        return False
    return None


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def classify(props: Mapping[str, str]) -> ApEvent | None:
    """A uevent's properties (the emulator's, or any mapping of them) as an event.

    None for anything that is not ours (another subsystem, a devpath we do not know).
    """
    return classify_parts(
        props.get("ACTION") or "",
        props.get("DEVPATH") or "",
        props.get("SUBSYSTEM") or "",
        props.get,
    )


def classify_device(device: Any) -> ApEvent | None:
    """A pyudev ``Device`` from the monitor as an event: the fields libudev keeps apart
    (action, devpath, subsystem) from its attributes, only the others looked up among its
    properties. Each is a call into libudev and a decode, ~1.5 us, times 86 for one card
    back: no more of them than the event needs."""
    return classify_parts(
        device.action or "",
        device.device_path or "",
        device.subsystem or "",
        device.properties.get,
    )


def classify_parts(
    action: str,
    devpath: str,
    subsystem: str,
    get: Callable[[str], str | None],
) -> ApEvent | None:
    """:func:`classify` of a uevent's fields; ``get`` looks up any other property."""
    name = devpath.rsplit("/", 1)[-1]
    if subsystem == "ap":
        if devpath == "/devices/ap":
            mask = get("APMASK") is not None or get("AQMASK") is not None
            bindings = get("BINDINGS") == "complete"
            return ApEvent(action, "bus", devpath, mask=mask, bindings=bindings)
        kind: Kind
        if len(name) == 6 and name.startswith("card"):
            kind, a, d = "card", _hex(name[4:]), None
            if a is None:
                return None
        elif len(name) == 7 and name[2] == ".":
            kind, a, d = "queue", _hex(name[:2]), _hex(name[3:])
            if a is None or d is None:
                return None
        else:
            return None
        config = _flag(get("CONFIG"))
        # The kernel sends CONFIG= and ONLINE= in uevents of their own (kernel-facts 3.1).
        online = _flag(get("ONLINE")) if config is None else None
        return ApEvent(action, kind, devpath, adapter=a, domain=d, config=config, online=online)
    if subsystem in ("matrix", "ap_matrix") and name == "matrix":
        return ApEvent(action, "matrix", devpath, mdev_state=get("MDEV_STATE") or None)
    if subsystem == "mdev" and len(name) == 36:
        return ApEvent(action, "mdev", devpath, uuid=name.lower())
    return None


FEW_FLIPS = 4
"""A burst of at most this many cards flipping ``config`` (:class:`ConfigFlips`) is no storm,
however many queues they have: its end is known by the count, and it is handed over then."""

QUEUE_LIMIT = 16
"""Beyond this many queues of one card named in a burst, the whole card is read again."""

_QUEUE_ACTIONS = frozenset({"add", "remove", "bind", "unbind"})


@dataclass(slots=True)
class Scope:
    """What a burst may have changed, so only that is read again.

    Built event by event as they arrive (:meth:`add`), so a storm of 65,792 uevents is a few
    sets of small ints, not 65,792 objects held until the burst is handled.
    """

    cards: set[int] = field(default_factory=set)  # the card's online, config (not its type)
    whole: set[int] = field(default_factory=set)  # the card with every queue and driver
    named: dict[int, set[int]] = field(default_factory=dict)  # card -> queues added/bound/...
    everything: bool = False  # events were lost, or vfio_ap itself changed
    # An event other than a card's or a queue's (an mdev, the bus root, the matrix
    # device): the burst re-reads every mdev, not only those holding its cards.
    others: bool = False
    pool: bool = False  # the host pool (masks, or queues between drivers) may have moved
    bindings: bool = False  # the bus said BINDINGS=complete
    events: int = 0  # how many events this scope sums up
    # The rescan timer's alone: the pool and a slice of the mdevs (sync.rescan_slice); any
    # event or loss merged in makes it a read of every mdev again.
    sliced: bool = False
    # A read again of cards whose holders' guest views contradicted them (HotPlug.recheck):
    # followed up no further. Any event or loss merged in makes it an ordinary burst.
    late: bool = False
    # The cards whose config flip the burst holds whole by the kernel's order, and nothing
    # else (ConfigFlips.complete): what was read of them once their own uevent came holds.
    flipped: frozenset[int] = frozenset()

    def add(self, e: ApEvent) -> None:
        """One event into the scope. What an event does not say precisely (an action we do
        not know on a card or a queue) costs a read of its whole card, never a miss."""
        self.events += 1
        self.sliced = self.late = False
        a = e.adapter
        if e.kind == "card" and a is not None:
            if e.action == "change":
                self.cards.add(a)
            else:  # add, remove, bind, unbind, or anything else: the card and its queues
                self._whole(a)
        elif e.kind == "queue" and a is not None and e.domain is not None:
            if e.action in _QUEUE_ACTIONS:
                if a not in self.whole:
                    named = self.named.setdefault(a, set())
                    named.add(e.domain)
                    if len(named) > QUEUE_LIMIT:
                        self._whole(a)
            elif e.action == "change":
                if e.config is not None:
                    self.cards.add(a)
                # ONLINE on a queue shows in no property: the card's own event covers it
            else:
                self._whole(a)
        if e.kind not in ("card", "queue"):
            self.others = True
        if e.kind == "bus":
            self.pool |= e.mask
            self.bindings |= e.bindings
        elif e.kind == "matrix":  # vfio_ap (un)loaded or re-registered
            self.everything = self.pool = True

    def lose(self) -> None:
        """Events were lost: only a read of everything can be trusted."""
        self.everything = self.pool = self.others = True
        self.sliced = self.late = False

    def _whole(self, a: int) -> None:
        self.whole.add(a)
        self.named.pop(a, None)

    def merge(self, other: Scope) -> None:
        """Fold another burst's scope into this one (a resync still waiting its turn)."""
        self.cards |= other.cards
        for a in other.whole:
            self._whole(a)
        for a, domains in other.named.items():
            if a not in self.whole:
                named = self.named.setdefault(a, set())
                named |= domains
                if len(named) > QUEUE_LIMIT:
                    self._whole(a)
        self.everything |= other.everything
        self.others |= other.others
        self.pool |= other.pool
        self.bindings |= other.bindings
        self.events += other.events
        self.sliced = self.sliced and other.sliced
        self.late = self.late and other.late
        self.flipped = frozenset()  # two bursts: a card may have changed in between

    def __bool__(self) -> bool:
        return bool(self.events or self.everything)


class ConfigFlips:
    """Whether a burst so far is only cards flipping ``config``, each with all its queues.

    The kernel's order (ap_bus.c: ``config_store()`` and ``ap_scan_adapter()``): the card's
    ``change`` with ``CONFIG=`` first, then, from the bus scan, one ``CONFIG=`` ``change`` per
    queue of the card (``ap_scan_domains()``). Once every queue the card is known to have has
    reported, that card's part of the burst is over and the pump hands it over at once. What
    the scan does after the last uevent sends no uevent of its own: another card's flip comes
    as a second burst, and vfio_ap's ``on_scan_complete`` updating the guest views is found by
    the resync's reading them again (a view that contradicts its cards is read once more, and
    once more a while later: :func:`apmatrixd.service.sync.resync`). A burst that is anything
    else (another event, a card not known, a queue not expected) is left to the adaptive
    window.
    """

    __slots__ = ("_left", "_other", "_queues")

    def __init__(self, queues: Callable[[int], frozenset[int] | None]) -> None:
        self._queues = queues  # the queues a card is known to have; None: card not known
        self._left: dict[int, set[int]] = {}  # card -> queues still to report
        self._other = False

    def add(self, e: ApEvent) -> None:
        if self._other:
            return
        a = e.adapter
        if e.action == "change" and e.config is not None and a is not None:
            if e.kind == "card" and a not in self._left:
                known = self._queues(a)
                if known is not None:
                    self._left[a] = set(known)
                    return
            elif e.kind == "queue" and (d := e.domain) is not None and d in self._left.get(a, ()):
                self._left[a].discard(d)
                return
        self._other = True

    def lose(self) -> None:
        self._other = True

    @property
    def complete(self) -> bool:
        """Every card of the burst has had all its queues' flips, and nothing else came."""
        return not self._other and bool(self._left) and not any(self._left.values())

    @property
    def few(self) -> bool:
        """So far only the flips of at most :data:`FEW_FLIPS` known cards, complete or not."""
        return not self._other and 0 < len(self._left) <= FEW_FLIPS

    @property
    def cards(self) -> frozenset[int]:
        """The cards whose flips the burst holds whole; empty unless :attr:`complete`."""
        return frozenset(self._left) if self.complete else frozenset()


Handler = Callable[[Scope], "asyncio.Future[Any] | None"]
"""Called with the scope of one burst (``everything`` when events were lost); may return the
future of the work it queued, and the burst counts as absorbed once that is done."""


class EventPump:
    """Collects events from any source and hands them over one burst at a time.

    ``received`` counts every event accepted, ``handled`` every event given to the handler,
    ``ignored`` the uevents that were not ours, ``batches`` the handler calls and ``overflows``
    the times the kernel said events were lost (ENOBUFS).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Handler,
        *,
        settle: float = 0.05,
        settle_min: float = 0.005,
        max_delay: float = 2.0,
        storm: int = 64,
        on_settling: Callable[[bool], None] | None = None,
        queues: Callable[[int], frozenset[int] | None] | None = None,
    ) -> None:
        self.loop = loop
        # The queues the daemon knows a card to have (None: not known): see ConfigFlips.
        self.queues: Callable[[int], frozenset[int] | None] = (
            queues if queues is not None else lambda _a: None
        )
        self.handler = handler
        self.settle = settle
        self.settle_min = min(settle_min, settle)
        self.max_delay = max_delay
        self.storm = storm
        self.on_settling = on_settling
        self.scope = Scope()
        self.flips = ConfigFlips(self.queues)
        self.lost = False
        self.settling = False
        self.received = 0
        self.handled = 0
        self.ignored = 0
        self.batches = 0
        self.overflows = 0
        self.largest = 0
        self._first = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = 0  # handed-over bursts whose work is not done yet

    def add(self, props: Mapping[str, str]) -> None:
        """One uevent; call :meth:`arm` after a round of adds."""
        self.take(classify(props))

    def take(self, event: ApEvent | None) -> None:
        """One classified uevent (None: not ours); call :meth:`arm` after a round."""
        if event is None:
            self.ignored += 1
            return
        now = self.loop.time()
        if not self.pending and not self.lost:
            self._first = now
        self._last = now
        self.scope.add(event)
        self.flips.add(event)
        self.received += 1

    def overflow(self) -> None:
        """The source lost events: the next burst resynchronises everything."""
        now = self.loop.time()
        if not self.pending and not self.lost:
            self._first = now
        self._last = now
        self.lost = True
        self.scope.lose()
        self.flips.lose()
        self.overflows += 1
        log.warning("uevents were lost (receive buffer overflow): a full rescan follows")

    @property
    def pending(self) -> int:
        """Events received and not handled yet."""
        return self.scope.events

    def arm(self) -> None:
        """After a drain: (re)start the settle timer, and say Settling if this is a storm."""
        if not self.pending and not self.lost:
            return
        now = self.loop.time()
        # A handful of events is over in milliseconds: flipping Settling for it would only
        # add signals (two, around the batch's), and so is a card's config flip with its 85
        # or 256 queues. A storm is many other events, or a burst still going after half
        # max_delay.
        long = now - self._first > self.max_delay / 2
        many = self.pending >= self.storm and not self.flips.few
        if not self.settling and (many or long):
            self._set_settling(True)
        deadline = min(now + self.window(now), self._first + self.max_delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self.flush)

    def window(self, now: float) -> float:
        """The quiet time to wait for: as long as the burst has lasted, within bounds.

        A small burst (one card: its uevents are sent back to back) is over in a few ms and
        waits ``settle_min``; a storm still going after ``settle`` waits the full ``settle``.
        A burst split by a pause longer than the window costs a second batch, not a wrong
        state: each batch resynchronises from sysfs, and unchanged objects send nothing.
        A burst of cards whose ``config`` flip is over by the kernel's order
        (:class:`ConfigFlips`) waits nothing: waiting could not tell when vfio_ap is done.
        """
        if self.flips.complete:
            return 0.0
        return min(self.settle, max(self.settle_min, now - self._first))

    def flush(self) -> None:
        """Hand the burst over now (the timer's job; tests may call it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        scope, lost = self.scope, self.lost
        scope.flipped = self.flips.cards
        self.scope, self.lost = Scope(), False
        self.flips = ConfigFlips(self.queues)
        n = scope.events
        if n or lost:
            started = time.monotonic()
            waited = self.loop.time() - self._last
            try:
                outcome = self.handler(scope)
                if isinstance(outcome, asyncio.Future):
                    self._waiting += 1
                    outcome.add_done_callback(self._absorbed)
            except Exception:
                # What the failed batch had read may be half taken: only the next batch's
                # reading everything can be trusted (a partial re-read would not repair it).
                self.scope.lose()
                log.exception("handling %d uevents failed; the next batch reads everything", n)
            self.handled += n
            self.batches += 1
            self.largest = max(self.largest, n)
            took = time.monotonic() - started
            level = logging.INFO if n >= self.storm or lost else logging.DEBUG
            log.log(
                level,
                "absorbed %d uevents in one batch (%.3f s; %d received, %d handled, %d batches)"
                "; burst %.1f ms, settle wait %.1f ms after the last",
                n,
                took,
                self.received,
                self.handled,
                self.batches,
                (self._last - self._first) * 1e3,
                waited * 1e3,
            )
        if self.settling and not self.pending and not self._waiting:
            self._set_settling(False)

    def _absorbed(self, _fut: asyncio.Future[Any]) -> None:
        self._waiting -= 1
        if self.settling and not self.pending and not self._waiting:
            self._set_settling(False)

    @property
    def busy(self) -> bool:
        """Events wait to be handed over, or handed-over work is not done."""
        return bool(self.pending or self.lost or self._waiting)

    def _set_settling(self, value: bool) -> None:
        self.settling = value
        if self.on_settling is not None:
            try:
                self.on_settling(value)
            except Exception:
                log.exception("settling listener failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "handled": self.handled,
            "ignored": self.ignored,
            "batches": self.batches,
            "overflows": self.overflows,
            "largest": self.largest,
            "pending": self.pending,
        }


class Source(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


class UdevSource:
    """The real path: a pyudev netlink monitor read from the loop."""

    def __init__(self, pump: EventPump) -> None:
        import pyudev

        self.pump = pump
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        for subsystem in SUBSYSTEMS:
            self.monitor.filter_by(subsystem)
        self.receive_buffer = self._enlarge_buffer()
        self._fd = -1

    def _receive(self) -> Any:
        """One uevent (None: none queued) through pyudev's public poll (its receive alone
        would spare a poll(2) per uevent, ~15 us, but is private). On an overflow poll sees
        POLLERR and raises without an errno, and reads nothing, so the error would stay and
        be seen again on every wake-up: it is taken from the socket (SO_ERROR, which clears
        it) and raised as what it is (ENOBUFS)."""
        try:
            return self.monitor.poll(timeout=0)
        except OSError as err:
            if err.errno is not None:
                raise
            fd = self.monitor.fileno()
            with socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW) as sock:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EIO
            raise OSError(code, os.strerror(code)) from err

    def _enlarge_buffer(self) -> int:
        """Ask for :data:`RECEIVE_BUFFER`; what the socket got (bytes, as the kernel counts).

        Beyond net.core.rmem_max this needs CAP_NET_ADMIN (SO_RCVBUFFORCE; the unit keeps
        it in the bounding set for this). Without it a storm may overflow the buffer: that
        is survived (ENOBUFS -> a full rescan, :meth:`EventPump.overflow`), and said here."""
        try:
            self.monitor.set_receive_buffer_size(RECEIVE_BUFFER)
            err: OSError | None = None
        except OSError as e:
            err = e
        with socket.fromfd(self.monitor.fileno(), socket.AF_NETLINK, socket.SOCK_RAW) as sock:
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if err is not None:
            log.warning(
                "uevent receive buffer stays at %d KiB (%s; needs CAP_NET_ADMIN): a uevent "
                "storm may overflow it and cost a full rescan",
                got // 1024,
                err.strerror or err,
            )
        return int(got)

    def start(self) -> None:
        self.monitor.start()
        self._fd = self.monitor.fileno()
        self.pump.loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                device = self._receive()
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self.pump.overflow()
                    continue
                log.error("reading uevents: %s", err)
                break
            if device is None:
                break
            self.pump.take(classify_device(device))
        self.pump.arm()

    def close(self) -> None:
        if self._fd >= 0:
            self.pump.loop.remove_reader(self._fd)
            self._fd = -1


class _Uevent(Protocol):
    def properties(self) -> dict[str, str]: ...


class _Subscribable(Protocol):
    def subscribe(self, listener: Callable[[Any], None]) -> Callable[[], None]: ...


class SimSource:
    """The emulator's uevents, from any thread, into the loop through a deque and a pipe."""

    def __init__(self, pump: EventPump, host: _Subscribable) -> None:
        self.pump = pump
        self.host = host
        self._queue: collections.deque[_Uevent] = collections.deque()
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self.pump.loop.add_reader(self._rfd, self._readable)
        self._unsubscribe = self.host.subscribe(self._on_uevent)

    def _on_uevent(self, uevent: _Uevent) -> None:
        """The emulator's listener: any thread, must be quick and never raise."""
        self._queue.append(uevent)
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wfd, b"\0")

    def _readable(self) -> None:
        # Empty the pipe first, then re-arm, then drain. Re-arming before the read lost
        # wake-ups: an event between the two wrote a byte the read then swallowed, leaving
        # the flag set with nothing in the pipe, and every later event sat in the queue.
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._rfd, 4096)
        self._woken = False  # before draining: an append from now on wakes us again
        queue, add = self._queue, self.pump.add
        while queue:
            add(queue.popleft().properties())
        self.pump.arm()

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._rfd >= 0:
            self.pump.loop.remove_reader(self._rfd)
            os.close(self._rfd)
            os.close(self._wfd)
            self._rfd = self._wfd = -1
