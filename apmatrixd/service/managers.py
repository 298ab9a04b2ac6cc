"""Who manages a matrix, and the matrices apmatrixd holds for others.

Every matrix has one manager (:data:`~apmatrixd.service.state.MANAGERS`):

- ``apmatrixd``: its definition is in our state directory; only these are changed here;
- ``mdevctl``: a definition in mdevctl's directory (``--mdevctl-dir``, ``/etc/mdevctl.d``)
  that is not ours. Read at start-up, at every rescan (only files whose inode, mtime or size
  changed are read again) and when our mdevctl callout says a definition changed
  (``ReloadMdevctl``). While it is live the registry holds the kernel's sets and the
  definition waits in ``Meta.definition``; stopped, the registry holds the definition;
- ``external``: a live mdev nobody defined (KubeVirt, IBM's CEX DRA driver, a shell); it is
  gone from the registry with its mdev.

All of them hold their APQNs in every decision. A definition that breaks a rule (mdevctl
wrote it while apmatrixd was not guarding) enters empty with its APQNs claimed, as drift does,
and a Drift says so. :func:`take_over` makes a matrix ours; :func:`propose` decides what
mdevctl is about to do, for the callout (``apmatrixd-callout``), as we decide our own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from apmatrixd import mdevctl
from apmatrixd.core import (
    DefineMatrix,
    InvalidArgument,
    Matrix,
    NotFound,
    RemoveMatrix,
    UpdateMatrix,
)
from apmatrixd.core.errors import NotManaged
from apmatrixd.core.matrix import id_set, normalize_uuid
from apmatrixd.service import ops, sync
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import APMATRIXD, EXTERNAL, MDEVCTL, Changes, Meta
from apmatrixd.service.tx import MatrixStep, Transaction

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)

PROPOSALS = ("define", "modify", "start", "live")
"""What mdevctl asks before it acts: ``define``/``modify`` a definition, ``start`` an mdev
(defined or given whole), ``live`` (``modify --live``) change a running one."""


# -- mdevctl's definitions --------------------------------------------------------------------
def scan(svc: Service) -> mdevctl.Scan | None:
    """Look at mdevctl's directory (in the worker); None if the daemon does not watch it."""
    if not svc.watch_mdevctl:
        return None
    return mdevctl.scan_dir(svc.mdevctl_dir, dict(svc.state.mdevctl_seen))


def reload(svc: Service) -> Command[Changes]:
    """Read mdevctl's definitions again now (the callout's ``post``, or an admin)."""
    found = yield Work("reading mdevctl's definitions", lambda _p: scan(svc))
    changes = Changes()
    if found is not None:
        take_scan(svc, changes, found)
    svc.emit(changes)
    return changes


def take_scan(svc: Service, changes: Changes, found: mdevctl.Scan) -> None:
    """Bring the mdevctl-managed matrices in step with a scan of its directory."""
    st = svc.state
    for uuid, why in sorted(found.broken.items()):
        log.warning("mdevctl definition %s not understood, left alone: %s", uuid, why)
    for uuid in sorted(st.mdevctl_seen.keys() - found.present.keys()):
        _undefined(svc, changes, uuid)
    for _uuid, d in sorted(found.read.items()):
        _defined(svc, changes, d)
    st.mdevctl_seen = dict(found.present)


def _defined(svc: Service, changes: Changes, d: mdevctl.Definition) -> None:
    st = svc.state
    if d.uuid in st.on_disk:
        return  # ours (exported or imported): the file follows us, not the other way round
    m = Matrix(d.uuid, d.adapters, d.domains, d.control_domains, autostart=d.autostart)
    meta = st.meta.get(d.uuid)
    if meta is None:
        meta = st.meta[d.uuid] = Meta(
            manager=MDEVCTL, control_usage_domains=d.domains <= d.control_domains
        )
        changes.matrices_added.add(d.uuid)
        log.info("holding mdevctl's definition %s: %s", d.uuid, sync.sets_text(m))
    else:
        if meta.manager == EXTERNAL:
            log.info("matrix %s is now mdevctl's (defined there)", d.uuid)
        meta.manager = MDEVCTL
        changes.matrices_changed.add(d.uuid)
    if meta.live:  # the kernel's sets stay in the registry; the definition waits
        meta.definition = m
        old = st.registry.get(d.uuid)
        st.registry.restore(UpdateMatrix(d.uuid, old.adapters, old.domains,
                                         old.control_domains, autostart=d.autostart))  # fmt: skip
        return
    hold(svc, changes, m)


