"""The registry: every matrix (defined or live), the host pool, and who owns each APQN.

One function, :meth:`Registry.decide`, judges a proposed change against the kernel's own
rules and nothing looser:

- no APQN in two matrices (kernel: EADDRINUSE);
- no APQN of a matrix in the host pool (kernel: EADDRNOTAVAIL);
- ids within the host's limits (kernel: ENODEV);
- the host pool may not take back an APQN a matrix holds (kernel: EBUSY), judged as the
  6.19+ kernels do (``release_all_ones``): a newly set adapter bit counts against every
  domain of the matrices that hold the adapter (and likewise for domains); on older kernels
  only the APQNs the new pool would really take (6.0-6.18 refuse exactly those; before 6.0
  the kernel refuses nothing, and the registry keeps the rule);
- control domains may be shared.

Beyond the kernel, a matrix that is only defined (not live) keeps its APQNs too, so every
definition can always start.

The kernel's truth counts as well. A live matrix whose mdev was changed behind the daemon's
back to sets the registry could not accept keeps its registry sets, and the APQNs its mdev
holds beyond them are *claims* (:meth:`Registry.set_truth`); a host pool the kernel holds but
the registry could not adopt is the *truth pool*. Every decision counts both, so no change is
refused by the kernel for a reason the registry could have named.

An owner index (APQN -> matrix) and a per-adapter one (adapter -> matrices) make a
decision cost follow the matrices it touches: the same with ten matrices as with ten
thousand, and a query of the whole host no dearer than its answer. A matrix whose whole
cross product a decision found free stays marked while nothing can have given one of its
APQNs to anyone else (:attr:`Registry._sound`): deciding its next update judges only the
APQNs the update adds, with the answer the whole product would give.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain, product, repeat
from types import MappingProxyType
from typing import Any, cast

from apmatrixd.core.apqn import MAX_ID, Apqn
from apmatrixd.core.errors import (
    HOST,
    AlreadyExists,
    ApmatrixError,
    Busy,
    Clash,
    Conflict,
    HostOwned,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RangeViolation,
)
from apmatrixd.core.matrix import HostPool, Limits, Matrix

_new_apqn = partial(tuple.__new__, Apqn)
_new_clash = partial(tuple.__new__, Clash)


def _ids(ids: Iterable[int]) -> frozenset[int]:
    return ids if isinstance(ids, frozenset) else frozenset(ids)


@dataclass(frozen=True)
class DefineMatrix:
    matrix: Matrix


@dataclass(frozen=True)
class UpdateMatrix:
    """Replace a matrix's sets (and optionally its name or autostart) atomically."""

    uuid: str
    adapters: frozenset[int]
    domains: frozenset[int]
    control_domains: frozenset[int]
    name: str | None = None
    autostart: bool | None = None


@dataclass(frozen=True)
class RemoveMatrix:
    uuid: str


@dataclass(frozen=True)
class SetHostPool:
    pool: HostPool


Change = DefineMatrix | UpdateMatrix | RemoveMatrix | SetHostPool


