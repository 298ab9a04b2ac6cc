"""The operations: each a command that decides, runs one transaction, commits and reports.

Every operation has the same shape: check the arguments and decide in the registry (a
refusal raises here, before any I/O), build a :class:`~apmatrixd.service.tx.Transaction`,
``yield from svc.transact(tx)`` (the worker runs it; a failure raises here with nothing left
of the change), re-read what the guest sees (best effort: a failed read is logged and a
resync is asked for, the change stays committed), then commit to the state and emit one
:class:`~apmatrixd.service.state.Changes`. Decisions count the kernel's truth (claims of
drifted matrices and a host pool the registry could not adopt), so no change reaches the
kernel only to be refused for a reason the registry could have named.
"""

from __future__ import annotations

import copy
import errno
import logging
import string
import uuid as uuidlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from apmatrixd import mdevctl
from apmatrixd.core import (
    AlreadyExists,
    ApmatrixError,
    Apqn,
    Decision,
    DefineMatrix,
    HostPool,
    InvalidArgument,
    Matrix,
    OutOfRange,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)
from apmatrixd.core.errors import (
    Clash,
    DriverOverride,
    GuestRunning,
    NotManaged,
    Unavailable,
    _ClashError,
)
from apmatrixd.core.matrix import id_set, normalize_uuid
from apmatrixd.core.registry import unavailable_before_60
from apmatrixd.kernel import AdapterInfo, KernelError, MdevInfo
from apmatrixd.kernel.errors import KernelTimeout
from apmatrixd.service import managers
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import APMATRIXD, MDEVCTL, Changes, Meta
from apmatrixd.service.tx import MatrixStep, Transaction
from apmatrixd.service.views import MatrixView
from apmatrixd.store import Reservations, StoredMatrix, StoreError

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)

Kind = Literal["adapter", "domain", "control_domain"]
KINDS: tuple[Kind, ...] = ("adapter", "domain", "control_domain")

# The kernel interfaces check in different orders; the daemon reports the most basic
# problem first so an admin fixes typos before ownership questions.
ORDER = ("invalid", "not_found", "exists", "range", "host", "conflict", "busy")


NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.+@:")


def check_name(name: str) -> None:
    """A matrix name is what an admin types after ``apmatrixctl show``: letters, digits and
    ``-_.+@:``, at most 255, and not only hex digits and ``-`` (it would read as a UUID
    prefix, and shadow the matrices whose UUIDs start so). '' is no name."""
    if not isinstance(name, str) or len(name) > 255:
        raise InvalidArgument("a name has at most 255 characters")
    bad = sorted(set(name) - NAME_CHARS)
    if bad:
        raise InvalidArgument(
            f"a name may not contain {''.join(bad)!r} (letters, digits and -_.+@: only)"
        )
    if name and set(name) <= set(string.hexdigits + "-"):
        raise InvalidArgument(
            f"name {name!r} reads as a UUID prefix (only hex digits and '-'): add a letter g-z"
        )


def refuse(svc: Service, decision: Decision) -> None:
    """Raise the decision's refusal, if any, naming who manages each matrix it clashes with
    (an mdevctl definition or an mdev made outside apmatrixd reads as such, not as ours)."""
    err = decision.error(ORDER)
    if err is None:
        return
    if isinstance(err, _ClashError):
        named = [_owned_by(svc, c) for c in err.clashes]
        if named != err.clashes:
            raise type(err)(named)
    raise err


def _owned_by(svc: Service, c: Clash) -> Clash:
    meta = svc.state.meta.get(c.owner)
    if meta is None or meta.manager == APMATRIXD:
        return c
    label = c.owner_name or c.owner
    if meta.manager == MDEVCTL:
        return c._replace(owner_name=f"mdevctl's definition {label}")
    return c._replace(owner_name=f"mdev {label}, made outside apmatrixd")


def managed(svc: Service, m: Matrix, what: str) -> None:
    """apmatrixd changes only the matrices it manages; the others are refused by name."""
    manager = svc.state.meta[m.uuid].manager
    if manager == APMATRIXD:
        return
    if manager == MDEVCTL:
        owner = f"mdevctl manages matrix {m.label} (its definition in {svc.mdevctl_dir})"
        how = "use mdevctl for it"
    else:
        owner = f"matrix {m.label} was made outside apmatrixd (an mdev nobody defined)"
        how = "leave it to whoever made it"
    raise NotManaged(
        f"{owner}: apmatrixd does not {what} it; {how}, or take it over first "
        f"(TakeOver, apmatrixctl take-over {m.label})"
    )