def hold(svc: Service, changes: Changes, m: Matrix) -> None:
    """Put mdevctl's definition ``m`` (not live) in the registry; one that breaks a rule
    enters empty with its APQNs claimed, and a Drift says why."""
    st = svc.state
    reg = st.registry
    meta = st.meta[m.uuid]
    exists = m.uuid in reg.matrices
    old = reg.matrices.get(m.uuid)
    reg.clear_truth(m.uuid)
    change: DefineMatrix | UpdateMatrix = (
        UpdateMatrix(m.uuid, m.adapters, m.domains, m.control_domains, autostart=m.autostart)
        if exists
        else DefineMatrix(m)
    )
    err = reg.decide(change).error(ops.ORDER)
    if err is None:
        reg.apply(change)
        meta.definition = None
    else:
        empty = Matrix(m.uuid, autostart=m.autostart)
        if exists:
            reg.restore(UpdateMatrix(m.uuid, frozenset(), frozenset(), frozenset(),
                                     autostart=m.autostart))  # fmt: skip
        else:
            reg.restore(DefineMatrix(empty))
        reg.set_truth(m.uuid, m.adapters, m.domains)
        meta.definition = m
        what = f"mdevctl's definition breaks a rule ({err}); its APQNs are claimed, not held"
        sync.drift(svc, changes, m.uuid, "mdevctl", what, adopted=False)
    changes.matrices_changed.add(m.uuid)
    st.touch_adapters(changes, m.adapters | (old.adapters if old is not None else frozenset()))


def _undefined(svc: Service, changes: Changes, uuid: str) -> None:
    """mdevctl's file is gone (``mdevctl undefine``): a stopped matrix goes, a live one is
    nobody's definition any more."""
    st = svc.state
    meta = st.meta.get(uuid)
    if meta is None or meta.manager != MDEVCTL:
        return
    m = st.registry.get(uuid)
    if meta.live:
        meta.manager, meta.definition = EXTERNAL, None
        st.registry.restore(UpdateMatrix(uuid, m.adapters, m.domains, m.control_domains,
                                         autostart=False))  # fmt: skip
        changes.matrices_changed.add(uuid)
        log.info("mdevctl's definition of live matrix %s is gone: nobody defines it now", uuid)
        return
    st.registry.clear_truth(uuid)
    st.registry.apply(RemoveMatrix(uuid))
    del st.meta[uuid]
    changes.matrices_removed.add(uuid)
    st.touch_adapters(changes, m.adapters)
    log.info("mdevctl's definition %s is gone", uuid)


def stopped(svc: Service, changes: Changes, uuid: str) -> None:
    """A live mdevctl-managed matrix's mdev is gone: its definition holds its APQNs again."""
    meta = svc.state.meta[uuid]
    m = meta.definition
    if m is not None:
        hold(svc, changes, m)


# -- taking over --------------------------------------------------------------------------------
def take_over(svc: Service, uuid: str) -> Command[None]:
    """Make a matrix ours: stored in our state directory, changed only through apmatrixd
    from now on. A live one is taken with the sets the kernel holds (what its guest has);
    sets that break a rule are refused by name, and nothing changes."""
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    meta = st.meta[m.uuid]
    if meta.manager == APMATRIXD:
        return
    want = m
    if meta.live and meta.truth is not None:
        want = meta.truth.matrix()
    elif not meta.live and meta.definition is not None:
        want = meta.definition
    want = Matrix(m.uuid, want.adapters, want.domains, want.control_domains,
                  name=m.name, autostart=m.autostart)  # fmt: skip
    change = UpdateMatrix(m.uuid, want.adapters, want.domains, want.control_domains)
    ops.refuse(svc, st.registry.decide(change))
    record = st.record(m.uuid, want, meta.control_usage_domains)
    tx = Transaction(
        f"TakeOver {m.uuid}",
        store={m.uuid: record},
        stored_before={m.uuid: st.on_disk.get(m.uuid)},
    )
    yield from svc.transact(tx)
    was = meta.manager
    st.registry.clear_truth(m.uuid)
    st.registry.restore(change)
    meta.truth = None
    ops.stored(svc, m.uuid, record)
    log.info("took over matrix %s (was %s's): %s", m.label, was, sync.sets_text(want))
    changes = Changes(matrices_changed={m.uuid})
    st.touch_adapters(changes, m.adapters | want.adapters)
    svc.emit(changes)


