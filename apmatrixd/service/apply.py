"""Apply a declared document (:mod:`apmatrixd.declared`): the whole plan decided, then all of it.

The plan is decided on a scratch copy of the registry in the order the kernel will see it:
the host pool narrowed (reserve), the pruned matrices gone, then every update and creation
(in an order where each finds its APQNs free: a matrix giving up an APQN another takes
goes first), the host pool widened (release). Every problem is collected, not just the
first, and named in one refusal before anything is written. Then one
:class:`~apmatrixd.service.tx.Transaction` carries it all (the pool moves, every mdev step,
every store record and the reservations), undone backward on any failure, and one Changes is
emitted.

Only matrices apmatrixd manages are touched; a declared name held by an mdevctl or an
external matrix is refused by name, and their APQNs count in every decision like any other.

What a declared matrix becomes live: ``state: active`` makes it live, ``state: defined``
makes it not; without ``state`` an existing matrix stays as it is, except that one with
``autostart: true`` whose APQNs are all present is started (what the daemon would do at
boot), and a new one is created live, as CreateMatrix does.
"""

from __future__ import annotations

import copy
import logging
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apmatrixd import declared
from apmatrixd.core import (
    ApmatrixError,
    Apqn,
    DefineMatrix,
    HostPool,
    InvalidArgument,
    Matrix,
    Registry,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)
from apmatrixd.core.apqn import format_ids
from apmatrixd.core.errors import DriverOverride, GuestRunning, Refusals
from apmatrixd.service import managers, ops
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import APMATRIXD, Changes, Meta
from apmatrixd.service.tx import MatrixStep, Transaction, narrowed
from apmatrixd.store import StoredMatrix

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)

ACTIONS = ("reserve", "release", "create", "update", "configure", "start", "stop", "remove")


@dataclass(frozen=True)
class Step:
    """One line of the plan: what, on which matrix (or the host pool), in one sentence."""

    action: str
    target: str  # a matrix's name, or "host pool"
    text: str
    uuid: str = ""
    adapters: frozenset[int] | None = None  # a matrix's new sets, or the ids a pool step moves
    domains: frozenset[int] | None = None
    control_domains: frozenset[int] | None = None


@dataclass
class Applied:
    changed: bool
    plan: list[Step] = field(default_factory=list)


@dataclass
class _Matrix:
    """A declared matrix as planned: its change in the registry and what the kernel does."""

    want: Matrix
    change: DefineMatrix | UpdateMatrix | None  # None: its sets, name and flag stay
    live_before: bool
    live_after: bool
    steps: list[Step]


