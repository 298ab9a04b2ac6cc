"""The one path every change takes: decide in the registry, apply to the kernel, store, signal.

Every public method is synchronous and runs on the daemon's single asyncio thread, so two
callers can never interleave between a decision and its kernel writes: no APQN can get
two owners by a race. A refused change touches nothing; a kernel refusal half-way through
is undone by the kernel backend and the registry is only updated after the kernel agreed.
With a :class:`~apmatrixd.store.Store`, a change returns (and the D-Bus caller hears of it)
only once it is durable; if the store cannot be written, the kernel and registry changes are
undone and :class:`~apmatrixd.store.StoreError` is raised. Start-up is :meth:`Service.load`.
"""

from __future__ import annotations

import copy
import logging
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from apmatrixd import __version__, mdevctl
from apmatrixd.core import (
    AlreadyExists,
    ApmatrixError,
    Apqn,
    Clash,
    DefineMatrix,
    HostPool,
    InvalidArgument,
    Matrix,
    NotFound,
    Registry,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)
from apmatrixd.core.apqn import cross
from apmatrixd.core.errors import _ClashError
from apmatrixd.core.matrix import id_set, normalize_uuid
from apmatrixd.kernel import AdapterInfo, HostSnapshot, Kernel, KernelError, MdevInfo
from apmatrixd.store import (
    Contents,
    Reservations,
    Store,
    StoredMatrix,
    StoreError,
    atomic_write,
    fsync_dir,
)

log = logging.getLogger(__name__)

Kind = Literal["adapter", "domain", "control_domain"]
KINDS: tuple[Kind, ...] = ("adapter", "domain", "control_domain")

# The kernel interfaces check in different orders; the daemon reports the most basic
# problem first so an admin fixes typos before ownership questions.
ORDER = ("invalid", "not_found", "exists", "range", "host", "conflict", "busy")


@dataclass(frozen=True)
class HostView:
    version: str
    layout: str
    max_adapter_id: int
    max_domain_id: int
    host_adapters: tuple[int, ...]
    host_domains: tuple[int, ...]
    settling: bool = False


@dataclass(frozen=True)
class MatrixView:
    uuid: str
    name: str
    adapters: tuple[int, ...]
    domains: tuple[int, ...]
    control_domains: tuple[int, ...]
    apqns: tuple[Apqn, ...]
    guest_apqns: tuple[Apqn, ...]
    state: str  # defined | active | degraded
    autostart: bool
    adopted: bool
    sysfs_path: str


@dataclass(frozen=True)
class AdapterView:
    id: int
    type: str
    mode: str
    online: bool
    configured: bool
    domains: tuple[int, ...]
    guest_domains: tuple[int, ...]
    owners: dict[int, str]


@dataclass
class Changes:
    """What one operation changed, so the bus layer sends one signal per object."""

    matrices_added: set[str] = field(default_factory=set)
    matrices_changed: set[str] = field(default_factory=set)
    matrices_removed: set[str] = field(default_factory=set)
    adapters_added: set[int] = field(default_factory=set)
    adapters_changed: set[int] = field(default_factory=set)
    adapters_removed: set[int] = field(default_factory=set)
    host_changed: bool = False
    drift: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.matrices_added
            or self.matrices_changed
            or self.matrices_removed
            or self.adapters_added
            or self.adapters_changed
            or self.adapters_removed
            or self.host_changed
            or self.drift
        )


@dataclass
class _Meta:
    """What the daemon knows of a matrix beyond its sets."""

    live: bool = False
    adopted: bool = False
    control_usage_domains: bool = True
    guest: tuple[Apqn, ...] = ()
    # What sysfs holds when it drifted to sets the registry cannot accept (see hotplug.py):
    # shown in the properties, while the registry keeps its last valid sets.
    truth: MdevInfo | None = None


Listener = Callable[[Changes], None]