# -- matrices ---------------------------------------------------------------------------------
def create_matrix(
    svc: Service,
    uuid: str = "",
    *,
    adapters: Iterable[int] = (),
    domains: Iterable[int] = (),
    control_domains: Iterable[int] = (),
    name: str = "",
    autostart: bool = False,
    start: bool = True,
    control_usage_domains: bool = True,
) -> Command[MatrixView]:
    st = svc.state
    uuid = normalize_uuid(uuid) if uuid else str(uuidlib.uuid4())
    a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
    c = id_set(control_domains, "control domain")
    if control_usage_domains:
        c |= d
    check_name(name)
    m = Matrix(uuid, a, d, c, name=name, autostart=autostart)
    define = DefineMatrix(m)
    if start:
        no_override_claimed(svc, m)
    decision = st.registry.decide(define)
    refuse(svc, decision)
    if start:
        yield from live_rules(svc, None, m)
    record = st.record(uuid, m, control_usage_domains)
    tx = Transaction(
        f"CreateMatrix {uuid}",
        matrices=[MatrixStep(uuid, None, m)] if start else [],
        store={uuid: record},
        stored_before={uuid: None},
        guests=(uuid,) if start else (),
    )
    yield from _creating(svc, tx, m)
    guest: tuple[Apqn, ...] = ()
    if start:
        guest = (yield from svc.read_guest(uuid, tx)) or ()
    st.registry.apply(define, ORDER, decision)
    st.meta[uuid] = Meta(live=start, control_usage_domains=control_usage_domains, guest=guest)
    stored(svc, uuid, record)
    changes = Changes(matrices_added={uuid})
    st.touch_adapters(changes, a)
    svc.emit(changes)
    return svc.matrix(uuid)