def _sets(m: Matrix) -> str:
    return (
        f"adapters {format_ids(m.adapters, 'none')} x domains {format_ids(m.domains, 'none')}, "
        f"control domains {format_ids(m.control_domains, 'none')}"
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def apply(
    svc: Service, document: str, check: bool = False, prune: bool = False
) -> Command[Applied]:
    """Bring the host to ``document``; ``check``: only say what that takes (a dry run)."""
    decl = declared.parse(document)  # a bad document is refused before anything is read
    yield from managers.reload(svc)  # what mdevctl holds now counts, not what it held
    st = svc.state
    scratch = copy.deepcopy(st.registry)
    problems: list[tuple[str, ApmatrixError]] = []
    plan: list[Step] = []

    # -- the host pool: narrowed first, widened last --------------------------------------
    old_pool = ops.kernel_pool(svc)
    full = _full_pool(svc, old_pool) if prune else old_pool
    new_pool = ops.reserved_pool(full, decl.adapters, decl.domains)
    mid_pool = narrowed(old_pool, new_pool)
    reserved_a, reserved_d, released_a, released_d = _moved(old_pool, new_pool)
    reservations = st.reservations.reserve(decl.adapters, decl.domains)
    if prune:
        reservations = reservations.release(
            released_a | (reservations.reserved_adapters - decl.adapters),
            released_d | (reservations.reserved_domains - decl.domains),
        )
    if new_pool != old_pool and st.overrides():
        problems.append(
            ("host pool", DriverOverride(st.overrides(), "the apmask/aqmask cannot change"))
        )
    if new_pool != old_pool:
        scratch.truth_pool = None
        scratch.restore(SetHostPool(mid_pool))  # narrowing takes nothing from any matrix
    if mid_pool != old_pool or (new_pool == old_pool and reservations != st.reservations):
        plan.append(_pool_step("reserve", reserved_a, reserved_d, old_pool, mid_pool))

    # -- the matrices ---------------------------------------------------------------------
    declared_uuids: set[str] = set()
    planned: list[_Matrix] = []
    for dm in decl.matrices:
        try:
            ops.check_name(dm.name)
            p = yield from _plan_matrix(svc, dm)
        except ApmatrixError as err:
            problems.append((f"matrix {dm.name}", err))
            continue
        declared_uuids.add(p.want.uuid)
        planned.append(p)
    removed: list[Matrix] = []
    if prune:
        for u in sorted(st.registry.matrices):
            m = st.registry.matrices[u]
            if st.meta[u].manager != APMATRIXD or u in declared_uuids:
                continue
            try:
                yield from _idle(svc, m, "remove")
            except ApmatrixError as err:
                problems.append((f"matrix {m.label}", err))
                continue
            scratch.apply(RemoveMatrix(u))
            removed.append(m)
            plan.append(Step("remove", m.label, f"remove {m.label} ({u}): not declared", u))
    ordered = _order(svc, scratch, planned, problems)
    for p in ordered:
        plan += p.steps
    pool_decision = scratch.decide(SetHostPool(new_pool))
    try:
        ops.refuse(svc, pool_decision)
    except ApmatrixError as err:
        problems.append(("release", err))
    if new_pool != mid_pool:
        plan.append(_pool_step("release", released_a, released_d, mid_pool, new_pool))
    if problems:
        raise Refusals(problems)
    if check or not plan:
        return Applied(bool(plan), plan)

    # -- all of it, in one transaction ----------------------------------------------------
    kernel_steps = [
        MatrixStep(m.uuid, st.kernel_sets(m.uuid), None) for m in removed if _live(svc, m)
    ]
    records: dict[str, StoredMatrix | None] = {m.uuid: None for m in removed}
    for p in ordered:
        u = p.want.uuid
        if p.live_before and not p.live_after:
            kernel_steps.insert(0, MatrixStep(u, st.kernel_sets(u), None))
        elif p.live_after:
            before = st.kernel_sets(u) if p.live_before else None
            if before is None or p.change is not None or st.meta[u].truth is not None:
                kernel_steps.append(MatrixStep(u, before, p.want))
        if p.change is not None:
            cud = st.meta[u].control_usage_domains if u in st.meta else True
            records[u] = st.record(u, p.want, cud)
    tx = Transaction(
        "Apply",
        matrices=kernel_steps,
        pool=(old_pool, new_pool) if new_pool != old_pool else None,
        store=records,
        stored_before={u: st.on_disk.get(u) for u in records},
        reservations=reservations,
        reservations_before=st.on_disk_reservations,
        removals_last=True,
    )
    yield from svc.transact(tx)
    infos = mdevs = None
    if new_pool != old_pool:
        infos, mdevs = yield from ops.reread_after_pool(svc, old_pool, new_pool)
    guests: dict[str, tuple[Apqn, ...] | None] = {}
    for p in ordered:
        if p.live_after:
            guests[p.want.uuid] = yield from svc.read_guest(p.want.uuid)

    # -- commit: the decisions taken above, replayed without deciding again ---------------
    reg = st.registry
    changes = Changes(host_changed=new_pool != old_pool)
    touched: set[int] = set()
    registry_old = reg.pool
    if new_pool != old_pool:
        reg.restore(SetHostPool(mid_pool))
    for m in removed:
        reg.apply(RemoveMatrix(m.uuid))
        del st.meta[m.uuid]
        st.on_disk.pop(m.uuid, None)
        changes.matrices_removed.add(m.uuid)
        touched |= m.adapters
    for p in ordered:
        u = p.want.uuid
        if not p.steps:
            continue
        if isinstance(p.change, DefineMatrix):
            reg.restore(p.change)
            st.meta[u] = Meta(control_usage_domains=True)
            changes.matrices_added.add(u)
        else:
            touched |= reg.get(u).adapters
            if p.change is not None:
                st.set_truth(u, None)
                reg.restore(p.change)
            changes.matrices_changed.add(u)
        meta = st.meta[u]
        meta.live = p.live_after
        if p.live_after:
            got = guests.get(u)
            meta.guest = got if got is not None else meta.guest
        else:
            meta.guest, meta.in_use = (), False
            st.set_truth(u, None)
        record = records.get(u)
        if record is not None:
            ops.stored(svc, u, record)
        touched |= p.want.adapters
    if new_pool != old_pool:
        reg.restore(SetHostPool(new_pool))
        reg.truth_pool = None
        ops.pool_moved(svc, changes, registry_old, new_pool, infos, mdevs)
    st.reservations = reservations
    if svc.store is not None:
        st.on_disk_reservations = reservations
    st.touch_adapters(changes, touched)
    for m in removed:
        yield from ops.drop_mdevctl_file(svc, m.uuid)
    log.info("applied a declared document: %d step(s)", len(plan))
    svc.emit(changes)
    return Applied(True, plan)


def _live(svc: Service, m: Matrix) -> bool:
    return svc.state.meta[m.uuid].live


def _full_pool(svc: Service, pool: HostPool) -> HostPool:
    """The host pool with nothing reserved: what ``prune`` starts from."""
    if pool.queues is not None:
        infos = svc.state.infos.values()
        return HostPool(queues=frozenset(Apqn(i.id, d) for i in infos for d in i.domains))
    return HostPool()


def _moved(
    old: HostPool, new: HostPool
) -> tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int]]:
    """The adapters and domains a pool move reserves, and those it releases."""
    if old.queues is not None and new.queues is not None:
        took, gave = old.queues - new.queues, new.queues - old.queues
        return (
            frozenset(q.adapter for q in took),
            frozenset(q.domain for q in took),
            frozenset(q.adapter for q in gave),
            frozenset(q.domain for q in gave),
        )
    return (
        old.adapters - new.adapters,
        old.domains - new.domains,
        new.adapters - old.adapters,
        new.domains - old.domains,
    )


