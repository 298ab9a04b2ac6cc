"""What the kernel did on its own: hot plug, degrade and restore, drift, and uevent storms.

The service's second entrance (the first is a client call): a burst of uevents, or the slow
rescan timer, leads to a re-read of what may have changed, the registry is brought in step,
and one :class:`~apmatrixd.service.Changes` batch goes out, so every object gets at most one
signal per burst. :class:`HostSync` is the service's own code split out by concept: it works
on the service's state directly, on the daemon's single thread.

Hot plug. Cards and queues that appear, vanish or flip ``config``/``online`` are re-read and
their Adapter objects follow. A matrix's guest view (``GuestApqns``) is re-read from the
kernel, so a matrix whose APQNs leave the host configuration turns ``degraded`` and returns
to ``active`` when they come back. On the upstream layout the masks persist, so the kernel
re-links returning queues to vfio_ap by itself. On the 2017 layout a returning queue may land
on ``cex4queue``; one that a matrix holds is taken back for it (re-reserved), as the
definition says.

Drift. The kernel sends no uevent when a matrix is changed behind the daemon's back (an
``echo`` into sysfs, mdevctl, libvirt), so every burst and every rescan re-reads every mdev of
our type. What differs from the registry raises ``Drift(matrix, what)`` once, and:

- changed sets: the kernel's sets are the truth. If the registry accepts them (no APQN of
  another matrix, none in the host pool, within the host's limits) they are adopted: the
  registry now holds them and the properties show them. If it does not (they clash with a
  matrix that is only defined), the registry keeps its last valid sets, so its invariants
  hold and no decision is taken on a picture it cannot trust; the properties show the
  kernel's sets all the same (``_Meta.truth``) and the Drift text says it was not adopted;
- an mdev created outside the daemon: adopted (``Adopted`` true), as at start-up; if its sets
  cannot be accepted it enters the registry empty, with its truth shown;
- a live matrix whose mdev was removed outside the daemon: it stays as a definition
  (``defined``); nothing the daemon did not do is undone or deleted;
- the host pool (apmask/aqmask written by hand, or queues moved between drivers on the 2017
  layout): adopted when the registry accepts it, with a Drift on the Manager's path.

The daemon never writes sysfs to undo a drift; only re-reserving a returning queue on the
2017 layout writes, and only what a definition already says. An adopted drift of a stored
matrix is written to the state directory, so that a restart does not take the kernel back to
the old definition (which would undo the admin's change after all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from apmatrixd.core import Apqn, DefineMatrix, HostPool, Matrix, SetHostPool, UpdateMatrix
from apmatrixd.events import ApEvent, EventPump, Scope, Source
from apmatrixd.kernel import AdapterInfo, KernelError, MdevInfo

if TYPE_CHECKING:
    from apmatrixd.service import Changes, Service

log = logging.getLogger(__name__)

MANAGER = ""
"""The ``uuid`` of a Drift that concerns the host pool (sent on the Manager's path)."""

FULL_READ = 16
"""Beyond this many cards to read with their queues, one read of the whole bus is cheaper."""


def scope_of(events: Iterable[ApEvent], lost: bool = False) -> Scope:
    """The re-reads a list of events calls for (the pump builds the same as they arrive).
    Every mdev is re-read in any case (drift)."""
    s = Scope()
    for e in events:
        s.add(e)
    if lost:
        s.lose()
    return s


def _present(infos: Mapping[int, AdapterInfo], q: Apqn) -> bool:
    info = infos.get(q.adapter)
    return info is not None and q.domain in info.domains


def _ids(ids: Iterable[int], width: int) -> str:
    return ",".join(f"{i:0{width}x}" for i in sorted(ids)) or "none"


def _sets_text(m: Matrix | MdevInfo) -> str:
    return (
        f"adapters {_ids(m.adapters, 2)} domains {_ids(m.domains, 4)}"
        f" control domains {_ids(m.control_domains, 4)}"
    )


def drift_text(kernel: MdevInfo, registry: Matrix) -> str:
    """``adapters: kernel 05,06,07 vs registry 05,06``, one part per differing set."""
    parts = []
    for label, width, k, r in (
        ("adapters", 2, kernel.adapters, registry.adapters),
        ("domains", 4, kernel.domains, registry.domains),
        ("control domains", 4, kernel.control_domains, registry.control_domains),
    ):
        if k != r:
            parts.append(f"{label}: kernel {_ids(k, width)} vs registry {_ids(r, width)}")
    return "; ".join(parts)


def _same_sets(a: Matrix | MdevInfo, b: Matrix | MdevInfo) -> bool:
    return (a.adapters, a.domains, a.control_domains) == (b.adapters, b.domains, b.control_domains)


class HostSync:
    """Re-reads the kernel and brings the service's state in step; one Changes per call."""

    def __init__(self, service: Service) -> None:
        self.svc = service
        self.phases: dict[str, float] = {}  # seconds spent in each step of the last resync

    def resync(
        self,
        *,
        cards: Iterable[int] = (),
        whole: Iterable[int] = (),
        named: Mapping[int, Iterable[int]] | None = None,
        everything: bool = False,
        pool: bool = False,
    ) -> Changes:
        """Re-read ``cards`` (state), ``whole`` cards (with every queue), the ``named`` queues
        of cards (card -> domains), ``everything``, the host ``pool`` if asked, and every
        mdev; publish what changed as one batch."""
        from apmatrixd.service import Changes

        changes = Changes()
        w = set(whole)
        n = {a: set(d) for a, d in (named or {}).items() if a not in w}
        before = self.svc._infos
        t0 = time.perf_counter()
        try:
            self._sync_adapters(changes, set(cards), w, n, everything)
            t1 = time.perf_counter()
            if pool or everything or (self.svc.kernel.layout != "upstream" and (w or n)):
                self._sync_pool(changes, before)
            t2 = time.perf_counter()
            self._sync_mdevs(changes)
            t3 = time.perf_counter()
        except KernelError:
            # What was taken before the failure is the service's state now: announce it, or
            # the caller's full re-read finds nothing new and no signal ever says so.
            self.svc._emit(changes)
            raise
        self.svc._emit(changes)
        t4 = time.perf_counter()
        self.phases = {"adapters": t1 - t0, "pool": t2 - t1, "mdevs": t3 - t2, "emit": t4 - t3}
        return changes

    # -- adapters -----------------------------------------------------------------------------
    def _sync_adapters(
        self,
        changes: Changes,
        cards: set[int],
        whole: set[int],
        named: dict[int, set[int]],
        everything: bool,
    ) -> None:
        svc, k = self.svc, self.svc.kernel
        if not (cards or whole or named or everything):
            return
        if everything or len(whole) > FULL_READ:
            fresh = k.read_adapters()
        else:
            fresh = dict(svc._infos)
            # A card we do not know yet is read whole, whatever its events named.
            whole = whole | ((cards | named.keys()) - fresh.keys())
            for a in sorted(whole):
                info = k.read_adapter(a)
                if info is None:
                    fresh.pop(a, None)
                else:
                    fresh[a] = info
            for a in sorted(named.keys() - whole):
                part = k.read_queues(fresh[a], named[a])
                if part is None:
                    fresh.pop(a, None)
                else:
                    fresh[a] = part
            for a in sorted(cards - whole):
                if a not in fresh:
                    continue
                state = k.read_card(a)
                if state is None:
                    fresh.pop(a, None)
                    continue
                kind, online, configured = state
                fresh[a] = replace(fresh[a], type=kind, online=online, configured=configured)
        self._take(changes, fresh)

    def _take(self, changes: Changes, fresh: dict[int, AdapterInfo]) -> None:
        svc = self.svc
        for a in sorted(svc._infos.keys() - fresh.keys()):
            svc._adapters.pop(a, None)
            changes.adapters_removed.add(a)
        for a, info in fresh.items():
            if svc._infos.get(a) == info and a in svc._adapters:
                continue
            view = svc._adapter_view(info)
            old = svc._adapters.get(a)
            if old is None:
                changes.adapters_added.add(a)
            elif old != view:
                changes.adapters_changed.add(a)
            svc._adapters[a] = view
        svc._infos = fresh

    # -- host pool ----------------------------------------------------------------------------
    def _sync_pool(self, changes: Changes, before: Mapping[int, AdapterInfo]) -> None:
        svc, k = self.svc, self.svc.kernel
        new = k.read_pool(svc._infos)
        if new.queues is not None:
            new = self._rereserve(changes, new)
        old = svc.registry.pool
        if new == old:
            return
        what = self._pool_drift(old, new, before)
        decision = svc.registry.decide(SetHostPool(new))
        if not decision.accepted:
            err = decision.error()
            log.warning("the host pool changed outside apmatrixd and cannot be adopted: %s", err)
            changes.drift.append((MANAGER, f"{what or 'host pool changed'} (not adopted: {err})"))
            return
        svc.registry.apply(SetHostPool(new))
        changes.host_changed = True
        if what:
            log.warning("drift: %s", what)
            changes.drift.append((MANAGER, what))

    def _pool_drift(self, old: HostPool, new: HostPool, before: Mapping[int, AdapterInfo]) -> str:
        """The part of a pool change that hot plug does not explain; '' if none."""
        if old.queues is None or new.queues is None:
            parts = []
            if old.adapters != new.adapters:
                parts.append(
                    f"host adapters: kernel {_ids(new.adapters, 2)} vs registry"
                    f" {_ids(old.adapters, 2)}"
                )
            if old.domains != new.domains:
                parts.append(
                    f"host domains: kernel {_ids(new.domains, 4)} vs registry"
                    f" {_ids(old.domains, 4)}"
                )
            return "; ".join(parts)
        now = self.svc._infos
        # Queues that appeared or vanished are hot plug; a queue present before and after
        # that changed sides was moved by someone (bind/unbind by hand).
        moved = sorted(
            q for q in old.queues ^ new.queues if _present(before, q) and _present(now, q)
        )
        if not moved:
            return ""
        more = f" (+{len(moved) - 16} more)" if len(moved) > 16 else ""
        return "host queues moved between drivers: " + ",".join(map(str, moved[:16])) + more

    def _rereserve(self, changes: Changes, pool: HostPool) -> HostPool:
        """2017 layout: a held queue that came back on the host driver goes to its matrix."""
        svc = self.svc
        assert pool.queues is not None
        owners = svc.registry.owners()
        held = frozenset(q for q in pool.queues if q in owners)
        if not held:
            return pool
        target = HostPool(queues=pool.queues - held)
        try:
            svc.kernel.set_pool(pool, target)
        except KernelError as err:
            log.error("could not take back queues for their matrices: %s", err)
            return pool
        log.info("re-reserved %d returning queue(s) for their matrices", len(held))
        fresh = dict(svc._infos)
        for a in sorted({q.adapter for q in held}):
            info = svc.kernel.read_adapter(a)
            if info is not None:
                fresh[a] = info
        self._take(changes, fresh)
        return target

    # -- mdevs --------------------------------------------------------------------------------
    def _sync_mdevs(self, changes: Changes) -> None:
        svc = self.svc
        seen = svc.kernel.read_mdevs(svc._infos)
        for uuid, gone in sorted(svc._meta.items()):
            if gone.live and uuid not in seen:
                gone.live, gone.guest, gone.truth = False, (), None
                changes.matrices_changed.add(uuid)
                self._drift(changes, uuid, "mdev removed outside apmatrixd; kept as a definition")
        for uuid, info in sorted(seen.items()):
            meta = svc._meta.get(uuid)
            if meta is None:
                self._adopt(changes, info)
                continue
            m = svc.registry.get(uuid)
            if not meta.live:
                meta.live = True
                changes.matrices_changed.add(uuid)
                self._drift(changes, uuid, "started outside apmatrixd")
            if _same_sets(info, m):
                if meta.truth is not None:  # back in step with the registry
                    meta.truth = None
                    changes.matrices_changed.add(uuid)
            elif meta.truth is None or not _same_sets(info, meta.truth):
                self._take_truth(changes, m, info)
            guest = tuple(sorted(info.guest_apqns))
            if guest != meta.guest:
                meta.guest = guest
                changes.matrices_changed.add(uuid)

    def _take_truth(self, changes: Changes, m: Matrix, info: MdevInfo) -> None:
        svc = self.svc
        meta = svc._meta[m.uuid]
        what = drift_text(info, m)
        change = UpdateMatrix(m.uuid, info.adapters, info.domains, info.control_domains)
        err = svc.registry.decide(change).error()
        if err is None:
            svc.registry.apply(change)
            meta.truth = None
            svc._touch_adapters(changes, m.adapters | info.adapters)
            self._store_adopted(m.uuid)
        else:
            meta.truth = info
            what += f" (not adopted: {err})"
        changes.matrices_changed.add(m.uuid)
        self._drift(changes, m.uuid, what)

    def _store_adopted(self, uuid: str) -> None:
        """A stored matrix whose drift was adopted is stored as adopted: otherwise the next
        start-up would take the kernel back to the old file, undoing the admin's change."""
        from apmatrixd.store import StoreError

        svc = self.svc
        if svc.store is None or uuid not in svc._on_disk:
            return
        record = svc._record(uuid)
        try:
            svc.store.write_matrix(record)
        except StoreError as err:
            log.error("drift of matrix %s adopted but not stored: %s", uuid, err)
            return
        svc._on_disk[uuid] = record

    def _adopt(self, changes: Changes, info: MdevInfo) -> None:
        from apmatrixd.service import _Meta

        svc = self.svc
        m = info.matrix()
        what = f"created outside apmatrixd: {_sets_text(info)}"
        truth: MdevInfo | None = None
        err = svc.registry.decide(DefineMatrix(m)).error()
        if err is None:
            svc.registry.apply(DefineMatrix(m))
        else:
            svc.registry.apply(DefineMatrix(Matrix(m.uuid)))
            truth = info
            what += f" (not adopted: {err})"
        svc._meta[m.uuid] = _Meta(
            live=True,
            adopted=True,
            control_usage_domains=m.domains <= m.control_domains,
            guest=tuple(sorted(info.guest_apqns)),
            truth=truth,
        )
        changes.matrices_added.add(m.uuid)
        svc._touch_adapters(changes, m.adapters)
        self._drift(changes, m.uuid, what)

    @staticmethod
    def _drift(changes: Changes, uuid: str, what: str) -> None:
        log.warning("drift: matrix %s: %s", uuid, what)
        changes.drift.append((uuid, what))


class HotPlug:
    """Wires a uevent source, the pump, the service and the rescan timer together.

    Counters (``stats()``): uevents received and handled by the pump, batches, rescans,
    Drift signals sent and Changes batches emitted.
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
        self.sync = HostSync(service)
        self.pump = EventPump(
            loop,
            self.on_batch,
            settle=settle,
            settle_min=settle_min,
            storm=storm,
            on_settling=service.set_settling,
        )
        self.rescan_interval = rescan_interval
        self.sources: list[Source] = []
        self.rescans = 0
        self.drifts = 0
        self.emitted = 0
        self._timer: asyncio.Task[None] | None = None
        service.subscribe(self._count)

    def _count(self, _changes: Changes) -> None:
        self.emitted += 1

    def start(self, source: Source) -> None:
        self.sources.append(source)
        source.start()
        if self.rescan_interval > 0 and self._timer is None:
            self._timer = asyncio.ensure_future(self._rescan_loop())

    def on_batch(self, s: Scope) -> None:
        self._resync(
            cards=s.cards, whole=s.whole, named=s.named, everything=s.everything, pool=s.pool
        )

    def rescan(self) -> None:
        """The slow timer: the host pool and every mdev (the changes no uevent announces)."""
        self.rescans += 1
        self._resync(pool=True)

    def _resync(self, **scope: Any) -> None:
        failed = False
        try:
            changes = self.sync.resync(**scope)
        except KernelError as err:
            failed = True  # the failed read may have taken adapters before it stopped
            # Something vanished while it was read (a card leaving mid-burst): read it all.
            log.warning("re-reading after uevents failed (%s); reading everything", err)
            try:
                changes = self.sync.resync(everything=True, pool=True)
            except KernelError as again:
                log.error("cannot re-read the AP configuration: %s", again)
                return
        self.drifts += len(changes.drift)
        t0 = time.perf_counter()
        if failed or changes.adapters_added or changes.adapters_changed:
            # Resources may have become present: autostart matrices waiting for them.
            self.service.start_waiting()
        phases = self.sync.phases | {"start_waiting": time.perf_counter() - t0}
        log.debug("resync: %s", ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in phases.items()))

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            try:
                self.rescan()
            except Exception:
                log.exception("rescan failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for source in self.sources:
            source.close()
        self.pump.close()

    def stats(self) -> dict[str, int]:
        return {
            **self.pump.stats(),
            "rescans": self.rescans,
            "drifts": self.drifts,
            "emitted": self.emitted,
        }