def change_one(svc: Service, uuid: str, kind: Kind, id: int, *, add: bool) -> Command[None]:
    """Assign or unassign one adapter, domain or control domain: :func:`update` of one id, so
    ControlUsageDomains means the same for both."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown kind {kind!r}")
    one = {k: [id] if k == kind else [] for k in KINDS}
    verb = "Assign" if add else "Unassign"
    what = f"{verb}{kind.title().replace('_', '')} {id:#x} of {svc.resolve(uuid)}"
    yield from update(
        svc, uuid, one["adapter"], one["domain"], one["control_domain"],
        "add" if add else "remove", [f"{kind}s"], what,
    )  # fmt: skip


SETS = ("adapters", "domains", "control_domains")
MODES = ("set", "add", "remove")


def update(
    svc: Service,
    uuid: str,
    adapters: Iterable[int],
    domains: Iterable[int],
    control_domains: Iterable[int],
    mode: str = "set",
    sets: Iterable[str] = SETS,
    what: str = "",
) -> Command[None]:
    """Change a matrix's sets, decided on what it holds when the command runs (never on what
    a caller read earlier, so two callers' changes both land).

    ``mode`` ``set`` replaces the sets named in ``sets`` (default all three) and keeps the
    others; ``add``/``remove`` add or remove the ids given. With ControlUsageDomains every
    usage domain stays a control domain: a usage domain added is a control domain too, one
    removed or replaced takes its control domain along (the control domains of their own are
    the others), and a control domain that is a usage domain cannot be dropped."""
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    which = set(sets)
    if not which <= set(SETS) or not which:
        raise InvalidArgument(f"sets must name some of {', '.join(SETS)}, not {sorted(which)}")
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    managed(svc, m, "change")
    meta = st.meta[m.uuid]
    base = meta.truth.matrix() if meta.live and meta.truth is not None else m
    given = {
        "adapters": id_set(adapters, "adapter"),
        "domains": id_set(domains, "domain"),
        "control_domains": id_set(control_domains, "control domain"),
    }
    old = {
        "adapters": base.adapters,
        "domains": base.domains,
        "control_domains": base.control_domains,
    }
    new = dict(old)
    for k in which:
        if mode == "set":
            new[k] = given[k]
        elif mode == "add":
            new[k] = old[k] | given[k]
        else:
            new[k] = old[k] - given[k]
    if meta.control_usage_domains:
        own = new["control_domains"] - (old["domains"] if "control_domains" not in which else set())
        new["control_domains"] = frozenset(own | new["domains"])
    yield from update_sets(
        svc, m, new["adapters"], new["domains"], new["control_domains"], what or f"Update {m.uuid}"
    )


def update_sets(
    svc: Service, m: Matrix, a: Iterable[int], d: Iterable[int], c: Iterable[int], what: str
) -> Command[None]:
    st = svc.state
    managed(svc, m, "change")
    change = UpdateMatrix(m.uuid, frozenset(a), frozenset(d), frozenset(c))
    new = m.with_sets(change.adapters, change.domains, change.control_domains)
    meta = st.meta[m.uuid]
    if meta.live:
        no_override_claimed(svc, new)
    decision = st.registry.decide(change)
    refuse(svc, decision)
    drifted = meta.live and meta.truth is not None
    if decision.noop and not drifted:
        return
    if meta.live:
        yield from live_rules(svc, st.kernel_sets(m.uuid), new)
    record = st.record(m.uuid, new)
    tx = Transaction(
        what,
        matrices=[MatrixStep(m.uuid, st.kernel_sets(m.uuid), new)] if meta.live else [],
        store={m.uuid: record},
        stored_before={m.uuid: st.on_disk.get(m.uuid)},
        guests=(m.uuid,) if meta.live else (),
    )
    yield from svc.transact(tx)
    guest = (yield from svc.read_guest(m.uuid, tx)) if meta.live else ()
    truth = meta.truth
    st.registry.apply(change, ORDER, decision)
    st.set_truth(m.uuid, None)
    if guest is not None:
        meta.guest = guest
    stored(svc, m.uuid, record)
    changes = Changes(matrices_changed={m.uuid})
    # An adapter's owners change only if it came or went, or if the domains changed.
    old = truth.matrix() if truth is not None else m
    same = m.domains == new.domains and old.domains == new.domains
    touched = m.adapters ^ new.adapters
    if old is not m:
        touched |= old.adapters ^ new.adapters
    st.touch_adapters(changes, touched if same else m.adapters | new.adapters | old.adapters)
    svc.emit(changes)


def start(svc: Service, uuid: str) -> Command[None]:
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    meta = st.meta[m.uuid]
    if meta.live:
        return
    managed(svc, m, "start")
    # Its own APQNs against everything else, the kernel's truth included: a drifted matrix
    # or host pool holding one of them is named here, not by the kernel's EADDRINUSE.
    no_override_claimed(svc, m)
    refuse(svc, st.registry.decide(UpdateMatrix(m.uuid, m.adapters, m.domains, m.control_domains)))
    yield from live_rules(svc, None, m)
    tx = Transaction(f"Start {m.uuid}", matrices=[MatrixStep(m.uuid, None, m)], guests=(m.uuid,))
    yield from _creating(svc, tx, m)
    guest = (yield from svc.read_guest(m.uuid, tx)) or ()
    meta.live, meta.guest = True, guest
    changes = Changes(matrices_changed={m.uuid})
    st.touch_adapters(changes, m.adapters)
    svc.emit(changes)


def live_rules(svc: Service, old: Matrix | None, new: Matrix) -> Command[None]:
    """What this generation adds for a live mdev going from ``old`` (None: created) to
    ``new``: before 6.0 a running guest's matrix is fixed and only queues bound to vfio_ap
    can be assigned; 6.19+ no queue bound elsewhere by a driver_override may be claimed."""
    st, features = svc.state, svc.kernel.features
    if features.static:
        if old is not None:
            in_use = yield Work(f"asking whether a guest runs {new.uuid}",
                                lambda _p: svc.kernel.in_use(new.uuid))  # fmt: skip
            if in_use:
                raise GuestRunning(
                    f"guest running: matrix {new.label} is in use by a guest, and this kernel "
                    "(before 6.0) cannot change a running guest's matrix; stop the guest first"
                )
        bound = {a: info.guest_domains for a, info in st.infos.items()}
        missing = unavailable_before_60(old, new, bound)
        if missing:
            raise Unavailable(missing, f"matrix {new.label}")


def no_override_claimed(svc: Service, m: Matrix) -> None:
    """6.19+: a live matrix may not claim a queue a driver_override binds to another driver
    (checked before the registry, which would call such a queue the host's)."""
    st = svc.state
    infos = st.infos
    claimed = [
        (f"{a:02x}.{d:04x}", drv)
        for a in sorted(m.adapters & st.overridden)  # few cards, if any: not every adapter
        for d, drv in infos[a].overrides
        if d in m.domains and drv != svc.kernel.vfio_driver
    ]
    if claimed:
        raise DriverOverride(claimed, f"matrix {m.label} may not claim them")


def _creating(svc: Service, tx: Transaction, m: Matrix) -> Command[None]:
    """Run a transaction that creates ``m``'s mdev. The first mdev of a host tells its
    generation; a kernel before 6.0 found that way gets its refusal named, as later ones."""
    unknown = svc.kernel.features.dynamic is None
    try:
        yield from svc.transact(tx)
    except KernelError as err:
        if unknown and err.errno == errno.EADDRNOTAVAIL and svc.kernel.features.static:
            try:
                yield from live_rules(svc, None, m)
            except ApmatrixError as named:
                raise named from err
        raise


def _guest_check(
    svc: Service, m: Matrix, what: str, force: bool, timeout: float | None
) -> Command[float]:
    """Refuse taking the mdev of a running guest away unless forced; how long its remove
    may wait for the guest to let go (always bounded: a guest may start meanwhile)."""
    meta = svc.state.meta[m.uuid]
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise InvalidArgument(f"timeout must be a number of seconds > 0, not {timeout!r}")
    in_use = yield Work(f"asking whether a guest runs {m.uuid}",
                        lambda _p: svc.kernel.in_use(m.uuid))  # fmt: skip
    if in_use != meta.in_use:
        meta.in_use = in_use
        svc.emit(Changes(matrices_changed={m.uuid}))
    if in_use and svc.kernel.features.static:
        raise GuestRunning(
            f"guest running: matrix {m.label} is in use by a guest, and this kernel (before "
            f"6.0) cannot {what} it while the guest runs, even forced; stop the guest first"
        )
    if in_use and not force:
        raise GuestRunning(
            f"guest running: matrix {m.label} is in use by a guest; stop the guest first, or "
            f"{what} with force (the kernel asks the guest to let go, and waits)"
        )
    limit = svc.in_use_timeout
    return min(timeout, limit) if timeout is not None else limit


def _abandoned(svc: Service, uuid: str, what: str, err: Exception) -> None:
    if isinstance(err, KernelTimeout) and uuid in svc.state.meta:
        svc.state.meta[uuid].release_pending = f"forced {what}"


def stop(
    svc: Service, uuid: str, force: bool = False, timeout: float | None = None
) -> Command[None]:
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    meta = st.meta[m.uuid]
    if not meta.live:
        return
    managed(svc, m, "stop")
    wait = yield from _guest_check(svc, m, "stop", force, timeout)
    step = MatrixStep(m.uuid, st.kernel_sets(m.uuid), None, wait)
    try:
        yield from svc.transact(Transaction(f"Stop {m.uuid}", matrices=[step]))
    except KernelTimeout as err:
        _abandoned(svc, m.uuid, "Stop", err)
        raise
    meta.live, meta.guest, meta.in_use = False, (), False
    st.set_truth(m.uuid, None)
    changes = Changes(matrices_changed={m.uuid})
    st.touch_adapters(changes, m.adapters)
    svc.emit(changes)


def remove(
    svc: Service, uuid: str, force: bool = False, timeout: float | None = None
) -> Command[None]:
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    managed(svc, m, "remove")
    st.registry.decide(RemoveMatrix(m.uuid)).raise_if_refused(ORDER)
    meta = st.meta[m.uuid]
    wait = (yield from _guest_check(svc, m, "remove", force, timeout)) if meta.live else None
    tx = Transaction(
        f"Remove {m.uuid}",
        matrices=[MatrixStep(m.uuid, st.kernel_sets(m.uuid), None, wait)] if meta.live else [],
        store={m.uuid: None},
        stored_before={m.uuid: st.on_disk.get(m.uuid)},
        store_first=True,  # an mdev is never re-created: a store failure must come first
    )
    try:
        yield from svc.transact(tx)
    except KernelTimeout as err:
        _abandoned(svc, m.uuid, "Remove", err)
        raise
    st.registry.apply(RemoveMatrix(m.uuid))
    del st.meta[m.uuid]
    st.on_disk.pop(m.uuid, None)
    yield from drop_mdevctl_file(svc, m.uuid)
    changes = Changes(matrices_removed={m.uuid})
    st.touch_adapters(changes, m.adapters)
    svc.emit(changes)


def drop_mdevctl_file(svc: Service, uuid: str) -> Command[None]:
    """A matrix of ours is gone: so is its file in mdevctl's directory (exported or imported),
    or mdevctl would start it again at the next boot. Best effort: the removal stands."""
    if not svc.watch_mdevctl:
        return
    try:
        removed = yield Work(f"removing {uuid} from {svc.mdevctl_dir}",
                             lambda _p: mdevctl.remove_at(svc.mdevctl_dir, uuid))  # fmt: skip
    except OSError as err:
        log.warning("matrix %s removed, but not its mdevctl file: %s", uuid, err.strerror)
        return
    if removed:
        svc.state.mdevctl_seen.pop(uuid, None)
        log.info("removed mdevctl's file of matrix %s (%s/%s)", uuid, svc.mdevctl_dir,
                 mdevctl.PARENT)  # fmt: skip


def set_autostart(svc: Service, uuid: str, autostart: bool) -> Command[None]:
    yield from configure(svc, uuid, autostart=autostart)


def configure(
    svc: Service, uuid: str, name: str | None = None, autostart: bool | None = None
) -> Command[None]:
    """Rename a matrix and/or change its autostart; None leaves that one as it is."""
    st = svc.state
    m = st.registry.get(svc.resolve(uuid))
    managed(svc, m, "configure")
    if name is not None:
        check_name(name)
    new_name = m.name if name is None else name
    new_auto = m.autostart if autostart is None else autostart
    if (new_name, new_auto) == (m.name, m.autostart):
        return
    change = UpdateMatrix(
        m.uuid, m.adapters, m.domains, m.control_domains, name=new_name, autostart=new_auto
    )
    if new_name != m.name:  # a name must stay unique; nothing else can refuse
        st.registry.decide(change).raise_if_refused(ORDER)
    # A flag or a name breaks no APQN rule, even on a definition the kernel's truth clashes
    # with (turning its autostart off may be exactly what the admin wants).
    decision = Decision(change)
    record = st.record(m.uuid, Matrix(m.uuid, m.adapters, m.domains, m.control_domains,
                                      name=new_name, autostart=new_auto))  # fmt: skip
    tx = Transaction(
        f"Configure {m.uuid}",
        store={m.uuid: record},
        stored_before={m.uuid: st.on_disk.get(m.uuid)},
    )
    yield from svc.transact(tx)
    st.registry.apply(change, ORDER, decision)
    stored(svc, m.uuid, record)
    svc.emit(Changes(matrices_changed={m.uuid}))


def stored(svc: Service, uuid: str, record: StoredMatrix) -> None:
    """A change written through us: the matrix is ours."""
    if svc.store is not None:
        svc.state.on_disk[uuid] = record
    meta = svc.state.meta[uuid]
    meta.manager, meta.definition = APMATRIXD, None


# -- start what waits ---------------------------------------------------------------------------
AUTOSTART_BATCH = 128
"""Autostart matrices created in one transaction: one intent journalled and synced, one
worker hand-off for their writes and one for their guest views, instead of one each."""


def start_waiting(svc: Service) -> Command[list[str]]:
    """Start every autostart matrix that is not live and whose APQNs are all present.

    A refusal (its APQNs held in the kernel by a drifted matrix, or by the host) or a kernel
    failure leaves that matrix ``defined`` (logged) and the others go on; one Changes batch.
    They are created :data:`AUTOSTART_BATCH` at a time: starting one changes no decision on
    another (each is decided on its own sets, which the registry holds already), and a batch
    that fails is undone whole and tried one by one, so only the failing ones stay defined.
    """
    st = svc.state
    changes = Changes()
    started: list[str] = []
    if not st.bindings_ready:
        return started  # bindings_complete() starts them
    ready: list[Matrix] = []
    for uuid in sorted(st.registry.matrices):
        m, meta = st.registry.matrices[uuid], st.meta[uuid]
        if meta.manager != APMATRIXD:
            continue  # mdevctl starts its own (at boot, from its udev rule)
        if not m.autostart or meta.live or not all(map(st.present, m.apqns())):
            continue
        refusal = st.registry.decide(
            UpdateMatrix(uuid, m.adapters, m.domains, m.control_domains)
        ).error(ORDER)
        if refusal is not None:
            log.warning("autostart of matrix %s refused: %s", m.label, refusal)
            continue
        ready.append(m)
    # The first mdev tells the generation (ap_config or one write per id): alone, if unknown.
    size = 1 if svc.kernel.features.dynamic is None else AUTOSTART_BATCH
    while ready:
        batch, ready = ready[:size], ready[size:]
        size = AUTOSTART_BATCH
        done = yield from _autostart(svc, batch)
        guests = yield from _read_guests(svc, [m.uuid for m in done])
        for m in done:
            meta = st.meta[m.uuid]
            meta.live, meta.guest = True, guests.get(m.uuid, ())
            started.append(m.uuid)
            changes.matrices_changed.add(m.uuid)
            st.touch_adapters(changes, m.adapters)
    if started:
        n = len(started)
        log.info("started %d autostart matri%s", n, "x" if n == 1 else "ces")
    svc.emit(changes)
    return started


def _autostart(svc: Service, batch: list[Matrix]) -> Command[list[Matrix]]:
    """Create the mdevs of ``batch`` in one transaction; the ones created."""
    one = len(batch) == 1
    what = f"autostart {batch[0].uuid}" if one else f"autostart of {len(batch)} matrices"
    steps = [MatrixStep(m.uuid, None, m) for m in batch]
    try:
        yield from svc.transact(Transaction(what, matrices=steps))
    except ApmatrixError as err:  # the kernel, or the journal (a read-only state dir)
        if one:
            log.warning("autostart of matrix %s failed: %s", batch[0].label, err)
            return []
        log.info("%s failed (%s): undone, one by one now", what, err)
        done: list[Matrix] = []
        for m in batch:
            done += yield from _autostart(svc, [m])
        return done
    return batch


def _read_guests(svc: Service, uuids: list[str]) -> Command[dict[str, tuple[Apqn, ...]]]:
    """The guest views of these live mdevs in one hand-off; one that cannot be read is left
    out (logged, a resync asked for), as :meth:`Service.read_guest` does."""
    if not uuids:
        return {}
    if len(uuids) == 1 or svc.grouping.current is not None:  # a group reads them itself
        out: dict[str, tuple[Apqn, ...]] = {}
        for u in uuids:
            if (guest := (yield from svc.read_guest(u))) is not None:
                out[u] = guest
        return out
    k = svc.kernel

    def read(_p: object) -> tuple[dict[str, tuple[Apqn, ...]], list[str]]:
        out: dict[str, tuple[Apqn, ...]] = {}
        failed: list[str] = []
        for u in uuids:
            try:
                out[u] = tuple(sorted(k.read_guest(u)))
            except KernelError as err:
                failed.append(f"{u}: {err}")
        return out, failed

    guests: dict[str, tuple[Apqn, ...]]
    failed: list[str]
    guests, failed = yield Work(f"reading the guest views of {len(uuids)} matrices", read)
    if failed:
        log.warning("re-reading matrices after a change failed: %s", "; ".join(failed))
        svc.request_resync()
    return guests


def bindings_complete(svc: Service, why: str) -> Command[list[str]]:
    """The AP bus is probed (``BINDINGS=complete``), or the wait for it timed out: autostart."""
    st = svc.state
    if st.bindings_ready:
        return []
    st.bindings_ready = True
    log.info("AP bus bindings %s: starting autostart matrices", why)
    return (yield from start_waiting(svc))


# -- host pool ----------------------------------------------------------------------------------
def reserved_pool(pool: HostPool, a: frozenset[int], d: frozenset[int]) -> HostPool:
    if pool.queues is not None:
        return HostPool(
            queues=frozenset(q for q in pool.queues if q.adapter not in a and q.domain not in d)
        )
    return HostPool(pool.adapters - a, pool.domains - d)


def released_pool(
    infos: dict[int, AdapterInfo], pool: HostPool, a: frozenset[int], d: frozenset[int]
) -> HostPool:
    if pool.queues is not None:
        back = {Apqn(i.id, x) for i in infos.values() for x in i.domains if i.id in a or x in d}
        return HostPool(queues=pool.queues | back)
    return HostPool(pool.adapters | a, pool.domains | d)


def reserve(svc: Service, adapters: Iterable[int], domains: Iterable[int]) -> Command[None]:
    """Take these adapters and domains from the host's drivers, for guests."""
    st = svc.state
    a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
    new = reserved_pool(kernel_pool(svc), a, d)
    yield from set_pool(svc, new, st.reservations.reserve(a, d), "Reserve")


def release(svc: Service, adapters: Iterable[int], domains: Iterable[int]) -> Command[None]:
    """Give these adapters and domains back to the host's drivers."""
    st = svc.state
    a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
    new = released_pool(st.infos, kernel_pool(svc), a, d)
    yield from set_pool(svc, new, st.reservations.release(a, d), "Release")


def kernel_pool(svc: Service) -> HostPool:
    """The host pool as the kernel holds it: a Reserve moves from there, so an admin's edit
    that could not be adopted is neither undone nor merged into by it."""
    reg = svc.state.registry
    return reg.truth_pool if reg.truth_pool is not None else reg.pool


def set_pool(svc: Service, new: HostPool, reservations: Reservations, what: str) -> Command[None]:
    st = svc.state
    reg = st.registry
    change = SetHostPool(new)
    decision = reg.decide(change)
    decision.raise_if_refused(ORDER)
    old = kernel_pool(svc)
    if new == old and decision.noop:
        if reservations != st.reservations:  # the intent is kept even if the masks agree
            tx = Transaction(
                what, reservations=reservations, reservations_before=st.on_disk_reservations
            )
            yield from svc.transact(tx)
            st.reservations = reservations
            if svc.store is not None:
                st.on_disk_reservations = reservations
        return
    known = st.overrides()
    if known:  # 6.19: the kernel would say EINVAL; name the queues instead
        raise DriverOverride(known, f"{what} cannot change apmask/aqmask")
    tx = Transaction(
        what,
        pool=(old, new),
        reservations=reservations,
        reservations_before=st.on_disk_reservations,
    )
    try:
        yield from svc.transact(tx)
    except KernelError as err:
        if err.errno != errno.EINVAL or not svc.kernel.features.driver_override:
            raise
        # An override the inventory cannot show (the host's driver on a queue it holds).
        found = yield Work("reading the queues' driver_override",
                           lambda _p: svc.kernel.read_overrides(st.infos))  # fmt: skip
        if not found:
            raise
        raise DriverOverride(found, f"{what} cannot change apmask/aqmask") from err
    infos, mdevs = yield from reread_after_pool(svc, old, new)
    registry_old = reg.pool
    reg.apply(change, ORDER, decision)
    reg.truth_pool = None
    st.reservations = reservations
    if svc.store is not None:
        st.on_disk_reservations = reservations
    changes = Changes(host_changed=True)
    pool_moved(svc, changes, registry_old, new, infos, mdevs)
    svc.emit(changes)


def pool_moved(
    svc: Service,
    changes: Changes,
    registry_old: HostPool,
    new: HostPool,
    infos: dict[int, AdapterInfo | None] | None,
    mdevs: dict[str, MdevInfo] | None,
) -> None:
    """Commit what :func:`reread_after_pool` read: the cards' views, the guests' views."""
    st = svc.state
    if infos is not None:
        for a, info in infos.items():
            if info is None:
                continue
            st.infos[a] = info
            view = st.adapter_view(info)
            if st.adapters.get(a) != view:
                st.adapters[a] = view
                changes.adapters_changed.add(a)
        st.note_overrides()
        if _touched_by(registry_old, new) is None:  # a whole read: views of every adapter
            changes.adapters_changed |= set(st.adapters)
    if mdevs is not None:
        for u, meta in st.meta.items():
            if meta.live and u in mdevs:
                guest = tuple(sorted(mdevs[u].guest_apqns))
                if guest != meta.guest:
                    meta.guest = guest
                    changes.matrices_changed.add(u)


def reread_after_pool(
    svc: Service, old: HostPool, new: HostPool
) -> Command[tuple[dict[int, AdapterInfo | None] | None, dict[str, MdevInfo] | None]]:
    """The cards whose queues moved and the guest views, best effort."""
    st = svc.state
    touched = _touched_by(old, new)
    known = dict(st.infos)
    kernel = svc.kernel

    def read(_p: object) -> tuple[dict[int, AdapterInfo | None], dict[str, MdevInfo]]:
        if touched is None or len(touched) > 8:  # one card at a time costs a link per queue
            infos: dict[int, AdapterInfo | None] = dict(kernel.read_adapters())
        else:
            infos = {a: kernel.read_adapter(a) for a in sorted(touched & known.keys())}
        fresh = {**known, **{a: i for a, i in infos.items() if i is not None}}
        return infos, kernel.read_mdevs(fresh)

    try:
        got: tuple[dict[int, AdapterInfo | None], dict[str, MdevInfo]]
        got = yield Work("re-reading the host after a host pool change", read)
        return got
    except KernelError as err:
        log.warning("re-reading after a host pool change failed (%s); a resync follows", err)
        svc.request_resync()
        return None, None


def _touched_by(old: HostPool, new: HostPool) -> frozenset[int] | None:
    """The adapters whose queues a pool change can move; None when it may be any."""
    if old.queues is not None and new.queues is not None:
        return frozenset(q.adapter for q in old.queues ^ new.queues)
    if old.domains == new.domains:
        return old.adapters ^ new.adapters
    return None


# -- mdevctl ----------------------------------------------------------------------------------
def import_mdevctl(svc: Service, config_dir: mdevctl.ConfigDir) -> Command[list[str]]:
    """Define every matrix of mdevctl's ``<config_dir>/matrix/<uuid>`` files; all or none.

    ``config_dir``: a path, or a directory descriptor (kept open by the caller until this
    command ends; only the worker touches it).

    The definitions are judged together, against each other and against every matrix
    and the host pool: the first refusal names the file. A UUID that mdevctl manages, or
    a live mdev nobody defined whose kernel sets are the file's, is taken over (stored as
    ours) instead. Imported
    matrices are ``defined``; ``start: auto`` becomes ``autostart``. Returns the UUIDs.
    """
    if isinstance(config_dir, str):
        mdevctl.check_path(config_dir)  # a bad argument is refused before any I/O
    where = mdevctl.describe(config_dir)
    defs = yield Work(f"reading {where}", lambda _p: mdevctl.read_dir(config_dir))
    yield from managers.reload(svc)  # what mdevctl holds now counts, not what it held
    st = svc.state
    scratch = copy.deepcopy(st.registry)
    claims: list[UpdateMatrix] = []
    news: list[Matrix] = []
    for d in defs:
        m = Matrix(d.uuid, d.adapters, d.domains, d.control_domains, autostart=d.autostart)
        have = scratch.matrices.get(d.uuid)
        change: DefineMatrix | UpdateMatrix = DefineMatrix(m)
        if have is not None:
            # One mdevctl manages, or an mdev nobody defined: the import takes it over, with
            # the file's sets (a live one only if the kernel holds the same).
            meta = st.meta[d.uuid]
            live = st.kernel_sets(d.uuid)
            sets = (m.adapters, m.domains, m.control_domains)
            if meta.manager == APMATRIXD or (
                live is not None and (live.adapters, live.domains, live.control_domains) != sets
            ):
                raise AlreadyExists(f"{d.source}: matrix {d.uuid} already exists")
            change = UpdateMatrix(d.uuid, *sets, name=have.name, autostart=d.autostart)
            scratch.clear_truth(d.uuid)  # its own claims are no reason to refuse
        err = scratch.decide(change).error(ORDER)
        if isinstance(err, _ClashError):
            raise type(err)([_owned_by(svc, c) for c in err.clashes], d.source)
        if isinstance(err, OutOfRange):
            raise OutOfRange(err.violations, d.source)
        if err is not None:
            raise type(err)(f"{d.source}: {err}")
        scratch.apply(change, ORDER)
        if isinstance(change, UpdateMatrix):
            claims.append(change)
        else:
            news.append(m)
    records: dict[str, StoredMatrix | None] = {}
    for m in news:
        records[m.uuid] = st.record(m.uuid, m, m.domains <= m.control_domains)
    for c in claims:
        have = st.registry.get(c.uuid)
        cud = st.meta[c.uuid].control_usage_domains
        m = Matrix(c.uuid, c.adapters, c.domains, c.control_domains, have.name, bool(c.autostart))
        records[c.uuid] = st.record(c.uuid, m, cud)
    tx = Transaction(
        f"ImportMdevctl {where}",
        store=records,
        stored_before={u: st.on_disk.get(u) for u in records},
    )
    yield from svc.transact(tx)
    # decided together on the scratch registry, applied without deciding again
    for m in news:
        st.registry.restore(DefineMatrix(m))
        st.meta[m.uuid] = Meta(control_usage_domains=m.domains <= m.control_domains)
    for c in claims:
        st.registry.clear_truth(c.uuid)
        st.registry.restore(c)
        st.meta[c.uuid].truth = None
    for u, rec in records.items():
        assert rec is not None
        stored(svc, u, rec)
    uuids = [d.uuid for d in defs]
    log.info("imported %d mdevctl definition(s) from %s", len(uuids), where)
    changes = Changes(matrices_added={m.uuid for m in news})
    changes.matrices_changed |= {c.uuid for c in claims}
    for m in news:
        st.touch_adapters(changes, m.adapters)
    svc.emit(changes)
    return uuids


def export_mdevctl(svc: Service, config_dir: mdevctl.ConfigDir) -> Command[list[str]]:
    """Write every stored matrix as mdevctl would, to ``<config_dir>/matrix/<uuid>`` (a path
    or a directory descriptor, as for :func:`import_mdevctl`).

    Files of other UUIDs there are left alone. Each file is written crash-safe.
    """
    st = svc.state
    kind = mdevctl.TYPES[0] if st.layout == "upstream" else mdevctl.TYPES[1]
    files: dict[str, bytes] = {}
    for u in sorted(st.registry.matrices):
        if u in st.on_disk:
            m = st.registry.get(u)
            files[u] = mdevctl.format_definition(
                m.adapters, m.domains, m.control_domains, m.autostart, kind
            )
    if isinstance(config_dir, str):
        mdevctl.check_path(config_dir)  # a bad argument is refused before any I/O
    where = mdevctl.describe(config_dir)

    def write(_p: object) -> str:
        try:
            return str(mdevctl.write_dir(config_dir, files))
        except OSError as err:
            raise StoreError(
                f"cannot write mdevctl definitions to {where}/{mdevctl.PARENT}: {err.strerror}"
            ) from err

    base = yield Work(f"writing mdevctl definitions to {where}", write)
    n = len(files)
    log.info("exported %d matri%s to %s", n, "x" if n == 1 else "ces", base)
    return list(files)