def _pool_step(
    action: str, adapters: frozenset[int], domains: frozenset[int], old: HostPool, new: HostPool
) -> Step:
    if old.queues is not None and new.queues is not None:
        n = len(old.queues ^ new.queues)
        what = f"{n} queue{'s' if n != 1 else ''} of adapters {format_ids(adapters, 'none')}"
    else:
        what = f"adapters {format_ids(adapters, 'none')}, domains {format_ids(domains, 'none')}"
    if action == "reserve":
        text = f"reserve {what} for guests (from the host's drivers)"
        if old == new:
            text = "record the reservations (the host pool already agrees)"
    else:
        text = f"release {what} to the host's drivers"
    return Step(action, "host pool", text, "", adapters, domains)


def _idle(svc: Service, m: Matrix, what: str) -> Command[None]:
    """A live matrix an apply would take away must have no guest running: never forced."""
    if not svc.state.meta[m.uuid].live:
        return
    in_use = yield Work(f"asking whether a guest runs {m.uuid}",
                        lambda _p: svc.kernel.in_use(m.uuid))  # fmt: skip
    if in_use:
        raise GuestRunning(
            f"guest running: an apply would {what} matrix {m.label}, which a guest uses; "
            f"stop the guest first (an apply never forces)"
        )


def _plan_matrix(svc: Service, dm: declared.DeclaredMatrix) -> Command[_Matrix]:
    """What one declared matrix takes, decided later against the others (see :func:`_order`)."""
    st = svc.state
    have = st.registry.by_name(dm.name)
    if dm.uuid is not None:
        if have is not None and have.uuid != dm.uuid:
            raise InvalidArgument(
                f"is {have.uuid} on this host, not {dm.uuid}: a matrix keeps its UUID "
                "(leave uuid out, or remove the matrix first)"
            )
        if have is None and dm.uuid in st.registry.matrices:
            have = st.registry.get(dm.uuid)  # declared by UUID under a new name: a rename
    if have is not None:
        ops.managed(svc, have, "apply a document to")
    if have is None:
        uuid = dm.uuid or str(uuidlib.uuid4())
        c = dm.control_domains | dm.domains
        want = Matrix(uuid, dm.adapters, dm.domains, c, dm.name, dm.autostart)
        live = dm.state != "defined"
        if live:
            ops.no_override_claimed(svc, want)
            yield from ops.live_rules(svc, None, want)
        text = f"create {dm.name}: {_sets(want)}; {'live' if live else 'defined'}"
        step = Step("create", dm.name, text, uuid, want.adapters, want.domains, c)
        return _Matrix(want, DefineMatrix(want), False, live, [step])
    meta = st.meta[have.uuid]
    c = dm.control_domains | (dm.domains if meta.control_usage_domains else frozenset())
    want = Matrix(have.uuid, dm.adapters, dm.domains, c, dm.name, dm.autostart)
    now = st.kernel_sets(have.uuid) or have
    sets = (want.adapters, want.domains, want.control_domains)
    differ = sets != (have.adapters, have.domains, have.control_domains) or sets != (
        now.adapters,
        now.domains,
        now.control_domains,
    )
    steps: list[Step] = []
    if differ:
        text = f"update {dm.name}: {_sets(now)} -> {_sets(want)}"
        steps.append(Step("update", dm.name, text, have.uuid, *sets))
    if have.name != dm.name:
        steps.append(Step("configure", dm.name, f"rename {have.label} to {dm.name}", have.uuid))
    if have.autostart != dm.autostart:
        text = f"configure {dm.name}: autostart {_yes(have.autostart)} -> {_yes(dm.autostart)}"
        steps.append(Step("configure", dm.name, text, have.uuid))
    live = meta.live
    if dm.state == "active":
        live = True
    elif dm.state == "defined":
        live = False
    elif dm.autostart and not meta.live:
        live = all(map(st.present, want.apqns()))
    if live and not meta.live:
        steps.append(Step("start", dm.name, f"start {dm.name}", have.uuid))
    elif meta.live and not live:
        yield from _idle(svc, have, "stop")
        steps.append(Step("stop", dm.name, f"stop {dm.name} (its definition stays)", have.uuid))
    if live:
        ops.no_override_claimed(svc, want)
        if differ or not meta.live:
            yield from ops.live_rules(svc, now if meta.live else None, want)
    change = None
    if differ or have.name != dm.name or have.autostart != dm.autostart:
        change = UpdateMatrix(have.uuid, *sets, name=dm.name, autostart=dm.autostart)
    elif live and not meta.live:
        change = None  # a start: decided below as Start decides it
    return _Matrix(want, change, meta.live, live, steps)