@dataclass(frozen=True)
class Decision:
    """Everything wrong with a change, so each caller can report in its own order."""

    change: Change
    invalid: str = ""
    not_found: str = ""
    exists: str = ""
    out_of_range: tuple[RangeViolation, ...] = ()
    host: tuple[Clash, ...] = ()  # matrix APQNs that would sit in the host pool
    conflicts: tuple[Clash, ...] = ()  # APQNs held by another matrix
    busy: tuple[Clash, ...] = ()  # the host pool taking back matrix APQNs
    noop: bool = False
    # Set by the registry when it judged the sets' whole cross product (itself, or by what
    # they gain on a sound matrix): the pools it judged against (Registry._sound). None for
    # a decision made up by a caller (a flag change, which judges no APQN).
    basis: tuple[object, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def accepted(self) -> bool:
        return not (
            self.invalid
            or self.not_found
            or self.exists
            or self.out_of_range
            or self.host
            or self.conflicts
            or self.busy
        )

    def error(self, order: Iterable[str] = ()) -> ApmatrixError | None:
        """The refusal to raise, checking problems in ``order`` (default: most basic first).

        Kernel interfaces differ in which check comes first (``assign_adapter`` checks the
        range first, ``ap_config`` last), so the caller says which order it speaks for.
        """
        if self.accepted:  # the usual answer: no refusal built to find there is none
            return None
        clashes = [*self.host, *self.conflicts]
        makers: dict[str, ApmatrixError | None] = {
            "invalid": InvalidArgument(self.invalid) if self.invalid else None,
            "not_found": NotFound(self.not_found) if self.not_found else None,
            "exists": AlreadyExists(self.exists) if self.exists else None,
            "range": OutOfRange(list(self.out_of_range)) if self.out_of_range else None,
            "host": HostOwned(clashes) if self.host else None,
            "conflict": Conflict(clashes) if self.conflicts else None,
            "busy": Busy(list(self.busy)) if self.busy else None,
        }
        for key in [*order, *makers]:
            err = makers.get(key)
            if err is not None:
                return err
        return None

    def raise_if_refused(self, order: Iterable[str] = ()) -> None:
        err = self.error(order)
        if err is not None:
            raise err


@dataclass
class Registry:
    """The authoritative picture of matrices and the host pool (no I/O)."""

    limits: Limits = field(default_factory=Limits)
    pool: HostPool = field(default_factory=HostPool)
    _matrices: dict[str, Matrix] = field(default_factory=dict)
    _owner: dict[Apqn, str] = field(default_factory=dict)
    _by_adapter: dict[int, set[str]] = field(default_factory=dict)
    _by_domain: dict[int, set[str]] = field(default_factory=dict)
    # name -> UUIDs holding it, in insertion order (one, unless restored past the rules)
    _by_name: dict[str, dict[str, None]] = field(default_factory=dict)
    # The kernel's truth where it differs from the registry and could not be adopted.
    _claims: dict[tuple[int, int], str] = field(default_factory=dict)
    _claimed_by: dict[str, frozenset[tuple[int, int]]] = field(default_factory=dict)
    truth_pool: HostPool | None = None
    release_all_ones: bool = True  # the 6.19 in_use rule (False: 6.0-6.18 and older)
    # 6.19+: queues a driver_override gives to vfio_ap: not the host's, whatever the masks.
    vfio_overrides: frozenset[tuple[int, int]] = frozenset()
    # Matrices whose whole cross product a decision found free (no host pool, no other
    # owner, no claim) when it was applied, with the pools it was judged against
    # (:meth:`_basis`). While those pools stand, the APQNs are still its alone: anything
    # that could give one of them to someone else (another matrix's insert over it, a
    # claim) drops the mark. A decision on a marked matrix judges only what it gains.
    _sound: dict[str, tuple[object, ...]] = field(default_factory=dict, compare=False)

    def copy(self) -> Registry:
        """An independent copy (a group of changes keeps one to go back to): the matrices
        and pools are immutable, so only the containers are copied."""
        return replace(
            self,
            _matrices=dict(self._matrices),
            _owner=dict(self._owner),
            _by_adapter={k: set(v) for k, v in self._by_adapter.items()},
            _by_domain={k: set(v) for k, v in self._by_domain.items()},
            _by_name={k: dict(v) for k, v in self._by_name.items()},
            _claims=dict(self._claims),
            _claimed_by=dict(self._claimed_by),
            _sound=dict(self._sound),
        )

    # -- queries --------------------------------------------------------------------------
    @property
    def matrices(self) -> Mapping[str, Matrix]:
        return MappingProxyType(self._matrices)

    def get(self, uuid: str) -> Matrix:
        try:
            return self._matrices[uuid]
        except KeyError:
            raise NotFound(f"no matrix {uuid}") from None

    def owner(self, apqn: Apqn) -> str | None:
        """The matrix UUID holding ``apqn``, ``host`` if the host pool has it, else None."""
        held = self._owner.get(apqn)
        if held is not None:
            return held
        return HOST if self.pool.owns(apqn) else None

    def owners(self) -> Mapping[Apqn, str]:
        return MappingProxyType(self._owner)

    def owners_of_adapter(self, adapter: int) -> dict[int, str]:
        """{domain: matrix UUID} for every APQN of ``adapter`` a matrix holds.

        From the per-adapter index: only the matrices holding the adapter are looked at.
        """
        out: dict[int, str] = {}
        for uuid in self._by_adapter.get(adapter, ()):
            for d in self._matrices[uuid].domains:
                owner = self._owner.get(Apqn(adapter, d))
                if owner is not None:
                    out[d] = owner
        return dict(sorted(out.items()))

    def by_name(self, name: str) -> Matrix | None:
        """From an index: a scan per stored definition made loading 10,000 of them O(n^2)."""
        holders = self._by_name.get(name) if name else None
        return self._matrices[next(iter(holders))] if holders else None

    # -- the kernel's truth -------------------------------------------------------------
    def set_truth(self, uuid: str, adapters: Iterable[int], domains: Iterable[int]) -> None:
        """The mdev of ``uuid`` holds adapters x domains in the kernel: what its registry
        sets lack is claimed for it in every decision (until :meth:`clear_truth`)."""
        self.clear_truth(uuid)
        m = self.get(uuid)
        extra = frozenset(
            (a, d) for a in adapters for d in domains if a not in m.adapters or d not in m.domains
        )
        if extra:
            self._sound.clear()  # a claim may fall on any matrix's APQNs
            self._claimed_by[uuid] = extra
            for q in extra:
                self._claims.setdefault(q, uuid)

    def clear_truth(self, uuid: str) -> None:
        claimed = self._claimed_by.pop(uuid, ())
        if claimed:
            self._sound.clear()  # a claim held behind this one may now count
        for q in claimed:
            if self._claims.get(q) == uuid:
                del self._claims[q]
                for other, qs in self._claimed_by.items():  # rare: two claims of one APQN
                    if q in qs:
                        self._claims[q] = other
                        break

    def claims(self) -> Mapping[tuple[int, int], str]:
        """APQN -> the live matrix whose mdev holds it beyond its registry sets."""
        return MappingProxyType(self._claims)

    def owns_in_host(self, apqn: Apqn) -> bool:
        """The host pool has ``apqn``, in the registry or in the kernel's truth."""
        truth = self.truth_pool
        if (apqn[0], apqn[1]) in self.vfio_overrides:
            return False
        return self.pool.owns(apqn) or (truth is not None and truth.owns(apqn))

    def clashes(
        self, adapters: Iterable[int], domains: Iterable[int], exclude: str | None = None
    ) -> tuple[list[Clash], list[Clash]]:
        """(host clashes, matrix clashes) for a matrix of these sets, ignoring ``exclude``.

        Both in APQN order; the ids are taken as sets. The cost follows the owners involved,
        not the cross product (65,536 APQNs for a whole 256 x 256 host): for each matrix
        holding an asked adapter, its clash is (its adapters & asked) x (its domains & asked);
        the host pool's is (its adapters & asked) x (its domains & asked), or its queues in
        the asked cross product. Each matrix APQN found is confirmed in the owner index, so
        the answer is the index's, APQN by APQN, even for a registry that breaks a rule.
        """
        want_a, want_d = _ids(adapters), _ids(domains)
        if not want_a or not want_d:
            return [], []
        # Built in C (tuple.__new__ is what a named tuple's __new__ calls): a whole-host
        # query has 65,536 of them.
        host_apqns = map(_new_apqn, self._host_pairs(want_a, want_d))
        host = list(map(_new_clash, zip(host_apqns, repeat(HOST), repeat(""), strict=False)))
        held = [
            Clash(Apqn(a, d), uuid, name)
            for a, d, uuid, name in self._held(want_a, want_d, exclude)
        ]
        return host, held

    def clash_rows(
        self, adapters: Iterable[int], domains: Iterable[int], exclude: str | None = None
    ) -> list[tuple[int, int, str]]:
        """What :meth:`clashes` finds, host and matrices together, as Check answers it:
        ``(adapter, domain, owner)`` rows in order.

        One tuple per APQN and nothing more: a whole-host query answers 65,536 of them, and
        building a Clash and an Apqn for each, then a row from those, cost more than sending.
        """
        want_a, want_d = _ids(adapters), _ids(domains)
        if not want_a or not want_d:
            return []
        rows: list[tuple[int, int, str]] = list(self._host_pairs(want_a, want_d, HOST))
        rows += [(a, d, uuid) for a, d, uuid, _ in self._held(want_a, want_d, exclude)]
        rows.sort()  # two sorted runs: a merge; the order of sorted(Clash), as no owner repeats
        return rows

    def _host_pairs(
        self, want_a: frozenset[int], want_d: frozenset[int], *tail: str
    ) -> Iterable[tuple[Any, ...]]:
        """The asked APQNs the host pool holds, as (adapter, domain, *tail) in order.

        For the masks, all built by itertools.product in C. A truth pool adds its own.
        """
        mine = self._pool_pairs(self.pool, want_a, want_d, *tail)
        if self.truth_pool is not None:
            more = self._pool_pairs(self.truth_pool, want_a, want_d, *tail)
            mine = sorted(set(mine) | set(more))
        if self.vfio_overrides:
            exempt = self.vfio_overrides
            mine = [p for p in mine if (p[0], p[1]) not in exempt]
        return mine

    @staticmethod
    def _pool_pairs(
        pool: HostPool, want_a: frozenset[int], want_d: frozenset[int], *tail: str
    ) -> Iterable[tuple[Any, ...]]:
        if pool.queues is None:
            pool_a, pool_d = sorted(want_a & pool.adapters), sorted(want_d & pool.domains)
            return product(pool_a, pool_d, *((t,) for t in tail))
        queues = pool.queues
        found: list[tuple[int, int]]
        if len(queues) <= len(want_a) * len(want_d):
            found = sorted(q for q in queues if q[0] in want_a and q[1] in want_d)
        else:
            found = [q for q in product(sorted(want_a), sorted(want_d)) if q in queues]
        return [(a, d, *tail) for a, d in found]

    def _held(
        self, want_a: frozenset[int], want_d: frozenset[int], exclude: str | None
    ) -> list[tuple[int, int, str, str]]:
        """(adapter, domain, owner, owner's name) of the asked APQNs other matrices hold, in
        order: by the owner index, from whichever side is smaller, the asked APQNs of the
        adapters some matrix holds or the matrices holding an asked adapter."""
        held = self._held_indexed(want_a, want_d, exclude)
        if not self._claims:
            return held
        matrices = self._matrices
        more = {
            (a, d, u, matrices[u].name)
            for (a, d), u in self._claims.items()
            if u != exclude and a in want_a and d in want_d
        }
        return sorted(set(held) | more) if more else held

    def _held_indexed(
        self, want_a: frozenset[int], want_d: frozenset[int], exclude: str | None
    ) -> list[tuple[int, int, str, str]]:
        by_adapter = self._by_adapter
        adapters = want_a & by_adapter.keys()
        visits = sum(len(by_adapter[a]) for a in adapters)
        if len(adapters) * len(want_d) <= visits:
            return self._held_by_apqn(adapters, want_d, exclude)
        held: list[tuple[int, int, str, str]] = []
        owner_of = self._pairs().get
        doms: dict[str, tuple[frozenset[int], str]] = {}  # per matrix: asked domains, name
        for a in adapters:
            for uuid in by_adapter[a]:
                if uuid == exclude:
                    continue
                mine = doms.get(uuid)
                if mine is None:
                    m = self._matrices[uuid]
                    mine = doms[uuid] = (m.domains & want_d, m.name)
                for d in mine[0]:
                    if owner_of((a, d)) == uuid:  # the index's owner: one per APQN
                        held.append((a, d, uuid, mine[1]))
        held.sort()
        return held

    def _pairs(self) -> dict[tuple[int, int], str]:
        """The owner index probed with plain (adapter, domain) pairs: an Apqn is a tuple (same
        hash, equal), and building one per probe was most of a small Check."""
        return cast("dict[tuple[int, int], str]", self._owner)

    def _held_by_apqn(
        self, adapters: Iterable[int], want_d: frozenset[int], exclude: str | None
    ) -> list[tuple[int, int, str, str]]:
        """:meth:`_held` for a small query: look each asked APQN up."""
        held: list[tuple[int, int, str, str]] = []
        owner_of, matrices = self._pairs().get, self._matrices
        doms = sorted(want_d)
        for a in sorted(adapters):
            for d in doms:
                owner = owner_of((a, d))
                if owner is not None and owner != exclude:
                    held.append((a, d, owner, matrices[owner].name))
        return held

    # -- deciding -------------------------------------------------------------------------
    def decide(self, change: Change) -> Decision:
        if isinstance(change, DefineMatrix):
            return self._decide_define(change)
        if isinstance(change, UpdateMatrix):
            return self._decide_update(change)
        if isinstance(change, RemoveMatrix):
            if change.uuid not in self._matrices:
                return Decision(change, not_found=f"no matrix {change.uuid}")
            return Decision(change)
        return self._decide_pool(change)

    def _name_taken(self, name: str, uuid: str) -> bool:
        other = self.by_name(name) if name else None
        return other is not None and other.uuid != uuid

    def _decide_sets(
        self,
        change: Change,
        uuid: str,
        adapters: frozenset[int],
        domains: frozenset[int],
        control_domains: frozenset[int],
        noop: bool = False,
    ) -> Decision:
        for what, ids in (
            ("adapter", adapters),
            ("domain", domains),
            ("control domain", control_domains),
        ):
            if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0):
                continue  # the usual answer, in C: these sets are whole matrices'
            bad = [i for i in ids if type(i) is not int or i < 0]
            if bad:
                why = f"{what} id must be a number >= 0, not {bad[0]!r}"
                return Decision(change, invalid=why, noop=noop)
        lim = self.limits
        rng = (
            lim.violations(adapters, domains, control_domains)
            if max(adapters, default=0) > lim.max_adapter
            or max(domains, default=0) > lim.max_domain
            or max(control_domains, default=0) > lim.max_domain
            else []
        )
        old = self._matrices.get(uuid) if isinstance(change, UpdateMatrix) else None
        if old is not None and self._sound.get(uuid) == self._basis():
            # What it keeps, (its adapters & new) x (its domains & new), is its alone (see
            # _sound): the answer for the whole cross product is the answer for what it
            # gains, (new adapters) x domains and kept adapters x (new domains).
            host, held = self.clashes(adapters - old.adapters, domains, uuid)
            gained_d = domains - old.domains
            if gained_d:  # else no kept APQN is new: the common change of one adapter
                more_host, more_held = self.clashes(adapters & old.adapters, gained_d, uuid)
                host += more_host
                held += more_held
        else:
            # The whole cross product, as the kernel checks it: an adopted matrix that
            # already breaks a rule must not get more on the strength of its older APQNs.
            host, held = self.clashes(adapters, domains, uuid)
        return Decision(
            change,
            out_of_range=tuple(rng),
            host=tuple(sorted(host)),
            conflicts=tuple(sorted(held)),
            noop=noop,
            basis=self._basis(),
        )

    def _basis(self) -> tuple[object, ...]:
        """What a matrix's soundness was judged against besides the owner index (the pools
        are immutable values, replaced whole: compared by identity first)."""
        return (self.pool, self.truth_pool, self.vfio_overrides)

    def _decide_define(self, change: DefineMatrix) -> Decision:
        m = change.matrix
        if m.uuid in self._matrices:
            return Decision(change, exists=f"matrix {m.uuid} already exists")
        if self._name_taken(m.name, m.uuid):
            return Decision(change, exists=f"a matrix named {m.name!r} already exists")
        return self._decide_sets(change, m.uuid, m.adapters, m.domains, m.control_domains)

    def _decide_update(self, change: UpdateMatrix) -> Decision:
        base = self._matrices.get(change.uuid)
        if base is None:
            return Decision(change, not_found=f"no matrix {change.uuid}")
        if change.name is not None and self._name_taken(change.name, change.uuid):
            return Decision(change, exists=f"a matrix named {change.name!r} already exists")
        same = (
            change.adapters == base.adapters
            and change.domains == base.domains
            and change.control_domains == base.control_domains
            and change.name in (None, base.name)
            and change.autostart in (None, base.autostart)
        )
        return self._decide_sets(
            change, change.uuid, change.adapters, change.domains, change.control_domains, same
        )

    def _decide_pool(self, change: SetHostPool) -> Decision:
        new, old = change.pool, self.pool
        if not isinstance(new, HostPool):
            return Decision(change, invalid="not a host pool")
        for ids in (new.adapters, new.domains):
            if any(type(i) is not int or not 0 <= i <= MAX_ID for i in ids):
                return Decision(change, invalid="host pool ids must be within 0..255")
        if new.per_queue != old.per_queue:
            return Decision(change, invalid="the host pool cannot change between masks and queues")
        busy: list[Clash] = []
        if new.queues is not None and old.queues is not None:
            for apqn in sorted(new.queues - old.queues):
                owner = self._owner.get(apqn)
                if owner is not None:
                    busy.append(Clash(apqn, owner, self._matrices[owner].name))
        else:
            seen: dict[Apqn, str] = {}  # -> a matrix holding it
            every = self.release_all_ones  # else only what the new pool would own
            for a in sorted(new.adapters - old.adapters):
                for uuid in sorted(self._by_adapter.get(a, ())):
                    m = self._matrices[uuid]
                    for d in m.domains:
                        if every or d in new.domains:
                            seen.setdefault(Apqn(a, d), uuid)
            for d in sorted(new.domains - old.domains):
                for uuid in sorted(self._by_domain.get(d, ())):
                    m = self._matrices[uuid]
                    for a in m.adapters:
                        if every or a in new.adapters:
                            seen.setdefault(Apqn(a, d), uuid)
            # The index's owner; one it lost track of (matrices restored over one another,
            # one of them removed since) is named by its holder, not a KeyError.
            owners = [(q, self._owner.get(q, h)) for q, h in seen.items()]
            busy = [Clash(q, u, self._matrices[u].name) for q, u in owners]
        for (a, d), uuid in self._claims.items():  # held in the kernel: it would say EBUSY
            q = Apqn(a, d)
            if new.owns(q) and not old.owns(q) and q not in self._owner:
                busy.append(Clash(q, uuid, self._matrices[uuid].name))
        return Decision(change, busy=tuple(sorted(busy)), noop=new == old)

    # -- applying -------------------------------------------------------------------------
    def apply(
        self, change: Change, order: Iterable[str] = (), decided: Decision | None = None
    ) -> Change:
        """Decide, then carry out an accepted change; returns the change that undoes it.

        ``decided``: this very change's decision, taken on the registry as it still is (the
        caller checked before writing the kernel): not taken twice, as a whole-host one costs
        tens of ms.
        """
        decision = decided if decided is not None and decided.change is change else None
        if decision is None:
            decision = self.decide(change)
        decision.raise_if_refused(order)
        undo = self._apply(change)
        if decision.basis is not None:  # accepted: its whole cross product was free, now its own
            if isinstance(change, UpdateMatrix):
                self._sound[change.uuid] = decision.basis
            elif isinstance(change, DefineMatrix):
                self._sound[change.matrix.uuid] = decision.basis
        return undo

    def _apply(self, change: Change) -> Change:
        # Unchecked until apply() says otherwise (restore() puts back what was valid once,
        # with no decision).
        if isinstance(change, DefineMatrix):
            self._insert(change.matrix)
            return RemoveMatrix(change.matrix.uuid)
        if isinstance(change, RemoveMatrix):
            old = self._matrices[change.uuid]
            self._drop(old)
            self.clear_truth(old.uuid)
            return DefineMatrix(old)
        if isinstance(change, UpdateMatrix):
            old = self._matrices[change.uuid]
            new = old.with_sets(change.adapters, change.domains, change.control_domains)
            if change.name is not None or change.autostart is not None:
                new = replace(
                    new,
                    name=old.name if change.name is None else change.name,
                    autostart=old.autostart if change.autostart is None else change.autostart,
                )
            self._replace(old, new, self._sound.pop(old.uuid, None) is not None)
            return UpdateMatrix(
                old.uuid, old.adapters, old.domains, old.control_domains, old.name, old.autostart
            )
        old_pool = self.pool
        self.pool = change.pool
        return SetHostPool(old_pool)

    def restore(self, undo: Change) -> None:
        """Put back what an applied change replaced, with no checks (it was valid before)."""
        self._apply(undo)

    def _insert(self, m: Matrix) -> None:
        self._sound.pop(m.uuid, None)
        self._matrices[m.uuid] = m
        owner, uuid = self._owner, m.uuid
        for apqn in m.apqns():
            self._take(owner.get(apqn), uuid)
            owner[apqn] = uuid
        for a in m.adapters:
            self._by_adapter.setdefault(a, set()).add(m.uuid)
        for d in m.domains:
            self._by_domain.setdefault(d, set()).add(m.uuid)
        if m.name:
            self._by_name.setdefault(m.name, {})[m.uuid] = None

    def _replace(self, old: Matrix, new: Matrix, sound: bool = False) -> None:
        """``_drop(old)`` then ``_insert(new)`` of one matrix, touching only the APQNs and ids
        that differ: a matrix of 100 adapters given one more is 4 APQNs of work, not 200
        (``sound``: ``old`` was marked in :attr:`_sound`, all its APQNs are its own)."""
        uuid = new.uuid
        del self._matrices[uuid]
        self._matrices[uuid] = new
        owner, pairs = self._owner, self._pairs()
        # Each difference taken once (a set operation on 100 adapters is ~2 us), the adapters
        # both hold only where the domains changed or the kept APQNs are to be re-owned.
        lost_a, got_a = old.adapters - new.adapters, new.adapters - old.adapters
        lost_d, got_d = old.domains - new.domains, new.domains - old.domains
        kept_a = old.adapters & new.adapters if lost_d or got_d or not sound else frozenset()
        for p in chain(product(lost_a, old.domains), product(kept_a, lost_d)):
            if pairs.get(p) == uuid:
                del pairs[p]
        if not sound:  # else its own already (unless adopted past the rules)
            for p in product(kept_a, old.domains & new.domains):
                held = pairs.get(p)
                if held != uuid:
                    self._take(held, uuid)
                    owner[Apqn(*p)] = uuid
        for a, d in chain(product(got_a, new.domains), product(kept_a, got_d)):
            p = (a, d)
            self._take(pairs.get(p), uuid)
            owner[Apqn(a, d)] = uuid
        for index, lost, got in (
            (self._by_adapter, lost_a, got_a),
            (self._by_domain, lost_d, got_d),
        ):
            self._unindex(index, lost, uuid)
            for i in got:
                index.setdefault(i, set()).add(uuid)
        self._unname(old)
        if new.name:
            self._by_name.setdefault(new.name, {})[uuid] = None

    def _take(self, held: str | None, uuid: str) -> None:
        """``uuid`` takes an APQN ``held`` by another matrix (past the rules): that one no
        longer has all its APQNs to itself."""
        if held is not None and held != uuid:
            self._sound.pop(held, None)

    def _drop(self, m: Matrix) -> None:
        self._sound.pop(m.uuid, None)
        del self._matrices[m.uuid]
        for apqn in m.apqns():
            if self._owner.get(apqn) == m.uuid:
                del self._owner[apqn]
        for index, ids in ((self._by_adapter, m.adapters), (self._by_domain, m.domains)):
            self._unindex(index, ids, m.uuid)
        self._unname(m)

    @staticmethod
    def _unindex(index: dict[int, set[str]], ids: Iterable[int], uuid: str) -> None:
        for i in ids:
            holders = index.get(i)
            if holders is not None:
                holders.discard(uuid)
                if not holders:
                    del index[i]

    def _unname(self, m: Matrix) -> None:
        named = self._by_name.get(m.name) if m.name else None
        if named is not None:
            named.pop(m.uuid, None)
            if not named:
                del self._by_name[m.name]

    # -- invariants (for tests and self-checks) ---------------------------------------------
    def violations(self) -> list[str]:
        """Every broken invariant, as text; an empty list means the registry is sound."""
        out: list[str] = []
        seen: dict[Apqn, str] = {}
        for m in self._matrices.values():
            for apqn in m.apqns():
                if apqn in seen:
                    out.append(f"{apqn} in {seen[apqn]} and {m.uuid}")
                seen[apqn] = m.uuid
                if self.pool.owns(apqn):
                    out.append(f"{apqn} of {m.uuid} is in the host pool")
        if seen != self._owner:
            out.append("owner index out of step")
        by_adapter: dict[int, set[str]] = {}
        by_domain: dict[int, set[str]] = {}
        for m in self._matrices.values():
            for index, ids in ((by_adapter, m.adapters), (by_domain, m.domains)):
                for i in ids:
                    index.setdefault(i, set()).add(m.uuid)
        if by_adapter != self._by_adapter:
            out.append("adapter index out of step")
        if by_domain != self._by_domain:
            out.append("domain index out of step")
        names: dict[str, dict[str, None]] = {}
        for m in self._matrices.values():
            if m.name:
                names.setdefault(m.name, {})[m.uuid] = None
        out += [f"name {n!r} held by {', '.join(u)}" for n, u in names.items() if len(u) > 1]
        if {n: set(u) for n, u in names.items()} != {n: set(u) for n, u in self._by_name.items()}:
            out.append("name index out of step")
        basis = self._basis()
        for uuid, judged in self._sound.items():
            marked = self._matrices.get(uuid)
            if marked is None:
                out.append(f"{uuid} marked sound but gone")
                continue
            for apqn in marked.apqns():
                if self._owner.get(apqn) != uuid:
                    out.append(f"{apqn} of {uuid}, marked sound, owned by {self._owner.get(apqn)}")
                elif judged == basis and (
                    self.owns_in_host(apqn) or self._claims.get((apqn[0], apqn[1]), uuid) != uuid
                ):
                    out.append(f"{apqn} of {uuid}, marked sound, is the host's or claimed")
        return out


