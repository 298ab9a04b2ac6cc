"""Wiring for what the kernel does on its own: uevent bursts and the rescan timer, as commands.

A burst of uevents (the :class:`~apmatrixd.events.EventPump` hands over one
:class:`~apmatrixd.events.Scope` per burst) or a tick of the slow rescan timer becomes one
resync command (:func:`apmatrixd.service.sync.resync`) on the service's queue. While one is
waiting for its turn, later bursts merge into it: a storm that outlasts a slow command costs
one more resync, not one per burst. A resync whose read fails is retried once reading
everything; if that fails too, it is tried again later with a growing delay (0.1 s doubling
to 30 s) until one succeeds. Cards whose holders' guest views still contradicted them after
a resync (vfio_ap updates guest views when its scan is over, and says so with no uevent) are
read again with their holders once, ``settle`` later.

A burst that is a ``config`` flip whole (:attr:`~apmatrixd.events.Scope.flipped`: the card's
uevent, then one per queue, by the kernel's order) has its cards read in a thread of its own
as soon as it is handed over, while the worker reads their holders' guest views, which do not
depend on that reading where the kernel gives them (``guest_matrix``): two round trips through
sysfs at once instead of one after the other. Not while the queues' uevents still come: that
thread then took the interpreter from the loop draining them, ~20 us a uevent. A burst that
merges into a resync still waiting its turn reads its cards there, as ever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from apmatrixd.events import ApEvent, EventPump, Scope, Source
from apmatrixd.kernel import KernelError
from apmatrixd.service import sync
from apmatrixd.service.executor import Command, Stopping
from apmatrixd.service.state import Changes
from apmatrixd.service.sync import MANAGER, drift_text

if TYPE_CHECKING:
    from apmatrixd.service import Service

__all__ = ["MANAGER", "HotPlug", "drift_text", "scope_of"]

log = logging.getLogger(__name__)

EARLY_CARDS = 4
"""Of a burst of cards flipping, the first are read in a thread of their own; the others with
the rest of the resync (a storm's start)."""

RETRY_FIRST = 0.1
RETRY_MAX = 30.0


def scope_of(events: Iterable[ApEvent], lost: bool = False) -> Scope:
    """The re-reads a list of events calls for (the pump builds the same as they arrive)."""
    s = Scope()
    for e in events:
        s.add(e)
    if lost:
        s.lose()
    return s


class HotPlug:
    """Wires a uevent source, the pump, the service's queue and the rescan timer together.

    Counters (``stats()``): uevents received and handled by the pump, batches, rescans,
    resync commands run, failed reads, Drift signals sent and Changes batches emitted.
    """

    def __init__(
        self,
        service: Service,
        loop: asyncio.AbstractEventLoop,
        *,
        rescan_interval: float = 30.0,
        settle: float = 0.05,
        settle_min: float = 0.005,
        storm: int = 64,
    ) -> None:
        self.service = service
        self.loop = loop
        self.pump = EventPump(
            loop,
            self.on_batch,
            settle=settle,
            settle_min=settle_min,
            storm=storm,
            on_settling=service.set_settling,
            queues=self._queues_of,
        )
        self.rescan_interval = rescan_interval
        self.sources: list[Source] = []
        self.rescans = 0
        self.resyncs = 0
        self.failures = 0
        self.drifts = 0
        self.emitted = 0
        self._timer: asyncio.Task[None] | None = None
        self._queued: Scope | None = None
        self._queued_future: asyncio.Future[Changes] | None = None
        # Cards of a flip read as the burst is handed over, for the resync waiting its turn.
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._queued_early: dict[int, Callable[[], tuple[bool, bool] | None]] = {}
        self.early_reads = 0
        self._retry: asyncio.TimerHandle | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._late: set[int] = set()
        self._backoff = 0
        self._closed = False
        self._tick = False  # the resync still to run includes a tick of the rescan timer
        # What else the slow timer looks at (chzdev's persistent masks: daemon.py).
        self.on_rescan: list[Callable[[], None]] = []
        service.subscribe(self._count)
        service.on_resync = self.request_resync

    def _queues_of(self, adapter: int) -> frozenset[int] | None:
        """The queues the state knows card ``adapter`` to have (the pump's end-of-flip test)."""
        info = self.service.state.infos.get(adapter)
        return None if info is None else info.domains

    def _count(self, _changes: Changes) -> None:
        self.emitted += 1

    def start(self, source: Source) -> None:
        source.start()
        self.sources.append(source)  # once it runs: then uevents are heard (sync.believed)
        if self.rescan_interval > 0 and self._timer is None:
            self._timer = asyncio.ensure_future(self._rescan_loop())

    def on_batch(self, s: Scope) -> asyncio.Future[Changes]:
        if self._queued is None and s.flipped:  # else merged: read with the rest, in its turn
            self._queued_early = self._read_early(sorted(s.flipped)[:EARLY_CARDS])
        return self.submit(s)

    def _read_early(self, cards: list[int]) -> dict[int, Callable[[], tuple[bool, bool] | None]]:
        """Start reading these cards' states off the loop; what the resync calls to take each
        (it waits for the reading if need be)."""
        if self._closed:
            return {}
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, "apmatrixd-early")
        read = self.service.kernel.read_card
        self.early_reads += len(cards)
        return {a: self._reader.submit(read, a).result for a in cards}

    def rescan(self) -> asyncio.Future[Changes]:
        """The slow timer: a slice of the mdevs, mdevctl's directory, and the host pool where
        its changes come without a uevent (the changes no uevent announces;
        :func:`~apmatrixd.service.sync.rescan_slice` says what it skips)."""
        self.rescans += 1
        self._tick = True
        fut = self.submit(Scope(pool=not self.masks_heard(), sliced=True))
        for hook in self.on_rescan:
            hook()
        return fut

    def masks_heard(self) -> bool:
        """A change of apmask or aqmask reaches us as a uevent (``APMASK=``/``AQMASK=`` on
        the bus root, which makes its burst read the pool): a source runs and the kernel
        sends them (:attr:`~apmatrixd.kernel.Features.mask_uevents`)."""
        return bool(self.sources) and self.service.kernel.features.mask_uevents

    def request_resync(self) -> None:
        """A command could not read back what it did: re-read the pool and every mdev."""
        if not self._closed:
            self.submit(Scope(pool=True))

    def submit(self, s: Scope) -> asyncio.Future[Changes]:
        """Queue a resync of ``s``, or merge it into the one still waiting for its turn."""
        if self._queued is not None and self._queued_future is not None:
            self._queued.merge(s)
            self._queued_early = {}
            return self._queued_future
        self._queued = s
        fut = self.service.executor.submit("resync", self._command)
        self._queued_future = fut
        fut.add_done_callback(self._finished)
        return fut

    def _command(self) -> Command[Changes]:
        # Not `or`: a Scope is false without events, as the timer's (pool only) is.
        s = self._queued if self._queued is not None else Scope()
        early, self._queued_early = self._queued_early, {}
        self._queued, self._queued_future = None, None
        return self._resync(s, early)

    def _resync(
        self, s: Scope, early: dict[int, Callable[[], tuple[bool, bool] | None]]
    ) -> Command[Changes]:
        self.resyncs += 1
        only = last = None
        guests_only = False
        tick, self._tick = self._tick, False
        # A tick merged with a burst is not sliced: then it reads the pool, as it always did.
        pool = s.pool or (tick and not s.sliced)
        if s.sliced:
            only = sync.rescan_slice(self.service, self.rescans, self.rescan_interval)
            if self.sources:  # uevents tell what else changes a guest view (sync.believed)
                last = sync.believed(self.service, only)
        elif not (s.everything or pool or s.others):  # only cards and queues
            only = sync.burst_slice(self.service, s.cards | s.whole | s.named.keys())
            last, guests_only = sync.believed(self.service, only), True
        try:
            changes: Changes = yield from sync.resync(
                self.service,
                cards=s.cards,
                whole=s.whole,
                named=s.named,
                everything=s.everything,
                pool=pool,
                bindings=s.bindings,
                only=only,
                last_read=last,
                guests_only=guests_only,
                on_late=None if s.late else self.recheck,
                early=early,
                rescan=tick,
            )
        except KernelError as err:
            # Something vanished while it was read (a card leaving mid-burst): read it all.
            log.warning("re-reading after uevents failed (%s); reading everything", err)
            self.failures += 1
            changes = yield from sync.resync(self.service, everything=True, pool=True)
        self.drifts += len(changes.drift)
        return changes

    def recheck(self, cards: frozenset[int]) -> None:
        """Read these cards and their holders again ``settle`` from now: the guest views
        contradicted the cards even when read once more, so vfio_ap may still be scanning
        (that read is followed up no further: a contradiction that stays is the kernel's)."""
        if self._closed:
            return
        self._late |= cards
        if self._recheck is None:
            self._recheck = self.loop.call_later(self.pump.settle, self._read_late)

    def _read_late(self) -> None:
        self._recheck = None
        cards, self._late = self._late, set()
        self.submit(Scope(cards=cards, late=True))

    @property
    def rechecking(self) -> bool:
        """A read again of contradicted cards is due (:meth:`recheck`)."""
        return self._recheck is not None

    def _finished(self, fut: asyncio.Future[Changes]) -> None:
        if fut.cancelled() or self._closed:
            return
        err = fut.exception()
        if err is None:
            self._backoff = 0
            return
        if isinstance(err, Stopping):  # the daemon is stopping: nothing left to re-read for
            return
        self.failures += 1
        delay = min(RETRY_FIRST * 2**self._backoff, RETRY_MAX)
        self._backoff += 1
        if isinstance(err, KernelError):
            log.error("cannot re-read the AP configuration (%s); again in %.1f s", err, delay)
        else:
            log.error("resync failed; again in %.1f s", delay, exc_info=err)
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self.loop.call_later(delay, self._again)

    def _again(self) -> None:
        self._retry = None
        everything = Scope()
        everything.lose()
        self.submit(everything)

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            if not self.service.executor.busy:  # a queued resync covers it already
                self.rescan()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None
        for source in self.sources:
            source.close()
        self.pump.close()
        if self.service.on_resync == self.request_resync:
            self.service.on_resync = None

    def stats(self) -> dict[str, int]:
        return {
            **self.pump.stats(),
            "rescans": self.rescans,
            "resyncs": self.resyncs,
            "failures": self.failures,
            "drifts": self.drifts,
            "emitted": self.emitted,
            "early_reads": self.early_reads,
        }
