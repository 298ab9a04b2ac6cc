"""The one path every change takes: decide in the registry, apply to the kernel, signal.

Every public method is synchronous and runs on the daemon's single asyncio thread, so two
callers can never interleave between a decision and its kernel writes: no APQN can get
two owners by a race. A refused change touches nothing; a kernel refusal half-way through
is undone by the kernel backend and the registry is only updated after the kernel agreed.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from apmatrixd import __version__
from apmatrixd.core import (
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
from apmatrixd.core.matrix import id_set, normalize_uuid
from apmatrixd.kernel import AdapterInfo, HostSnapshot, Kernel

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


Listener = Callable[[Changes], None]


class Service:
    """The daemon's state and its operations; D-Bus, udev and storage sit around it."""

    def __init__(self, kernel: Kernel, version: str = __version__) -> None:
        self.kernel = kernel
        self.version = version
        self.registry = Registry()
        self._meta: dict[str, _Meta] = {}
        self._adapters: dict[int, AdapterView] = {}
        self._listeners: list[Listener] = []
        self._layout = kernel.layout
        self._queues: frozenset[Apqn] = frozenset()
        self.settling = False

    # -- start-up -----------------------------------------------------------------------
    def load(self) -> None:
        """Build the registry from what the kernel holds now; live mdevs are adopted."""
        snap = self.kernel.read_host()
        self.registry = Registry(limits=snap.limits, pool=snap.pool)
        self._meta.clear()
        for mdev in sorted(snap.mdevs.values(), key=lambda m: m.uuid):
            m = Matrix(
                mdev.uuid,
                frozenset(mdev.adapters),
                frozenset(mdev.domains),
                frozenset(mdev.control_domains),
            )
            problems = self.registry.decide(DefineMatrix(m)).error(ORDER)
            if problems is not None:
                log.warning("adopting %s although it breaks a rule: %s", m.uuid, problems)
            self.registry.restore(DefineMatrix(m))
            usage_as_control = m.domains <= m.control_domains
            self._meta[m.uuid] = _Meta(
                live=True,
                adopted=True,
                control_usage_domains=usage_as_control,
                guest=tuple(sorted(mdev.guest_apqns)),
            )
        self._take_inventory(snap)

    def _take_inventory(self, snap: HostSnapshot) -> None:
        self._queues = frozenset(Apqn(a.id, d) for a in snap.adapters.values() for d in a.domains)
        self._adapters = {a.id: self._adapter_view(a) for a in snap.adapters.values()}

    def _owners_of(self, adapter: int) -> dict[int, str]:
        owners = self.registry.owners()
        return {d: owner for d in range(256) if (owner := owners.get(Apqn(adapter, d))) is not None}

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
        apqns = tuple(m.apqns())
        if not meta.live:
            state = "defined"
        elif set(meta.guest) >= set(apqns):
            state = "active"
        else:
            state = "degraded"
        return MatrixView(
            uuid=m.uuid,
            name=m.name,
            adapters=tuple(sorted(m.adapters)),
            domains=tuple(sorted(m.domains)),
            control_domains=tuple(sorted(m.control_domains)),
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
        self.registry.decide(DefineMatrix(m)).raise_if_refused(ORDER)
        guest: tuple[Apqn, ...] = ()
        if start:
            self.kernel.apply_matrix(uuid, None, m)
            guest = self._guest(uuid)
        self.registry.apply(DefineMatrix(m), ORDER)
        self._meta[uuid] = _Meta(
            live=start, control_usage_domains=control_usage_domains, guest=guest
        )
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
        if meta.live:
            self.kernel.apply_matrix(m.uuid, m, new)
        self.registry.apply(change, ORDER)
        if meta.live:
            meta.guest = self._guest(m.uuid)
        changes = Changes(matrices_changed={m.uuid})
        self._touch_adapters(changes, m.adapters | new.adapters)
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
        if self._meta[m.uuid].live:
            self.kernel.apply_matrix(m.uuid, m, None)
        self.registry.apply(RemoveMatrix(m.uuid))
        del self._meta[m.uuid]
        changes = Changes(matrices_removed={m.uuid})
        self._touch_adapters(changes, m.adapters)
        self._emit(changes)

    def set_autostart(self, uuid: str, autostart: bool) -> None:
        m = self.registry.get(self._uuid(uuid))
        if m.autostart == autostart:
            return
        change = UpdateMatrix(m.uuid, m.adapters, m.domains, m.control_domains, autostart=autostart)
        self.registry.apply(change, ORDER)
        self._emit(Changes(matrices_changed={m.uuid}))

    def check(self, adapters: Iterable[int], domains: Iterable[int], uuid: str = "") -> list[Clash]:
        """Every APQN of adapters x domains that someone else holds (a dry run)."""
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        exclude = self._uuid(uuid) if uuid else None
        if exclude is not None:
            self.registry.get(exclude)
        host, held = self.registry.clashes(a, d, exclude)
        return sorted(host + held)

    # -- host pool ------------------------------------------------------------------------
    def reserve(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        """Take these adapters and domains from the host's drivers, for guests."""
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        pool = self.registry.pool
        if pool.queues is not None:
            new = HostPool(
                queues=frozenset(q for q in pool.queues if q.adapter not in a and q.domain not in d)
            )
        else:
            new = HostPool(pool.adapters - a, pool.domains - d)
        self._set_pool(new)

    def release(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        """Give these adapters and domains back to the host's drivers."""
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        pool = self.registry.pool
        if pool.queues is not None:
            back = {q for q in self._queues if q.adapter in a or q.domain in d}
            new = HostPool(queues=pool.queues | back)
        else:
            new = HostPool(pool.adapters | a, pool.domains | d)
        self._set_pool(new)

    def _set_pool(self, new: HostPool) -> None:
        change = SetHostPool(new)
        decision = self.registry.decide(change)
        decision.raise_if_refused(ORDER)
        if decision.noop:
            return
        self.kernel.set_pool(self.registry.pool, new)
        self.registry.apply(change, ORDER)
        snap = self.kernel.read_host()
        changes = Changes(host_changed=True)
        self._take_inventory(snap)
        changes.adapters_changed |= set(self._adapters)
        for u, meta in self._meta.items():
            if meta.live and u in snap.mdevs:
                guest = tuple(sorted(snap.mdevs[u].guest_apqns))
                if guest != meta.guest:
                    meta.guest = guest
                    changes.matrices_changed.add(u)
        self._emit(changes)

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
        return tuple(sorted(self.kernel.read_mdev(uuid).guest_apqns))

    def _touch_adapters(self, changes: Changes, adapters: Iterable[int]) -> None:
        for a in adapters:
            view = self._adapters.get(a)
            if view is None:
                continue
            fresh = replace(view, owners=self._owners_of(a))
            if fresh != view:
                self._adapters[a] = fresh
                changes.adapters_changed.add(a)
