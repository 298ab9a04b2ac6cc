"""What the kernel did on its own, as a command: re-read, bring the state in step, one signal.

A burst of uevents or the slow rescan becomes :func:`resync`: the worker re-reads what may
have changed (the cards and queues the burst names, the host pool if asked, every mdev of our
type), then the state takes it in one step and one
:class:`~apmatrixd.service.state.Changes` goes out, so every object gets at most one signal.

Hot plug. Cards and queues that appear, vanish or flip ``config``/``online`` are re-read and
their Adapter objects follow. A matrix's guest view is re-read, so a matrix whose APQNs leave
the host configuration turns ``degraded`` and returns to ``active`` when they come back. On the
2017 layout a returning queue may land on ``cex4queue``; one that a matrix holds is taken back
for it (re-reserved), as the definition says: the only write a resync makes.

Drift. The kernel sends no uevent when a matrix is changed behind the daemon's back, so every
resync re-reads every mdev. What differs from the registry raises ``Drift(matrix, what)``
once, and:

- changed sets: the kernel's sets are the truth. If the registry accepts them they are
  adopted (and stored, so a restart keeps them). If not (they clash with a matrix that is only
  defined), the registry keeps its last valid sets and the APQNs the mdev holds beyond them
  are claimed for it in every decision; the properties show the kernel's sets and the Drift
  text says it was not adopted;
- an mdev created outside the daemon: adopted (``Adopted`` true); if its sets cannot be
  accepted it enters the registry empty, with its truth claimed;
- a live matrix whose mdev was removed outside: it stays as a definition (``defined``) if it
  is stored; one that was only adopted (never stored) is gone with its mdev;
- the host pool: adopted when the registry accepts it, with a Drift on the Manager's path;
  otherwise kept as the truth pool (counted in decisions) and signalled once per distinct
  pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from apmatrixd import mdevctl
from apmatrixd.core import (
    ApmatrixError,
    Apqn,
    DefineMatrix,
    HostPool,
    Matrix,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)
from apmatrixd.core.apqn import format_ids
from apmatrixd.kernel import AdapterInfo, Kernel, KernelError, MdevInfo
from apmatrixd.service import managers, ops
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import EXTERNAL, MDEVCTL, Changes, DriftKind, Meta
from apmatrixd.service.tx import Transaction
from apmatrixd.store import StoredMatrix

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)

MANAGER = ""
"""The ``uuid`` of a Drift that concerns the host pool (sent on the Manager's path)."""

FULL_READ = 16
"""Beyond this many cards to read with their queues, one read of the whole bus is cheaper."""


def ids_text(ids: Iterable[int]) -> str:
    return format_ids(ids, "none")


def sets_text(m: Matrix | MdevInfo) -> str:
    return (
        f"adapters {ids_text(m.adapters)} domains {ids_text(m.domains)}"
        f" control domains {ids_text(m.control_domains)}"
    )


def drift_text(
    kernel: MdevInfo | Matrix, ours: Matrix | StoredMatrix, where: str = "registry"
) -> str:
    """``adapters: kernel 05,06,07 vs registry 05,06``, one part per differing set."""
    parts = []
    for label, k, r in (
        ("adapters", kernel.adapters, ours.adapters),
        ("domains", kernel.domains, ours.domains),
        ("control domains", kernel.control_domains, ours.control_domains),
    ):
        if k != r:
            parts.append(f"{label}: kernel {ids_text(k)} vs {where} {ids_text(r)}")
    return "; ".join(parts)


def _same_sets(a: Matrix | MdevInfo, b: Matrix | MdevInfo) -> bool:
    return (a.adapters, a.domains, a.control_domains) == (b.adapters, b.domains, b.control_domains)


def _present(infos: Mapping[int, AdapterInfo], q: Apqn) -> bool:
    info = infos.get(q.adapter)
    return info is not None and q.domain in info.domains


@dataclass
class Reading:
    """What one resync read in the worker."""

    infos: dict[int, AdapterInfo] | None  # None: the adapters were not asked for
    pool: HostPool | None
    mdevs: dict[str, MdevInfo]
    definitions: mdevctl.Scan | None = None  # mdevctl's directory, with the pool
    late: frozenset[int] = frozenset()  # cards the guest views still contradict


def read_adapters(
    k: Kernel,
    known: Mapping[int, AdapterInfo],
    cards: set[int],
    whole: set[int],
    named: dict[int, set[int]],
    everything: bool,
    early: Mapping[int, Callable[[], tuple[bool, bool] | None]] | None = None,
) -> dict[int, AdapterInfo] | None:
    """The cards as they are now: ``known`` with the ``cards`` (state), ``whole`` cards and
    ``named`` queues read again; ``early``: card states read already (:func:`resync`)."""
    if not (cards or whole or named or everything):
        return None
    if everything or len(whole) > FULL_READ:
        return k.read_adapters()
    fresh = dict(known)
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
        state = early[a]() if early is not None and a in early else k.read_card(a)
        if state is None:
            fresh.pop(a, None)
            continue
        online, configured = state
        fresh[a] = replace(fresh[a], online=online, configured=configured)
    return fresh


RESCAN_CYCLE = 3600.0
"""Seconds within which the rescan timer re-reads every live mdev, a slice per tick."""
RESCAN_ALL = 8
"""Up to this many live mdevs, every tick re-reads them all."""


def rescan_slice(svc: Service, tick: int, interval: float) -> list[str]:
    """The live mdevs the rescan timer's ``tick``-th tick re-reads: all of them on a host
    with few, else a slice, so that every one is re-read within :data:`RESCAN_CYCLE`.

    What the slice skips is only what no uevent announces and nothing relies on being
    fresh: a matrix's sets changed by hand (echo to assign_adapter), and a guest starting or
    stopping (InUse). Everything else comes with uevents: a burst of only cards and queues
    (hot plug) re-reads every mdev holding one of its cards (:func:`burst_slice`), any other
    burst every mdev: bindings, the host pool moving queues, an mdev created or removed
    outside (the mdev bus's add/remove; a lost uevent re-reads everything). A change re-reads
    the mdevs it writes before writing (a hand edit not yet seen is never merged into, nor
    silently kept), Stop and Remove ask the kernel whether a guest runs, and a write the
    kernel refuses (a hand-assigned APQN the registry did not know) asks for a re-read of
    everything. So a hand edit shows as Drift within one cycle instead of one tick; until
    then Check can miss a claim it makes, and the kernel refuses what would clash with it.
    While uevents are heard, an mdev of the slice whose sets read as before keeps its guest
    view (:func:`believed`): its sets (``ap_config``, 6.10+) and ``status`` are all that is
    read of it. Nor does the tick read apmask and aqmask then, where the kernel announces
    their changes (``APMASK=``/``AQMASK=`` on the bus root; ``Features.mask_uevents``): that
    burst reads the pool, and a lost uevent reads everything. Without a
    uevent source, or on a bus that sends none, every tick reads the masks as before."""
    live = sorted(u for u, m in svc.state.meta.items() if m.live)
    if len(live) <= RESCAN_ALL or interval <= 0:
        return live
    per_tick = max(RESCAN_ALL, -(-len(live) * interval // RESCAN_CYCLE))
    n = int(per_tick)
    start = (tick * n) % len(live)
    return (live[start:] + live[:start])[:n]


def burst_slice(svc: Service, cards: Iterable[int]) -> list[str]:
    """The live mdevs a burst of only card and queue events re-reads: those holding one of
    its ``cards`` (by the registry's sets or the kernel's as last read).

    Such a burst changes no mdev's sets (vfio_ap sends no uevent for an assignment, so no
    burst ever announced a hand edit) and only the guest view of mdevs holding its cards:
    the kernel drops a guest's APQNs a whole adapter at a time (kernel-facts 1.5). A hand
    edit of the others is found where it always was: by the rescan timer's slice
    (:func:`rescan_slice`), by any burst that is not only cards and queues (every mdev),
    and by a change before it writes that mdev. On a host with 1,000 mdevs a card coming
    back reads the few that hold it, not 1,000. Of those only the guest view and InUse
    are read, the sets taken as last read (:func:`believed`; ``ap_config`` is a FUSE round
    trip of its own on the emulator): a hand edit that assigned more shows in the view and
    makes that mdev read whole, one that took an adapter away contradicts its card and
    makes the holders read whole (:func:`resync`); taking domains away is left, as for the
    others, to the rescan timer's slice."""
    st, touched = svc.state, frozenset(cards)
    out = []
    for uuid, meta in sorted(st.meta.items()):
        if not meta.live:
            continue
        held = st.registry.get(uuid).adapters
        if meta.truth is not None:
            held = held | meta.truth.adapters
        if held & touched:
            out.append(uuid)
    return out


def believed(svc: Service, uuids: Iterable[str]) -> dict[str, MdevInfo]:
    """These live mdevs as the state last read them (sets, guest view, InUse): what the
    rescan timer's slice needs to read again only where the sets changed (a hand edit); see
    :meth:`~apmatrixd.kernel.Kernel.read_mdevs`. Only when uevents are heard: they announce
    every other change of a guest view, and each burst re-reads whole every mdev whose guest
    view it can change (:func:`burst_slice`: those holding its cards; any other burst: all)."""
    st = svc.state
    out: dict[str, MdevInfo] = {}
    for u in uuids:
        meta = st.meta.get(u)
        if meta is None or not meta.live:
            continue
        m = meta.truth.matrix() if meta.truth is not None else st.registry.get(u)
        out[u] = MdevInfo(u, m.adapters, m.domains, m.control_domains,
                          frozenset(meta.guest), meta.in_use)  # fmt: skip
    return out


def _contradicted(infos: Mapping[int, AdapterInfo], mdevs: Mapping[str, MdevInfo]) -> set[int]:
    """The cards whose ``configured`` the guest views contradict: a guest holds one read as
    deconfigured, or lacks one read as configured whose queues it would get (the kernel's
    rule, as ``Kernel._guest_view`` computes it where there is no ``guest_matrix``)."""
    if not mdevs:
        return set()
    # One C-level union of the distinct sets (cards share one when their domains are the
    # same): a generator over 256 x 256 queues cost a rescan tick 10 ms, the union of 256
    # copies of one set 0.7 ms.
    distinct = {id(a.domains): a.domains for a in infos.values()}
    usage: frozenset[int] = frozenset().union(*distinct.values())
    out: set[int] = set()
    for m in mdevs.values():
        held = {q.adapter for q in m.guest_apqns}
        domains = m.domains & usage
        for a in m.adapters:
            info = infos.get(a)
            if info is None:
                continue
            if a in held:
                if not info.configured:
                    out.add(a)
            elif info.configured and domains and domains <= info.guest_domains:
                out.add(a)
    return out


def resync(
    svc: Service,
    *,
    cards: Iterable[int] = (),
    whole: Iterable[int] = (),
    named: Mapping[int, Iterable[int]] | None = None,
    everything: bool = False,
    pool: bool = False,
    bindings: bool = False,
    only: Sequence[str] | None = None,
    last_read: Mapping[str, MdevInfo] | None = None,
    guests_only: bool = False,
    on_late: Callable[[frozenset[int]], None] | None = None,
    early: Mapping[int, Callable[[], tuple[bool, bool] | None]] | None = None,
    rescan: bool = False,
) -> Command[Changes]:
    """Re-read ``cards`` (state), ``whole`` cards (with every queue), the ``named`` queues of
    cards (card -> domains), ``everything``, the host ``pool`` if asked, and every mdev (or
    the live ones of ``only``: the rescan timer's slice, :func:`rescan_slice`, with their
    ``last_read``: :func:`believed`; ``guests_only``: of those only the guest views are read,
    the sets taken from ``last_read``, for a burst of only cards and queues:
    :func:`burst_slice`); publish what changed as one batch. A failed read
    changes nothing and raises. ``on_late`` is told, after the batch, the cards whose
    holders' guest views still contradicted them when read once more (vfio_ap may still be
    scanning), so that they can be read again later. ``early``: the state of some of
    ``cards`` being read since their last uevent (called in the worker; may wait for it).
    ``rescan``: a tick of the rescan timer, which also looks at mdevctl's directory and is
    what Statistics' ``last_rescan`` dates."""
    st, k = svc.state, svc.kernel
    w = set(whole)
    n = {a: set(d) for a, d in (named or {}).items() if a not in w}
    c = set(cards)
    known = dict(st.infos)
    want_pool = pool or everything or (k.layout != "upstream" and bool(w or n))

    # The cards of `early` are being read in a thread of their own: where the kernel gives
    # the guest views (guest_matrix) they do not depend on that reading, so they are read
    # meanwhile, not after it. A view read before a card that changed in between contradicts
    # it, and is read again below as any other.
    views_first = bool(early) and guests_only and k.layout == "upstream"
    views_first = views_first and k.features.dynamic is True

    def read(_p: object) -> Reading:
        late: frozenset[int] = frozenset()
        mdevs = k.read_mdevs(known, only, last_read, guests_only) if views_first else None
        infos = read_adapters(k, known, c, w, n, everything, early)
        now = infos if infos is not None else known
        host = k.read_pool(now) if want_pool else None
        if mdevs is None:
            mdevs = k.read_mdevs(now, only, last_read, guests_only)
        # guest_matrix is read after the cards (or, for cards this burst does not name, a
        # batch later; or while they are read, above): a card that left or came back
        # meanwhile shows in one and not the other. Read those cards again, so no batch
        # shows a guest holding a deconfigured adapter.
        if stale := _contradicted(now, mdevs):
            infos = read_adapters(k, now, stale, set(), {}, False)
            assert infos is not None  # cards were asked for
            # The cards read as before: the guest views were read too early instead
            # (vfio_ap updates guest_matrix in on_scan_complete, after the scan's last
            # uevent, and sends none). Their holders are read once more, once only here: a
            # contradiction that stays is shown as it is, and told to on_late.
            if still := _contradicted(infos, mdevs):
                holders = [u for u, m in mdevs.items() if m.adapters & still]
                mdevs.update(k.read_mdevs(infos, holders))
                late = frozenset(_contradicted(infos, mdevs))
        # mdevctl's definitions change without a uevent too: looked at with the pool.
        scan = managers.scan(svc) if want_pool or rescan else None
        return Reading(infos, host, mdevs, scan, late)

    r: Reading = yield Work("re-reading the AP configuration", read)
    if r.pool is not None and r.pool.queues is not None:
        r = yield from _rereserve(svc, r, known)
    changes = Changes()
    before = st.infos
    if r.infos is not None:
        _take(svc, changes, r.infos)
    if r.pool is not None:
        _sync_pool(svc, changes, r.pool, before)
    adopted = _sync_mdevs(svc, changes, r.mdevs, only)
    if r.definitions is not None:
        managers.take_scan(svc, changes, r.definitions)
    if rescan or r.pool is not None:  # a tick, or the pool and every mdev re-read
        st.stats.rescanned()
    svc.emit(changes)
    if r.late and on_late is not None:
        on_late(r.late)
    if adopted:
        yield from store_adopted(svc, adopted)
    if bindings and not st.bindings_ready:
        yield from ops.bindings_complete(svc, "complete")
    elif changes.adapters_added or changes.adapters_changed:
        # Resources may have become present: autostart matrices waiting for them.
        yield from ops.start_waiting(svc)
    return changes


def _rereserve(svc: Service, r: Reading, known: Mapping[int, AdapterInfo]) -> Command[Reading]:
    """2017 layout: a held queue that came back on the host driver goes to its matrix."""
    st, k = svc.state, svc.kernel
    assert r.pool is not None and r.pool.queues is not None
    owners = st.registry.owners()
    held = frozenset(q for q in r.pool.queues if q in owners)
    if not held:
        return r
    target = HostPool(queues=r.pool.queues - held)
    try:
        yield from svc.transact(Transaction("re-reserving returning queues", pool=(r.pool, target)))
    except ApmatrixError as err:
        log.error("could not take back queues for their matrices: %s", err)
        return r
    log.info("re-reserved %d returning queue(s) for their matrices", len(held))
    base = dict(r.infos if r.infos is not None else known)

    def reread(_p: object) -> Reading:
        for a in sorted({q.adapter for q in held}):
            info = k.read_adapter(a)
            if info is not None:
                base[a] = info
        return Reading(base, target, k.read_mdevs(base))

    try:
        again: Reading = yield Work("re-reading the re-reserved cards", reread)
        return again
    except KernelError as err:
        log.warning("re-reading after re-reserving failed: %s", err)
        return r


def _take(svc: Service, changes: Changes, fresh: dict[int, AdapterInfo]) -> None:
    st = svc.state
    for a in sorted(st.infos.keys() - fresh.keys()):
        st.adapters.pop(a, None)
        changes.adapters_removed.add(a)
    for a, info in fresh.items():
        if st.infos.get(a) == info and a in st.adapters:
            continue
        view = st.adapter_view(info)
        old = st.adapters.get(a)
        if old is None:
            changes.adapters_added.add(a)
        elif old != view:
            changes.adapters_changed.add(a)
        st.adapters[a] = view
    st.infos = fresh
    st.note_overrides()


def _sync_pool(
    svc: Service, changes: Changes, new: HostPool, before: Mapping[int, AdapterInfo]
) -> None:
    reg = svc.state.registry
    old = reg.pool
    if new == old:
        if reg.truth_pool is not None:
            reg.truth_pool = None  # back in step
        return
    what = _pool_drift(svc, old, new, before)
    decision = reg.decide(SetHostPool(new))
    if not decision.accepted:
        if reg.truth_pool == new:
            return  # the same drift as last time: signalled once
        reg.truth_pool = new
        err = decision.error()
        log.warning("the host pool changed outside apmatrixd and cannot be adopted: %s", err)
        svc.state.stats.drift("host_pool", adopted=False)
        changes.drift.append((MANAGER, f"{what or 'host pool changed'} (not adopted: {err})"))
        return
    reg.apply(SetHostPool(new))
    reg.truth_pool = None
    changes.host_changed = True
    if what:
        log.warning("drift: %s", what)
        svc.state.stats.drift("host_pool")
        changes.drift.append((MANAGER, what))


def _pool_drift(
    svc: Service, old: HostPool, new: HostPool, before: Mapping[int, AdapterInfo]
) -> str:
    """The part of a pool change that hot plug does not explain; '' if none."""
    if old.queues is None or new.queues is None:
        parts = []
        if old.adapters != new.adapters:
            parts.append(
                f"host adapters: kernel {ids_text(new.adapters)} vs registry"
                f" {ids_text(old.adapters)}"
            )
        if old.domains != new.domains:
            parts.append(
                f"host domains: kernel {ids_text(new.domains)} vs registry"
                f" {ids_text(old.domains)}"
            )
        return "; ".join(parts)
    now = svc.state.infos
    # Queues that appeared or vanished are hot plug; a queue present before and after
    # that changed sides was moved by someone (bind/unbind by hand).
    moved = sorted(q for q in old.queues ^ new.queues if _present(before, q) and _present(now, q))
    if not moved:
        return ""
    more = f" (+{len(moved) - 16} more)" if len(moved) > 16 else ""
    return "host queues moved between drivers: " + ",".join(map(str, moved[:16])) + more


def _sync_mdevs(
    svc: Service, changes: Changes, seen: dict[str, MdevInfo], only: Sequence[str] | None = None
) -> list[str]:
    """Bring every matrix (or those of ``only``) in step with the mdevs read; the stored ones
    whose drift was adopted (to be stored)."""
    st = svc.state
    adopted: list[str] = []
    # A slice's own (a few of thousands), not every matrix the state holds.
    asked = sorted(st.meta if only is None else st.meta.keys() & set(only))
    for uuid in asked:
        gone = st.meta[uuid]
        if gone.live and uuid not in seen:
            if gone.manager == EXTERNAL:
                # Only ever adopted, never ours: nothing keeps it once its mdev is gone.
                m = st.registry.get(uuid)
                st.registry.apply(RemoveMatrix(uuid))
                del st.meta[uuid]
                changes.matrices_removed.add(uuid)
                st.touch_adapters(changes, m.adapters)
                drift(svc, changes, uuid, "removed",
                       "mdev removed outside apmatrixd; it was only adopted")  # fmt: skip
                continue
            gone.live, gone.guest, gone.in_use = False, (), False
            st.set_truth(uuid, None)
            changes.matrices_changed.add(uuid)
            if gone.manager == MDEVCTL:
                managers.stopped(svc, changes, uuid)
                what = "mdev removed outside apmatrixd; mdevctl's definition stays"
                drift(svc, changes, uuid, "removed", what)
                continue
            if gone.release_pending:
                what = f"the guest let go: the mdev is gone after the {gone.release_pending}"
                gone.release_pending = ""
                drift(svc, changes, uuid, "released", f"{what} timed out; kept as a definition")
                continue
            drift(svc, changes, uuid, "removed",
                   "mdev removed outside apmatrixd; kept as a definition")  # fmt: skip
    for uuid, info in sorted(seen.items()):
        meta = st.meta.get(uuid)
        if meta is None:
            _adopt(svc, changes, info)
            continue
        m = st.registry.get(uuid)
        if not meta.live:
            meta.live = True
            changes.matrices_changed.add(uuid)
            if meta.manager == MDEVCTL:  # its definition waits while the kernel's sets rule
                if meta.definition is None:  # (already there if it broke a rule)
                    meta.definition = m
                st.set_truth(uuid, None)
                what = "started outside apmatrixd (mdevctl's definition)"
                drift(svc, changes, uuid, "started", what)
            else:
                drift(svc, changes, uuid, "started", "started outside apmatrixd")
        if _same_sets(info, m):
            if meta.truth is not None:  # back in step with the registry
                st.set_truth(uuid, None)
                changes.matrices_changed.add(uuid)
        elif meta.truth is None or not _same_sets(info, meta.truth):
            took = _take_truth(svc, changes, m, info)
            if took and uuid in st.on_disk:
                adopted.append(uuid)
        guest = tuple(sorted(info.guest_apqns))
        if guest != meta.guest or info.in_use != meta.in_use:
            meta.guest, meta.in_use = guest, info.in_use
            changes.matrices_changed.add(uuid)
    return adopted


def _take_truth(svc: Service, changes: Changes, m: Matrix, info: MdevInfo) -> bool:
    """A live matrix whose mdev holds other sets; True if they were adopted."""
    st = svc.state
    what = drift_text(info, m)
    change = UpdateMatrix(m.uuid, info.adapters, info.domains, info.control_domains)
    st.registry.clear_truth(m.uuid)  # its own old claims are no reason to refuse
    err = st.registry.decide(change).error()
    adopted = err is None
    if adopted:
        st.registry.apply(change)
        st.set_truth(m.uuid, None)
        st.touch_adapters(changes, m.adapters | info.adapters)
    else:
        st.set_truth(m.uuid, info)
        what += f" (not adopted: {err})"
    changes.matrices_changed.add(m.uuid)
    drift(svc, changes, m.uuid, "sets", what, adopted)
    return adopted


def store_adopted(svc: Service, uuids: list[str]) -> Command[None]:
    """A stored matrix whose drift was adopted is stored as adopted: a restart keeps it."""
    st = svc.state
    records: dict[str, StoredMatrix | None] = {u: st.record(u) for u in uuids}
    tx = Transaction(
        "storing adopted drift",
        store=records,
        stored_before={u: st.on_disk.get(u) for u in uuids},
    )
    try:
        yield from svc.transact(tx)
    except ApmatrixError as err:
        log.error("drift of %s adopted but not stored: %s", ", ".join(uuids), err)
        return
    if svc.store is not None:
        for u, rec in records.items():
            assert rec is not None
            st.on_disk[u] = rec


def _adopt(svc: Service, changes: Changes, info: MdevInfo) -> None:
    st = svc.state
    m = info.matrix()
    what = f"created outside apmatrixd: {sets_text(info)}"
    truth: MdevInfo | None = None
    err = st.registry.decide(DefineMatrix(m)).error()
    if err is None:
        st.registry.apply(DefineMatrix(m))
    else:
        st.registry.apply(DefineMatrix(Matrix(m.uuid)))
        truth = info
        what += f" (not adopted: {err})"
    st.meta[m.uuid] = Meta(
        live=True,
        manager=EXTERNAL,
        control_usage_domains=m.domains <= m.control_domains,
        guest=tuple(sorted(info.guest_apqns)),
        in_use=info.in_use,
    )
    st.set_truth(m.uuid, truth)
    changes.matrices_added.add(m.uuid)
    st.touch_adapters(changes, m.adapters)
    drift(svc, changes, m.uuid, "created", what, adopted=err is None)


def drift(
    svc: Service, changes: Changes, uuid: str, kind: DriftKind, what: str, adopted: bool = True
) -> None:
    """One Drift signal, counted by kind (Manager.Statistics)."""
    svc.state.stats.drift(kind, adopted)
    log.warning("drift: matrix %s: %s", uuid, what)
    changes.drift.append((uuid, what))
