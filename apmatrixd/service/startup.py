"""Start-up: finish or roll back the changes the journal names, then take the host as it is.

In this order, before READY=1:

1. The intent journal (:mod:`apmatrixd.journal`). Changes answered on their commit record
   whose files were not all written are completed first (their files as they wanted, read
   as one change, unless written since by someone else). An intent after them names the
   only change (or group of changes, journalled as one) that may be half done. If its stored
   records are all as it wanted, it was done; if the stored records are neither before nor
   after, the store has moved on since and the intent is stale. Otherwise it is rolled
   back: every mdev and the host pool it touched are taken back to what the kernel held
   before, but only where the kernel still holds something between before and after (or
   between the bounds a group passed through; anything else is someone else's edit, left
   alone), and an mdev is never re-created: one that is gone stays gone (a reboot, or the
   change was our own removal, which is then completed in the store). A removal writes its
   files first: cut before its mdev went, its files come back (no kernel write at start-up,
   which a guest holding the mdev could block). The stored records go back to their
   before. A host pool the kernel would refuse back (6.19 counts a returned adapter against
   every domain another mdev holds with it) is judged before any mdev is taken back: the
   change is then completed if the kernel holds all of it, else its pool and the stored
   reservations stay as the kernel holds them. The intent is then cleared, durably.
2. Every live mdev enters the registry with the sets the kernel holds (a stored UUID is that
   matrix, with its name and autostart; an unknown one is *adopted*).
3. After a reboot (the boot id differs from the one stored with them) the stored reservations
   are applied to the host pool: the masks are back at their boot values. Upstream this is
   decided from the masks and the mdevs' sets before the cards are read, so the host is
   read once, as the masks left it (2 above follows that read). A restart in the same boot
   leaves the masks as they are, an admin's edit included.
4. Every stored definition: one that is not live enters as ``defined`` (one that clashes is
   logged and left on disk); a live one whose mdev differs from its file was changed while
   the daemon was not running: that is drift, adopted (the file follows the kernel) and sent
   as a ``Drift`` signal once the daemon serves (``Service.startup_drift``). Nothing an admin
   did is written back.
5. mdevctl's definitions that are not ours are held as mdevctl-managed matrices
   (:mod:`apmatrixd.service.managers`).
6. Every autostart matrix of ours whose APQNs are all present is started, a batch per
   transaction (``ops.start_waiting``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from apmatrixd.core import ApmatrixError, Apqn, DefineMatrix, HostPool, Matrix, Registry
from apmatrixd.core import SetHostPool as SetPool
from apmatrixd.core.apqn import cross, format_ids
from apmatrixd.journal import Intent
from apmatrixd.kernel import HostSnapshot, Kernel, MdevInfo
from apmatrixd.service import managers, ops, sync
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import APMATRIXD, EXTERNAL, Changes, Meta
from apmatrixd.service.tx import Transaction
from apmatrixd.store import HOST_FILE, SUFFIX, Contents, Reservations, Store, StoredMatrix

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)


def load(svc: Service) -> Command[None]:
    st = svc.state
    store = svc.store
    k = svc.kernel
    contents = Contents()
    unresolved: frozenset[str] = frozenset()
    if store is not None:
        contents, unresolved = yield Work("the state directory", lambda _p: _recover(k, store))
    boot = k.boot_id()
    # The same boot: the masks are what this daemon (or an admin since) left them. Applying
    # the reservations again would write an admin's edit back.
    restore = not (store is not None and boot and contents.boot == boot)
    written = False
    if restore and k.layout == "upstream":
        # Upstream the host pool is two masks, decided on without the cards: the pool and
        # the mdevs' sets are read first, the reservations applied, and the host (65,536
        # queues on a big host) read once, as the masks left it, instead of before and after.
        pre: HostSnapshot = yield Work("reading the host pool and the mdevs",
                                       lambda _p: _pool_and_mdevs(k))  # fmt: skip
        _take_host(svc, pre, contents, warn=False)
        yield from _restore(svc, contents, boot)
        restore = False
    snap: HostSnapshot = yield Work("reading the AP configuration",
                                    lambda _p: k.read_host())  # fmt: skip
    _take_host(svc, snap, contents)
    if restore:  # 2017 layout: the pool is the queues' drivers, known once the cards are read
        written = yield from _restore(svc, contents, boot)
    drift: list[tuple[str, str]] = []
    adopted: list[str] = []
    for sm in sorted(contents.matrices.values(), key=lambda m: m.uuid):
        live = st.registry.matrices.get(sm.uuid)
        if live is None:
            want = Matrix(sm.uuid, sm.adapters, sm.domains, sm.control_domains,
                          name=sm.name, autostart=sm.autostart)  # fmt: skip
            refusal = st.registry.decide(DefineMatrix(want)).error(ops.ORDER)
            if refusal is not None:
                log.error("stored matrix %s not loaded (its file is kept): %s", sm.uuid, refusal)
                continue
            st.registry.apply(DefineMatrix(want), ops.ORDER)
            st.meta[sm.uuid] = Meta(control_usage_domains=sm.control_usage_domains)
            continue
        if sm.uuid in unresolved:
            what = "its interrupted change could not be rolled back"
            log.error("matrix %s: %s; its file is kept, nothing adopted", sm.uuid, what)
            continue
        if (live.adapters, live.domains, live.control_domains) != (
            sm.adapters,
            sm.domains,
            sm.control_domains,
        ):
            what = _drift_text(live, sm)
            log.warning("drift: matrix %s changed while apmatrixd was not running: %s",
                        sm.uuid, what)  # fmt: skip
            drift.append((sm.uuid, f"changed while apmatrixd was not running: {what}"))
            st.stats.drift("while_stopped")
            adopted.append(sm.uuid)
    if adopted:  # the files follow the kernel (the registry holds its sets): a restart keeps it
        yield from sync.store_adopted(svc, adopted)
    if written:  # the guest views and the inventory follow the host pool
        snap = yield Work("re-reading the AP configuration", lambda _p: k.read_host())
        st.take_inventory(dict(snap.adapters))
        for uuid, meta in st.meta.items():
            if meta.live and uuid in snap.mdevs:
                meta.guest = tuple(sorted(snap.mdevs[uuid].guest_apqns))
    found = yield Work("reading mdevctl's definitions", lambda _p: managers.scan(svc))
    if found is not None:
        held = Changes()
        managers.take_scan(svc, held, found)
        drift += held.drift
    svc.startup_drift = drift
    st.stats.rescanned()
    ready = yield Work("reading the AP bus bindings", lambda _p: svc.kernel.bindings_complete())
    st.bindings_ready = ready
    if not ready:
        log.info("the AP bus is still binding queues: autostart waits for BINDINGS=complete")
    yield from ops.start_waiting(svc)


def _take_host(svc: Service, snap: HostSnapshot, contents: Contents, warn: bool = True) -> None:
    """Step 2 of the module docstring: the registry as the kernel holds it."""
    st = svc.state
    st.registry = Registry(
        limits=snap.limits, pool=snap.pool, release_all_ones=svc.kernel.features.all_ones_release
    )
    st.meta.clear()
    st.on_disk = dict(contents.matrices)
    st.reservations = st.on_disk_reservations = contents.reservations
    st.take_inventory(dict(snap.adapters))
    for mdev in sorted(snap.mdevs.values(), key=lambda m: m.uuid):
        sm = contents.matrices.get(mdev.uuid)
        m = Matrix(
            mdev.uuid,
            frozenset(mdev.adapters),
            frozenset(mdev.domains),
            frozenset(mdev.control_domains),
            name=sm.name if sm else "",
            autostart=sm.autostart if sm else False,
        )
        problems = st.registry.decide(DefineMatrix(m)).error(ops.ORDER) if warn else None
        if problems is not None:
            log.warning("adopting %s although it breaks a rule: %s", m.uuid, problems)
        st.registry.restore(DefineMatrix(m))
        st.meta[m.uuid] = Meta(
            live=True,
            manager=APMATRIXD if sm is not None else EXTERNAL,
            control_usage_domains=(
                sm.control_usage_domains if sm else m.domains <= m.control_domains
            ),
            guest=tuple(sorted(mdev.guest_apqns)),
            in_use=mdev.in_use,
        )


def _pool_and_mdevs(k: Kernel) -> HostSnapshot:
    """What deciding the upstream host pool needs: the masks and the sets of every mdev (a
    live one holding an APQN keeps it from the host), no cards."""
    k.detect_features()
    mdevs: dict[str, MdevInfo] = {}
    for uuid in k.list_mdevs():
        sets = k.read_mdev_sets(uuid)
        if sets is not None:  # None: removed since the listing
            mdevs[uuid] = MdevInfo(uuid, sets.adapters, sets.domains, sets.control_domains)
    return HostSnapshot(k.layout, k.read_limits(), k.read_pool(), mdevs=mdevs)


def _restore(svc: Service, contents: Contents, boot: str) -> Command[bool]:
    """Step 3: the stored reservations applied, the boot id stored; True if written."""
    store = svc.store
    written = yield from _restore_pool(svc, contents.matrices.values())
    if store is not None and boot:
        try:
            yield Work("storing the boot id", lambda _p: store.write_boot(boot))
        except ApmatrixError as err:
            log.error("%s", err)
    return written


def _drift_text(live: Matrix, sm: StoredMatrix) -> str:
    return sync.drift_text(live, sm, "stored") + " (adopted)"


def _restore_pool(svc: Service, stored: Iterable[StoredMatrix]) -> Command[bool]:
    st = svc.state
    r = st.reservations
    pool = st.registry.pool
    reserved = ops.reserved_pool(pool, r.reserved_adapters, r.reserved_domains)
    target = ops.released_pool(st.infos, reserved, r.released_adapters, r.released_domains)
    if target.queues is not None:
        # Queue by queue, Reserve and Release do not commute (Release(domain) gives back
        # queues of reserved adapters); the net record cannot tell the order, so a queue a
        # stored matrix holds is never given back (it was not when that was stored).
        held = {q for sm in stored for q in cross(sm.adapters, sm.domains)}
        target = HostPool(queues=target.queues - held)
    for new in (target, reserved):
        change = SetPool(new)
        decision = st.registry.decide(change)
        if decision.noop:
            return False
        if not decision.accepted:
            log.warning("stored reservations: %s", decision.error(ops.ORDER))
            continue
        try:
            yield from svc.transact(Transaction("applying the stored reservations",
                                                pool=(pool, new)))  # fmt: skip
        except ApmatrixError as err:
            log.error("stored reservations not applied: %s", err)
            continue
        st.registry.apply(change, ops.ORDER, decision)
        log.info("stored reservations applied: host pool %s", _pool_text(new))
        return True
    return False


def _pool_text(pool: HostPool) -> str:
    if pool.queues is not None:
        return f"{len(pool.queues)} queues"
    return (
        f"adapters {format_ids(pool.adapters, 'none')} x domains {format_ids(pool.domains, 'none')}"
    )


# -- journal recovery (in the worker) ---------------------------------------------------------
def _sets(value: Any) -> Matrix | None:
    if value is None:
        return None
    return Matrix("", frozenset(value["adapters"]), frozenset(value["domains"]),
                  frozenset(value["control_domains"]))  # fmt: skip


def _triple(m: Matrix | None) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    if m is None:
        return (frozenset(), frozenset(), frozenset())
    return (m.adapters, m.domains, m.control_domains)


def _same(a: Matrix | None, b: Matrix | None) -> bool:
    return (a is None) == (b is None) and _triple(a) == _triple(b)


def _within(cur: Matrix | None, before: Matrix | None, after: Matrix | None) -> bool:
    """Does the kernel hold something a change from ``before`` to ``after`` passes through?"""
    return all(
        b & a <= c <= b | a
        for c, b, a in zip(_triple(cur), _triple(before), _triple(after), strict=True)
    )


def _pool(value: Any) -> HostPool:
    if "queues" in value:
        return HostPool(queues=frozenset(Apqn(a, d) for a, d in value["queues"]))
    return HostPool(frozenset(value["adapters"]), frozenset(value["domains"]))


def _pool_within(cur: HostPool, before: HostPool, after: HostPool) -> bool:
    if cur.queues is not None and before.queues is not None and after.queues is not None:
        c, b, a = cur.queues, before.queues, after.queues
        return b & a <= c <= b | a
    return all(
        b & a <= c <= b | a
        for c, b, a in (
            (cur.adapters, before.adapters, after.adapters),
            (cur.domains, before.domains, after.domains),
        )
    )


def _recover(kernel: Kernel, store: Store) -> tuple[Contents, frozenset[str]]:
    """Step 1 of the module docstring: the store's contents afterwards, and the matrices of
    an interrupted change that could not be rolled back (not to be taken for drift)."""
    left = store.journal.read()  # the acknowledged changes as one, then the one in flight
    rewritten: frozenset[str] = frozenset()
    for intent in left[:1]:
        if intent.committed:  # its files are written again below
            rewritten = frozenset(
                f"{u}{SUFFIX}"
                for u, i in intent.matrices.items()
                if i.get("stored") and i.get("stored_before") != i.get("stored_after")
            )
            res = intent.reservations
            if res is not None and res["before"] != res["after"]:
                rewritten |= {HOST_FILE}
    contents = store.load(rewritten)
    for intent in left:  # the one in flight went from what the acknowledged ones left
        try:
            if _roll(kernel, store, contents, intent):
                contents = store.load()
        except (ApmatrixError, KeyError, TypeError, ValueError) as err:
            # The journal stays (until the next change overwrites it): the matrices of
            # its changes are neither rolled back nor adopted as drift.
            log.error("rolling back the interrupted change %r failed: %s", intent.what, err)
            return store.load(), frozenset(u for i in left for u in i.matrices)
    if left:
        store.journal.clear_durably()
    return contents, frozenset()


def _roll(kernel: Kernel, store: Store, contents: Contents, intent: Intent) -> bool:
    """Roll the intent's change back (or complete it); True if the store was written."""
    stored = {u: i for u, i in intent.matrices.items() if i.get("stored")}

    def now(u: str) -> Any:
        rec = contents.matrices.get(u)
        return rec.to_json() if rec is not None else None

    res = intent.reservations
    res_now = contents.reservations.to_json()
    at_after = all(now(u) == i["stored_after"] for u, i in stored.items()) and (
        res is None or res_now == res["after"]
    )
    # Its files as it left them: at before or after, or (committed only) cut by a crash.
    cut = set(contents.left_out)
    known = all(
        now(u) in (i["stored_before"], i["stored_after"]) or f"{u}{SUFFIX}" in cut
        for u, i in stored.items()
    ) and (res is None or res_now in (res["before"], res["after"]) or HOST_FILE in cut)
    if intent.committed:  # acknowledged: only its files can lag (journal.py)
        if at_after:
            log.info("the acknowledged change %r was stored", intent.what)
            return False
        if not known:  # written since by someone else (an admin, a backup restored)
            log.warning("journal: the store has moved on since the acknowledged change %r: "
                        "its files are left as they are", intent.what)  # fmt: skip
            return False
        log.warning("completing the files of the acknowledged change %r", intent.what)
        return _store_to(store, contents, stored, "stored_after", res["after"] if res else None)
    same_boot = bool(intent.boot) and intent.boot == kernel.boot_id()
    if intent.store_first and at_after and same_boot:
        # A removal: its files went first. If its mdevs are still there the kernel part never
        # happened (or was still blocked, a guest holding the mdev): the files come back,
        # rather than a write here that could block start-up as long as the guest runs.
        kernel_items = [(u, i) for u, i in intent.matrices.items() if "kernel_before" in i]
        if all(kernel.read_mdev_sets(u) is None for u, _ in kernel_items):
            log.info("the interrupted change %r was done", intent.what)
            return False
        log.warning("the interrupted change %r never reached the kernel: undone", intent.what)
        return _store_to(store, contents, stored, "stored_before", res["before"] if res else None)
    if intent.writes_store and at_after:
        log.info("the interrupted change %r was done: nothing to roll back", intent.what)
        return False
    if not known:
        log.warning("journal: the store has moved on since %r: nothing rolled back", intent.what)
        return False
    items = {u: i for u, i in intent.matrices.items() if "kernel_before" in i}
    if not same_boot:
        # Written in another boot: the kernel then is not the kernel now. Only the store
        # can still hold a part of the change.
        log.warning("rolling back the interrupted change %r of an earlier boot", intent.what)
        return _store_to(store, contents, stored, "stored_before", res["before"] if res else None)
    found = {u: kernel.read_mdev_sets(u) for u in items}
    done = all(_same(found[u], _sets(i["kernel_after"])) for u, i in items.items())
    removals = bool(items) and all(i["kernel_after"] is None for i in items.values())
    pool_done = True
    cur_pool: HostPool | None = None
    if intent.pool is not None:
        cur_pool = kernel.read_pool()
        pool_done = cur_pool == _pool(intent.pool["after"])
    if not intent.writes_store and done and pool_done:
        log.info("the interrupted change %r was done in the kernel", intent.what)
        return False
    if done and removals and intent.pool is None:
        # Our own removal, done in the kernel: an mdev is never re-created, so complete it.
        log.info("completing the interrupted change %r (its mdevs are gone)", intent.what)
        _store_to(store, contents, stored, "stored_after", None)
        return True
    # A group's intent bounds every set it passed through; one change's, before and after.
    plan = {
        u: (
            _sets(i.get("kernel_low", i["kernel_before"])),
            _sets(i.get("kernel_high", i["kernel_after"])),
            _sets(i["kernel_before"]),
        )
        for u, i in items.items()
    }
    pool_back: HostPool | None = None
    if intent.pool is not None and cur_pool is not None:
        before_pool = _pool(intent.pool["before"])
        low_pool = _pool(intent.pool.get("low", intent.pool["before"]))
        high_pool = _pool(intent.pool.get("high", intent.pool["after"]))
        if cur_pool != before_pool:
            if _pool_within(cur_pool, low_pool, high_pool):
                pool_back = before_pool
            else:
                log.warning("host pool: the kernel holds another pool; left as it is")
    res_to = res["before"] if res else None
    if pool_back is not None and cur_pool is not None:
        # Giving ids back to the host can be refused where taking them was not (6.19 counts
        # a returned adapter against every domain an mdev holds with it, one of them outside
        # this change). Judged before any mdev is taken back: a change whose kernel part is
        # done is then completed instead, and otherwise the pool stays where it is.
        held = {u: _after_take(found[u], *plan[u]) for u in items}
        refusal = _pool_refusal(kernel, cur_pool, pool_back, held)
        if refusal is not None:
            if done and pool_done:
                log.warning("completing the interrupted change %r: its host pool cannot go"
                            " back (%s)", intent.what, refusal)  # fmt: skip
                return _store_to(store, contents, stored, "stored_after",
                                 res["after"] if res else None)  # fmt: skip
            log.warning("the interrupted change %r: its host pool cannot go back (%s);"
                        " left as the kernel holds it", intent.what, refusal)  # fmt: skip
            pool_back = None
            if pool_done and res is not None:
                res_to = res["after"]  # the stored reservations follow the pool that stays
    log.warning("rolling back the interrupted change %r", intent.what)
    for u in reversed(list(items)):
        low, high, before = plan[u]
        if _take(kernel, u, found[u], low, high, to=before):
            log.info("matrix %s taken back to what it held before the interrupted change", u)
    if pool_back is not None and cur_pool is not None:
        kernel.set_pool(cur_pool, pool_back)
        log.info("host pool taken back to what it was before the interrupted change")
    return _store_to(store, contents, stored, "stored_before", res_to)