def _order(
    svc: Service,
    scratch: Registry,
    planned: Iterable[_Matrix],
    problems: list[tuple[str, ApmatrixError]],
) -> list[_Matrix]:
    """Decide every declared matrix on ``scratch``, in an order in which each one's APQNs
    are free when it comes (so a matrix giving one up goes before the one taking it); the
    ones no order fits are refused, each naming what holds its APQNs."""
    pending = list(planned)
    done: list[_Matrix] = []
    while pending:
        left: list[_Matrix] = []
        for p in pending:
            change = _decided_change(p)
            if change is None:
                done.append(p)
                continue
            decision = scratch.decide(change)
            if decision.accepted:
                scratch.apply(change, decided=decision)
                if isinstance(change, UpdateMatrix):
                    scratch.clear_truth(change.uuid)  # its mdev's claims go with its step
                done.append(p)
            else:
                left.append(p)
        if len(left) == len(pending):
            for p in left:
                try:
                    ops.refuse(svc, scratch.decide(_decided_change(p)))  # type: ignore[arg-type]
                except ApmatrixError as err:
                    problems.append((f"matrix {p.want.label}", err))
            break
        pending = left
    return done


def _decided_change(p: _Matrix) -> DefineMatrix | UpdateMatrix | None:
    """What the registry judges for ``p``: its change, or for a start its own sets again
    (as Start decides: the kernel's truth may hold them elsewhere)."""
    if p.change is not None:
        return p.change
    if p.live_after and not p.live_before:
        m = p.want
        return UpdateMatrix(m.uuid, m.adapters, m.domains, m.control_domains)
    return None