# -- the mdevctl callout --------------------------------------------------------------------------
def propose(
    svc: Service,
    action: str,
    uuid: str,
    adapters: list[int],
    domains: list[int],
    control_domains: list[int],
    autostart: bool = False,
) -> Command[None]:
    """Decide what mdevctl is about to do (``action`` of :data:`PROPOSALS`) as apmatrixd
    decides its own changes; a refusal names every clashing APQN and its owner. For
    ``define``/``modify``/``start`` nothing changes here (mdevctl's ``post`` asks for a
    :func:`reload` once its file is written; uevents tell of a start); ``live`` is also carried
    out, as mdevctl leaves a live modify to its callout."""
    if action not in PROPOSALS:
        raise InvalidArgument(f"unknown mdevctl action {action!r} (known: {', '.join(PROPOSALS)})")
    uuid = normalize_uuid(uuid)
    a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
    c = id_set(control_domains, "control domain")
    st = svc.state
    m = Matrix(uuid, a, d, c, autostart=autostart)
    have = st.registry.matrices.get(uuid)
    meta = st.meta.get(uuid)
    if have is not None and meta is not None and meta.manager == APMATRIXD:
        raise NotManaged(
            f"apmatrixd manages matrix {have.label}: mdevctl may not {action} it; use "
            f"apmatrixctl (or remove it there first)"
        )
    change: DefineMatrix | UpdateMatrix = (
        DefineMatrix(m) if have is None else UpdateMatrix(uuid, a, d, c)
    )
    if action in ("define", "modify"):
        ops.refuse(svc, st.registry.decide(change))
        return
    live = meta is not None and meta.live
    if action == "start" and live:
        return  # mdevctl says "already active" itself
    if action == "live" and not live:
        raise NotFound(f"matrix {uuid} is not live: nothing to change live")
    ops.no_override_claimed(svc, m)
    ops.refuse(svc, st.registry.decide(change))
    yield from ops.live_rules(svc, st.kernel_sets(uuid) if live else None, m)
    if action == "live":
        yield from _live(svc, uuid, m)
        return
    log.info("mdevctl may %s %s: %s", action, uuid, sync.sets_text(m))


def _live(svc: Service, uuid: str, m: Matrix) -> Command[None]:
    """Carry out mdevctl's live modify, as its callout must (mdevctl 1.3 writes nothing for
    it: ap-check does the sysfs writes): the mdev goes to ``m``'s sets in one transaction,
    nothing is stored (the definition is mdevctl's), and the registry follows the kernel."""
    st = svc.state
    have = st.registry.get(uuid)
    new = have.with_sets(m.adapters, m.domains, m.control_domains)
    step = MatrixStep(uuid, st.kernel_sets(uuid), new)
    tx = Transaction(f"mdevctl live modify {uuid}", matrices=[step], guests=(uuid,))
    yield from svc.transact(tx)
    guest = yield from svc.read_guest(uuid, tx)
    st.registry.clear_truth(uuid)
    st.registry.restore(UpdateMatrix(uuid, new.adapters, new.domains, new.control_domains))
    meta = st.meta[uuid]
    meta.truth = None
    if guest is not None:
        meta.guest = guest
    log.info("mdevctl changed live matrix %s: %s", uuid, sync.sets_text(new))
    changes = Changes(matrices_changed={uuid})
    st.touch_adapters(changes, have.adapters | new.adapters)
    svc.emit(changes)