def _after_take(
    cur: Matrix | None, low: Matrix | None, high: Matrix | None, before: Matrix | None
) -> Matrix | None:
    """What :func:`_take` leaves the mdev holding."""
    return before if _taken_back(cur, low, high, before) else cur


def _taken_back(
    cur: Matrix | None, low: Matrix | None, high: Matrix | None, to: Matrix | None
) -> bool:
    """Is the mdev's ``cur`` to be taken to ``to``? Not if it is there already, or gone (a
    reboot, or our removal: never re-created), or outside what the change passed through."""
    return cur is not None and not _same(cur, to) and _within(cur, low, high)


def _pool_refusal(
    kernel: Kernel, cur: HostPool, to: HostPool, held: dict[str, Matrix | None]
) -> str | None:
    """Why the kernel would refuse the host pool ``to`` once the mdevs of ``held`` hold
    what it says (every other mdev as it is), judged by the registry's rule; None: it would
    not."""
    registry = Registry(limits=kernel.read_limits(), pool=cur,
                        release_all_ones=kernel.detect_features().all_ones_release)  # fmt: skip
    for uuid in kernel.list_mdevs():
        sets = held[uuid] if uuid in held else kernel.read_mdev_sets(uuid)
        if sets is not None:
            registry.restore(DefineMatrix(Matrix(uuid, *_triple(sets))))
    refused = registry.decide(SetPool(to)).error(ops.ORDER)
    return None if refused is None else str(refused)