class Service:
    """The daemon's state and its operations; D-Bus, udev and storage sit around it."""

    def __init__(
        self, kernel: Kernel, version: str = __version__, store: Store | None = None
    ) -> None:
        self.kernel = kernel
        self.version = version
        self.store = store
        self._on_disk: dict[str, StoredMatrix] = {}  # what the store holds, as last written
        self._reservations = Reservations()
        self._on_disk_reservations = Reservations()
        self.registry = Registry()
        self._meta: dict[str, _Meta] = {}
        self._adapters: dict[int, AdapterView] = {}
        self._listeners: list[Listener] = []
        self._layout = kernel.layout
        # The last read of each card (hotplug.py); its ``domains`` are the queues present,
        # one shared set per card, not 65,536 Apqn tuples on a 256 x 256 host.
        self._infos: dict[int, AdapterInfo] = {}
        self.settling = False

    # -- start-up -----------------------------------------------------------------------
    def load(self) -> None:
        """Start-up: registry from the kernel and the store; reservations, autostart.

        In this order: (1) every live mdev enters the registry (a stored UUID is that
        matrix; an unknown one is adopted, and stored only once changed through us); (2) the
        stored reservations are applied to the host pool (after a reboot the masks are back at
        their boot values); (3) every stored definition: a live one that differs from its file
        (a call interrupted by a crash) is taken back to the stored definition, the others
        enter as ``defined``; a definition that clashes with a live mdev stays on disk but is
        not loaded (logged); (4) every autostart matrix whose APQNs are all present is started
        (:meth:`start_waiting` starts the rest when hot-plug brings them). The registry
        the kernel cannot see (1) must come first: nothing can be decided without it.
        """
        snap = self.kernel.read_host()
        self.registry = Registry(limits=snap.limits, pool=snap.pool)
        self._meta.clear()
        contents = self.store.load() if self.store is not None else Contents()
        self._on_disk = dict(contents.matrices)
        self._reservations = self._on_disk_reservations = contents.reservations
        self._take_inventory(snap)
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
            problems = self.registry.decide(DefineMatrix(m)).error(ORDER)
            if problems is not None:
                log.warning("adopting %s although it breaks a rule: %s", m.uuid, problems)
            self.registry.restore(DefineMatrix(m))
            self._meta[m.uuid] = _Meta(
                live=True,
                adopted=sm is None,
                control_usage_domains=sm.control_usage_domains
                if sm
                else m.domains <= m.control_domains,
                guest=tuple(sorted(mdev.guest_apqns)),
            )
        written = self._restore_pool(contents.matrices.values())
        for sm in sorted(contents.matrices.values(), key=lambda m: m.uuid):
            written |= self._load_stored(sm)
        if written:  # the guest views and the inventory follow the host pool
            snap = self.kernel.read_host()
            self._take_inventory(snap)
            for uuid, meta in self._meta.items():
                if meta.live and uuid in snap.mdevs:
                    meta.guest = tuple(sorted(snap.mdevs[uuid].guest_apqns))
        self.start_waiting()

    def _restore_pool(self, stored: Iterable[StoredMatrix]) -> bool:
        r = self._reservations
        pool = self.registry.pool
        reserved = self._reserved_pool(pool, r.reserved_adapters, r.reserved_domains)
        target = self._released_pool(reserved, r.released_adapters, r.released_domains)
        if target.queues is not None:
            # Queue by queue, Reserve and Release do not commute (Release(domain) gives back
            # queues of reserved adapters); the net record cannot tell the order, so a queue a
            # stored matrix holds is never given back (it was not when that was stored).
            held = {q for sm in stored for q in cross(sm.adapters, sm.domains)}
            target = HostPool(queues=target.queues - held)
        for new in (target, reserved):
            change = SetHostPool(new)
            decision = self.registry.decide(change)
            if decision.noop:
                return False
            if not decision.accepted:
                log.warning("stored reservations: %s", decision.error(ORDER))
                continue
            try:
                self.kernel.set_pool(pool, new)
            except KernelError as err:
                log.error("stored reservations not applied: %s", err)
                continue
            self.registry.apply(change, ORDER, decision)
            log.info("stored reservations applied: host pool %s", self._pool_text(new))
            return True
        return False

    def _pool_text(self, pool: HostPool) -> str:
        if pool.queues is not None:
            return f"{len(pool.queues)} queues"
        return f"adapters {sorted(pool.adapters)} x domains {sorted(pool.domains)}"

    def _load_stored(self, sm: StoredMatrix) -> bool:
        """Enter one stored definition; True if the kernel was written."""
        want = Matrix(
            sm.uuid,
            sm.adapters,
            sm.domains,
            sm.control_domains,
            name=sm.name,
            autostart=sm.autostart,
        )
        live = self.registry.matrices.get(sm.uuid)
        if live is None:
            err = self.registry.decide(DefineMatrix(want)).error(ORDER)
            if err is not None:
                log.error("stored matrix %s not loaded (its file is kept): %s", sm.uuid, err)
                return False
            self.registry.apply(DefineMatrix(want), ORDER)
            self._meta[sm.uuid] = _Meta(control_usage_domains=sm.control_usage_domains)
            return False
        if live == want:
            return False
        # Live but not as stored: a change that never returned to its caller. Undo it.
        change = UpdateMatrix(
            sm.uuid, sm.adapters, sm.domains, sm.control_domains, sm.name, sm.autostart
        )
        err = self.registry.decide(change).error(ORDER)
        try:
            if err is not None:
                raise err
            self.kernel.apply_matrix(sm.uuid, live, want)
        except ApmatrixError as why:
            log.warning(
                "matrix %s is live but differs from its stored definition: %s", sm.uuid, why
            )
            return False
        self.registry.apply(change, ORDER)
        self._meta[sm.uuid].guest = self._guest(sm.uuid)
        log.info("matrix %s taken back to its stored definition (an interrupted change)", sm.uuid)
        return True

    def start_waiting(self) -> list[str]:
        """Start every autostart matrix that is not live and whose APQNs are all present.

        Called at start-up and by the hot-plug path once it has refreshed the inventory
        (``_take_inventory``). Returns the UUIDs started; one Changes batch is emitted.
        A kernel refusal leaves that matrix ``defined`` (logged) and the others go on.
        """
        changes = Changes()
        started: list[str] = []
        for uuid in sorted(self.registry.matrices):
            m, meta = self.registry.matrices[uuid], self._meta[uuid]
            if not m.autostart or meta.live or not all(map(self._present, m.apqns())):
                continue
            try:
                self.kernel.apply_matrix(uuid, None, m)
            except KernelError as err:
                log.warning("autostart of matrix %s failed: %s", m.label, err)
                continue
            meta.live, meta.guest = True, self._guest(uuid)
            started.append(uuid)
            changes.matrices_changed.add(uuid)
            self._touch_adapters(changes, m.adapters)
        if started:
            log.info(
                "started %d autostart matri%s", len(started), "x" if len(started) == 1 else "ces"
            )
        self._emit(changes)
        return started

    def _take_inventory(self, snap: HostSnapshot) -> None:
        self._adapters = {a.id: self._adapter_view(a) for a in snap.adapters.values()}
        self._infos = dict(snap.adapters)

    def _present(self, q: Apqn) -> bool:
        """Is this queue on the host (as last read)?"""
        info = self._infos.get(q.adapter)
        return info is not None and q.domain in info.domains

    def _owners_of(self, adapter: int) -> dict[int, str]:
        return self.registry.owners_of_adapter(adapter)

    def _adapter_view(self, a: AdapterInfo) -> AdapterView:
        return AdapterView(
            id=a.id,
            type=a.type,
            mode=a.mode,
            online=a.online,
            configured=a.configured,
            domains=tuple(sorted(a.domains)),
            guest_domains=tuple(sorted(a.guest_domains)),
            owners=self._owners_of(a.id),
        )

    # -- listeners ------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, changes: Changes) -> None:
        if not changes:
            return
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # a broken listener must not undo a done change
                log.exception("change listener failed")

    # -- views ----------------------------------------------------------------------------
    @property
    def host(self) -> HostView:
        pool = self.registry.pool
        if pool.queues is not None:
            adapters = frozenset(q.adapter for q in pool.queues)
            domains = frozenset(q.domain for q in pool.queues)
        else:
            adapters, domains = pool.adapters, pool.domains
        return HostView(
            version=self.version,
            layout=self._layout,
            max_adapter_id=self.registry.limits.max_adapter,
            max_domain_id=self.registry.limits.max_domain,
            host_adapters=tuple(sorted(adapters)),
            host_domains=tuple(sorted(domains)),
            settling=self.settling,
        )

    def matrices(self) -> list[MatrixView]:
        return [self.matrix(u) for u in sorted(self.registry.matrices)]

    def matrix(self, uuid: str) -> MatrixView:
        m = self.registry.get(self._uuid(uuid))
        meta = self._meta[m.uuid]
        sets = meta.truth.matrix() if meta.truth is not None and meta.live else m
        apqns = tuple(sets.apqns())
        if not meta.live:
            state = "defined"
        elif set(meta.guest) >= set(apqns):
            state = "active"
        else:
            state = "degraded"
        return MatrixView(
            uuid=m.uuid,
            name=m.name,
            adapters=tuple(sorted(sets.adapters)),
            domains=tuple(sorted(sets.domains)),
            control_domains=tuple(sorted(sets.control_domains)),
            apqns=apqns,
            guest_apqns=meta.guest if meta.live else (),
            state=state,
            autostart=m.autostart,
            adopted=meta.adopted,
            sysfs_path=self.kernel.mdev_sysfs_path(m.uuid),
        )

    def adapters(self) -> list[AdapterView]:
        return [self._adapters[i] for i in sorted(self._adapters)]

    def adapter(self, id: int) -> AdapterView:
        try:
            return self._adapters[id]
        except KeyError:
            raise NotFound(f"no adapter {id:#04x} on this host") from None

    def set_settling(self, settling: bool) -> None:
        """The Manager's ``Settling``: true while a burst of uevents is being absorbed."""
        if settling != self.settling:
            self.settling = settling
            self._emit(Changes(host_changed=True))

    # -- matrix operations ----------------------------------------------------------------
    def create_matrix(
        self,
        uuid: str = "",
        *,
        adapters: Iterable[int] = (),
        domains: Iterable[int] = (),
        control_domains: Iterable[int] = (),
        name: str = "",
        autostart: bool = False,
        start: bool = True,
        control_usage_domains: bool = True,
    ) -> MatrixView:
        uuid = normalize_uuid(uuid) if uuid else str(uuidlib.uuid4())
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        c = id_set(control_domains, "control domain")
        if control_usage_domains:
            c |= d
        if not isinstance(name, str) or len(name) > 255 or "\n" in name:
            raise InvalidArgument("name must be one line of at most 255 characters")
        m = Matrix(uuid, a, d, c, name=name, autostart=autostart)
        define = DefineMatrix(m)
        decision = self.registry.decide(define)
        decision.raise_if_refused(ORDER)
        guest: tuple[Apqn, ...] = ()
        if start:
            self.kernel.apply_matrix(uuid, None, m)
            guest = self._guest(uuid)
        self.registry.apply(define, ORDER, decision)
        self._meta[uuid] = _Meta(
            live=start, control_usage_domains=control_usage_domains, guest=guest
        )

        def undo() -> None:
            self.registry.restore(RemoveMatrix(uuid))
            del self._meta[uuid]
            if start:
                self._kernel_undo(uuid, m, None)

        self._durable(undo, write=[uuid])
        changes = Changes(matrices_added={uuid})
        self._touch_adapters(changes, a)
        self._emit(changes)
        return self.matrix(uuid)

    def assign(self, uuid: str, kind: Kind, id: int) -> None:
        self._change_one(uuid, kind, id, add=True)

    def unassign(self, uuid: str, kind: Kind, id: int) -> None:
        self._change_one(uuid, kind, id, add=False)

    def _change_one(self, uuid: str, kind: Kind, id: int, *, add: bool) -> None:
        if kind not in KINDS:
            raise InvalidArgument(f"unknown kind {kind!r}")
        m = self.registry.get(self._uuid(uuid))
        meta = self._meta[m.uuid]
        (one,) = id_set([id], kind.replace("_", " "))
        sets = {"adapter": set(m.adapters), "domain": set(m.domains)}
        sets["control_domain"] = set(m.control_domains)
        targets = [kind]
        if kind == "domain" and meta.control_usage_domains:
            targets.append("control_domain")
        for t in targets:
            if add:
                sets[t].add(one)
            else:
                sets[t].discard(one)
        self._update(m, sets["adapter"], sets["domain"], sets["control_domain"])

    def update(
        self,
        uuid: str,
        adapters: Iterable[int],
        domains: Iterable[int],
        control_domains: Iterable[int],
    ) -> None:
        m = self.registry.get(self._uuid(uuid))
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        c = id_set(control_domains, "control domain")
        if self._meta[m.uuid].control_usage_domains:
            c |= d
        self._update(m, a, d, c)

    def _update(self, m: Matrix, a: Iterable[int], d: Iterable[int], c: Iterable[int]) -> None:
        change = UpdateMatrix(m.uuid, frozenset(a), frozenset(d), frozenset(c))
        decision = self.registry.decide(change)
        decision.raise_if_refused(ORDER)
        if decision.noop:
            return
        new = m.with_sets(change.adapters, change.domains, change.control_domains)
        meta = self._meta[m.uuid]
        before = replace(meta)
        if meta.live:
            self.kernel.apply_matrix(m.uuid, m, new)
        back = self.registry.apply(change, ORDER, decision)
        if meta.live:
            meta.guest = self._guest(m.uuid)

        def undo() -> None:
            self.registry.restore(back)
            self._meta[m.uuid] = before
            if before.live:
                self._kernel_undo(m.uuid, new, m)

        self._durable(undo, write=[m.uuid])
        changes = Changes(matrices_changed={m.uuid})
        # An adapter's owners change only if it came or went, or if the domains changed:
        # refreshing all of a 100-adapter matrix per AssignAdapter grew with the matrix.
        # (Adopted overlapping matrices change nothing here: an update keeping a shared APQN
        # whose index entry names the other matrix is refused as a Conflict.)
        same = m.domains == new.domains
        self._touch_adapters(
            changes, m.adapters ^ new.adapters if same else m.adapters | new.adapters
        )
        self._emit(changes)

    def start(self, uuid: str) -> None:
        m = self.registry.get(self._uuid(uuid))
        meta = self._meta[m.uuid]
        if meta.live:
            return
        self.kernel.apply_matrix(m.uuid, None, m)
        meta.live, meta.guest = True, self._guest(m.uuid)
        changes = Changes(matrices_changed={m.uuid})
        self._touch_adapters(changes, m.adapters)
        self._emit(changes)

    def stop(self, uuid: str) -> None:
        m = self.registry.get(self._uuid(uuid))
        meta = self._meta[m.uuid]
        if not meta.live:
            return
        self.kernel.apply_matrix(m.uuid, m, None)
        meta.live, meta.guest = False, ()
        changes = Changes(matrices_changed={m.uuid})
        self._touch_adapters(changes, m.adapters)
        self._emit(changes)

    def remove(self, uuid: str) -> None:
        m = self.registry.get(self._uuid(uuid))
        self.registry.decide(RemoveMatrix(m.uuid)).raise_if_refused(ORDER)
        meta = self._meta[m.uuid]
        if meta.live:
            self.kernel.apply_matrix(m.uuid, m, None)
        self.registry.apply(RemoveMatrix(m.uuid))
        del self._meta[m.uuid]

        def undo() -> None:
            self.registry.restore(DefineMatrix(m))
            self._meta[m.uuid] = meta
            if meta.live:
                self._kernel_undo(m.uuid, None, m)
                meta.guest = self._guest(m.uuid)

        self._durable(undo, remove=[m.uuid])
        changes = Changes(matrices_removed={m.uuid})
        self._touch_adapters(changes, m.adapters)
        self._emit(changes)

    def set_autostart(self, uuid: str, autostart: bool) -> None:
        m = self.registry.get(self._uuid(uuid))
        if m.autostart == autostart:
            return
        change = UpdateMatrix(m.uuid, m.adapters, m.domains, m.control_domains, autostart=autostart)
        back = self.registry.apply(change, ORDER)
        meta = self._meta[m.uuid]
        adopted = meta.adopted

        def undo() -> None:
            self.registry.restore(back)
            meta.adopted = adopted

        self._durable(undo, write=[m.uuid])
        self._emit(Changes(matrices_changed={m.uuid}))

    def check(self, adapters: Iterable[int], domains: Iterable[int], uuid: str = "") -> list[Clash]:
        """Every APQN of adapters x domains that someone else holds (a dry run)."""
        host, held = self.registry.clashes(*self._check_args(adapters, domains, uuid))
        return sorted(host + held)

    def check_rows(
        self, adapters: Iterable[int], domains: Iterable[int], uuid: str = ""
    ) -> list[tuple[int, int, str]]:
        """:meth:`check` as the Check method answers it, (adapter, domain, owner) rows: one
        tuple per APQN and no more, as a whole-host query has 65,536 (issue #8 item 5)."""
        return self.registry.clash_rows(*self._check_args(adapters, domains, uuid))

    def _check_args(
        self, adapters: Iterable[int], domains: Iterable[int], uuid: str
    ) -> tuple[frozenset[int], frozenset[int], str | None]:
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        exclude = self._uuid(uuid) if uuid else None
        if exclude is not None:
            self.registry.get(exclude)
        return a, d, exclude

    # -- host pool ------------------------------------------------------------------------
    def reserve(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        """Take these adapters and domains from the host's drivers, for guests."""
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        new = self._reserved_pool(self.registry.pool, a, d)
        self._set_pool(new, self._reservations.reserve(a, d))

    def release(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        """Give these adapters and domains back to the host's drivers."""
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        new = self._released_pool(self.registry.pool, a, d)
        self._set_pool(new, self._reservations.release(a, d))

    @staticmethod
    def _reserved_pool(pool: HostPool, a: frozenset[int], d: frozenset[int]) -> HostPool:
        if pool.queues is not None:
            return HostPool(
                queues=frozenset(q for q in pool.queues if q.adapter not in a and q.domain not in d)
            )
        return HostPool(pool.adapters - a, pool.domains - d)

    def _released_pool(self, pool: HostPool, a: frozenset[int], d: frozenset[int]) -> HostPool:
        if pool.queues is not None:
            back = {
                Apqn(i.id, x)
                for i in self._infos.values()
                for x in i.domains
                if i.id in a or x in d
            }
            return HostPool(queues=pool.queues | back)
        return HostPool(pool.adapters | a, pool.domains | d)

    def _set_pool(self, new: HostPool, reservations: Reservations) -> None:
        change = SetHostPool(new)
        decision = self.registry.decide(change)
        decision.raise_if_refused(ORDER)
        old_reservations = self._reservations
        if decision.noop:
            if reservations != old_reservations:  # the intent is kept even if the masks agree
                self._reservations = reservations

                def forget() -> None:
                    self._reservations = old_reservations

                self._durable(forget, reservations=True)
            return
        old = self.registry.pool
        self.kernel.set_pool(old, new)
        self.registry.apply(change, ORDER, decision)
        self._reservations = reservations

        def undo() -> None:
            self._reservations = old_reservations
            self.registry.restore(SetHostPool(old))
            try:
                self.kernel.set_pool(new, old)
            except KernelError as err:
                log.error("undo failed, sysfs may now differ from the registry: %s", err)

        self._durable(undo, reservations=True)
        changes = Changes(host_changed=True)
        touched = self._touched_by(old, new)
        if touched is None or len(touched) > 8:  # one card at a time costs a link per queue
            self._take_inventory(self.kernel.read_host())
            changes.adapters_changed |= set(self._adapters)
        else:
            # Only these cards' queues moved: re-read them, not a whole 256 x 256 host.
            for a in sorted(touched & self._infos.keys()):
                info = self.kernel.read_adapter(a)
                if info is not None:
                    self._infos[a] = info
                    self._adapters[a] = self._adapter_view(info)
                    changes.adapters_changed.add(a)
        mdevs = self.kernel.read_mdevs(self._infos)
        for u, meta in self._meta.items():
            if meta.live and u in mdevs:
                guest = tuple(sorted(mdevs[u].guest_apqns))
                if guest != meta.guest:
                    meta.guest = guest
                    changes.matrices_changed.add(u)
        self._emit(changes)

    @staticmethod
    def _touched_by(old: HostPool, new: HostPool) -> frozenset[int] | None:
        """The adapters whose queues a pool change can move; None when it may be any."""
        if old.queues is not None and new.queues is not None:
            return frozenset(q.adapter for q in old.queues ^ new.queues)
        if old.domains == new.domains:
            return old.adapters ^ new.adapters
        return None

    # -- mdevctl ---------------------------------------------------------------------------
    def import_mdevctl(self, config_dir: str) -> list[str]:
        """Define every matrix of mdevctl's ``<config_dir>/matrix/<uuid>`` files; all or none.

        The definitions are judged together, against each other and against every matrix
        and the host pool: the first refusal names the file. A UUID that is live here only
        because it was adopted, with the same sets, becomes ours (stored) instead. Imported
        matrices are ``defined``; ``start: auto`` becomes ``autostart``. Returns the UUIDs.
        """
        defs = mdevctl.read_dir(config_dir)
        scratch = copy.deepcopy(self.registry)
        claims: list[mdevctl.Definition] = []
        news: list[Matrix] = []
        for d in defs:
            m = Matrix(d.uuid, d.adapters, d.domains, d.control_domains, autostart=d.autostart)
            have = scratch.matrices.get(d.uuid)
            if have is not None:
                meta = self._meta.get(d.uuid)
                same = (have.adapters, have.domains, have.control_domains) == (
                    m.adapters,
                    m.domains,
                    m.control_domains,
                )
                if meta is not None and meta.adopted and d.uuid not in self._on_disk and same:
                    claims.append(d)
                    continue
                raise AlreadyExists(f"{d.source}: matrix {d.uuid} already exists")
            err = scratch.decide(DefineMatrix(m)).error(ORDER)
            if isinstance(err, _ClashError):
                raise type(err)(err.clashes, d.source)
            if err is not None:
                raise type(err)(f"{d.source}: {err}")
            scratch.apply(DefineMatrix(m), ORDER)
            news.append(m)
        backs = []
        for m in news:
            backs.append(self.registry.apply(DefineMatrix(m), ORDER))
            self._meta[m.uuid] = _Meta(control_usage_domains=m.domains <= m.control_domains)
        for d in claims:
            have = self.registry.get(d.uuid)
            change = UpdateMatrix(
                d.uuid, have.adapters, have.domains, have.control_domains, autostart=d.autostart
            )
            backs.append(self.registry.apply(change, ORDER))

        def undo() -> None:
            for back in reversed(backs):
                self.registry.restore(back)
            for m in news:
                del self._meta[m.uuid]

        uuids = [d.uuid for d in defs]
        self._durable(undo, write=uuids)
        log.info("imported %d mdevctl definition(s) from %s", len(uuids), config_dir)
        changes = Changes(matrices_added={m.uuid for m in news})
        changes.matrices_changed |= {d.uuid for d in claims}
        for m in news:
            self._touch_adapters(changes, m.adapters)
        self._emit(changes)
        return uuids

    def export_mdevctl(self, config_dir: str) -> list[str]:
        """Write every stored matrix as mdevctl would, to ``<config_dir>/matrix/<uuid>``.

        Files of other UUIDs there are left alone. Each file is written crash-safe.
        """
        base = mdevctl.definitions_dir(config_dir)
        kind = mdevctl.TYPES[0] if self._layout == "upstream" else mdevctl.TYPES[1]
        uuids = [u for u in sorted(self.registry.matrices) if u in self._on_disk]
        try:
            if not base.is_dir():
                base.mkdir(mode=0o755)
                fsync_dir(base.parent)
            for u in uuids:
                m = self.registry.get(u)
                data = mdevctl.format_definition(
                    m.adapters, m.domains, m.control_domains, m.autostart, kind
                )
                atomic_write(base / u, data)
        except OSError as err:
            raise StoreError(f"cannot write mdevctl definitions to {base}: {err.strerror}") from err
        log.info("exported %d matri%s to %s", len(uuids), "x" if len(uuids) == 1 else "ces", base)
        return uuids

    # -- durability -------------------------------------------------------------------------
    def _record(self, uuid: str) -> StoredMatrix:
        m, meta = self.registry.get(uuid), self._meta[uuid]
        return StoredMatrix(
            m.uuid,
            m.name,
            m.adapters,
            m.domains,
            m.control_domains,
            m.autostart,
            meta.control_usage_domains,
        )

    def _durable(
        self,
        undo: Callable[[], None],
        *,
        write: Iterable[str] = (),
        remove: Iterable[str] = (),
        reservations: bool = False,
    ) -> None:
        """Make the change just applied durable, or undo it and raise StoreError."""
        write, remove = list(write), list(remove)
        if self.store is not None:
            self._write_store(self.store, undo, write, remove, reservations)
        for uuid in write:
            self._meta[uuid].adopted = False  # stored: ours from now on

    def _write_store(
        self,
        store: Store,
        undo: Callable[[], None],
        write: list[str],
        remove: list[str],
        reservations: bool,
    ) -> None:
        done: list[tuple[str, StoredMatrix | None]] = []
        old_res = self._on_disk_reservations if reservations else None
        try:
            for uuid in write:
                record = self._record(uuid)
                if self._on_disk.get(uuid) != record:
                    done.append((uuid, self._on_disk.get(uuid)))
                    store.write_matrix(record)
                    self._on_disk[uuid] = record
            for uuid in remove:
                done.append((uuid, self._on_disk.get(uuid)))
                store.remove_matrix(uuid)
                self._on_disk.pop(uuid, None)
            if reservations:
                store.write_reservations(self._reservations)
                self._on_disk_reservations = self._reservations
        except StoreError as err:
            log.error("%s; undoing the change", err)
            for uuid, was in reversed(done):  # best effort: the store as it was
                try:
                    if was is None:
                        store.remove_matrix(uuid)
                        self._on_disk.pop(uuid, None)
                    else:
                        store.write_matrix(was)
                        self._on_disk[uuid] = was
                except StoreError as again:
                    log.error("could not restore the stored %s: %s", uuid, again)
            if old_res is not None:
                try:
                    store.write_reservations(old_res)
                    self._on_disk_reservations = old_res
                except StoreError as again:
                    log.error("could not restore the stored reservations: %s", again)
            undo()
            raise

    def _kernel_undo(self, uuid: str, old: Matrix | None, new: Matrix | None) -> None:
        try:
            self.kernel.apply_matrix(uuid, old, new)
        except KernelError as err:
            log.error("undo failed, sysfs may now differ from the registry: %s", err)

    # -- helpers --------------------------------------------------------------------------
    def _uuid(self, uuid: str) -> str:
        try:
            return normalize_uuid(uuid)
        except InvalidArgument:
            # Lookup by name is a courtesy to admins; objects are keyed by UUID.
            m = self.registry.by_name(uuid)
            if m is None:
                raise
            return m.uuid

    def _guest(self, uuid: str) -> tuple[Apqn, ...]:
        return tuple(sorted(self.kernel.read_guest(uuid)))

    def _touch_adapters(self, changes: Changes, adapters: Iterable[int]) -> None:
        for a in adapters:
            view = self._adapters.get(a)
            if view is None:
                continue
            fresh = replace(view, owners=self._owners_of(a))
            if fresh != view:
                self._adapters[a] = fresh
                changes.adapters_changed.add(a)