def unavailable_before_60(
    old: Matrix | None, new: Matrix, bound: Mapping[int, frozenset[int]]
) -> list[str]:
    """What a kernel before 6.0 would refuse (EADDRNOTAVAIL) in taking a live mdev from
    ``old`` to ``new``: each id it assigns needs its queues bound to vfio_ap (``bound``:
    adapter -> domains bound), checked against the other mask as it stands at that write
    (unassigns first, then adapters, then domains; with the other mask empty, one bound queue
    of the id is enough). Empty when nothing is missing."""
    old_a = old.adapters if old is not None else frozenset()
    old_d = old.domains if old is not None else frozenset()
    missing: list[str] = []
    current_d = old_d & new.domains
    for a in sorted(new.adapters - old_a):
        have = bound.get(a, frozenset())
        if not current_d:
            if not have:
                missing.append(f"adapter {a:02x} (no queue bound to vfio_ap)")
        else:
            missing += [f"{Apqn(a, d)}" for d in sorted(current_d - have)]
    for d in sorted(new.domains - old_d):
        if not new.adapters:
            if not any(d in doms for doms in bound.values()):
                missing.append(f"domain {d:04x} (no queue bound to vfio_ap)")
        else:
            missing += [f"{Apqn(a, d)}" for a in sorted(new.adapters) if d not in bound.get(a, ())]
    return missing