def _take(
    kernel: Kernel,
    u: str,
    cur: Matrix | None,
    low: Matrix | None,
    high: Matrix | None,
    *,
    to: Matrix | None,
) -> bool:
    """Take the mdev ``u`` from ``cur`` to ``to``, but only if it holds something between
    ``low`` and ``high`` (what the change passed through) and is there at all; True if it
    was written."""
    if not _taken_back(cur, low, high, to):
        if cur is not None and not _same(cur, to):
            log.warning("matrix %s: the kernel holds more than the interrupted change did;"
                        " left as it is", u)  # fmt: skip
        return False
    assert cur is not None
    target = None if to is None else Matrix(u, *_triple(to))
    kernel.apply_matrix(u, Matrix(u, *_triple(cur)), target)
    return True


def _store_to(
    store: Store,
    contents: Contents,
    stored: dict[str, dict[str, Any]],
    key: str,
    reservations: dict[str, Any] | None,
) -> bool:
    wrote = False
    for u, item in stored.items():
        want = item[key]
        rec = contents.matrices.get(u)
        if (rec.to_json() if rec is not None else None) == want:
            continue
        if want is None:
            store.remove_matrix(u)
        else:
            store.write_matrix(StoredMatrix.from_json(want))
        wrote = True
    if reservations is not None and contents.reservations.to_json() != reservations:
        store.write_reservations(Reservations.from_json(reservations))
        wrote = True
    return wrote
