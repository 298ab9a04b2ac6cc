"""The daemon's one state: registry, per-matrix metadata, inventory, host pool, what is stored.

One writer: only a command's commit step (:mod:`apmatrixd.service.executor`) changes it, on
the event loop, after the command's kernel and store I/O is done. Reads (properties,
GetManagedObjects, Check) are served from it at any time and see a change whole or not at
all: a commit step never awaits.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

from apmatrixd.chzdev import BootPool, Stamp
from apmatrixd.core import Apqn, Matrix, Registry
from apmatrixd.kernel import AdapterInfo, MdevInfo
from apmatrixd.kernel.snapshot import LAYOUTS
from apmatrixd.mdevctl import Fingerprint
from apmatrixd.service.views import AdapterView
from apmatrixd.store import Reservations, StoredMatrix


@dataclass
class Changes:
    """What one command changed, so the bus layer sends one signal per object."""

    matrices_added: set[str] = field(default_factory=set)
    matrices_changed: set[str] = field(default_factory=set)
    matrices_removed: set[str] = field(default_factory=set)
    adapters_added: set[int] = field(default_factory=set)
    adapters_changed: set[int] = field(default_factory=set)
    adapters_removed: set[int] = field(default_factory=set)
    host_changed: bool = False
    drift: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, later: Changes) -> None:
        """Add what ``later`` changed (a group sends its members' changes as one)."""
        self.matrices_added |= later.matrices_added
        self.matrices_changed |= later.matrices_changed
        self.matrices_removed |= later.matrices_removed
        self.adapters_added |= later.adapters_added
        self.adapters_changed |= later.adapters_changed
        self.adapters_removed |= later.adapters_removed
        self.host_changed = self.host_changed or later.host_changed
        self.drift += later.drift

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


VFIO_AP = LAYOUTS["upstream"].vfio_driver

DriftKind = Literal[
    "sets", "created", "removed", "started", "host_pool", "while_stopped", "released", "mdevctl"
]
DRIFT_KINDS: tuple[DriftKind, ...] = get_args(DriftKind)
"""The kinds of Drift the daemon tells apart: a live matrix's sets changed outside, an mdev
created outside, one removed outside, a defined matrix found live, the host pool changed
outside, a stored matrix changed while apmatrixd was not running (found at start-up), and the
mdev of a forced Stop/Remove that timed out gone once its guest let go, and an mdevctl
definition that breaks a rule (written while apmatrixd was not guarding)."""


@dataclass
class Statistics:
    """What only the daemon can know, counted since it started (Manager.Statistics, metrics).

    Changed on the event loop only, never from the worker: by a command's commit step (drift,
    rescans) and by the dispatcher as it answers a call with an error (a refusal is counted
    where its reply is made; queuing it as a command would count it late, behind a slow kernel
    write, and let a flood of refused calls grow the queue)."""

    drifts: Counter[str] = field(default_factory=Counter)
    drifts_not_adopted: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # D-Bus error name -> calls
    # Wall clock (time.time()) of the last rescan tick or full re-read; 0: none yet.
    last_rescan: float = 0.0

    def drift(self, kind: DriftKind, adopted: bool = True) -> None:
        self.drifts[kind] += 1
        if not adopted:
            self.drifts_not_adopted[kind] += 1

    def rescanned(self) -> None:
        self.last_rescan = time.time()


APMATRIXD, MDEVCTL, EXTERNAL = "apmatrixd", "mdevctl", "external"
MANAGERS = (APMATRIXD, MDEVCTL, EXTERNAL)
"""Who manages a matrix: its definition is ours (stored), mdevctl's (a file in its directory),
or nobody's (an mdev made by hand, KubeVirt, a CEX DRA driver). Only ours are changed here."""


@dataclass
class Meta:
    """What the daemon knows of a matrix beyond its sets."""

    live: bool = False
    manager: str = APMATRIXD
    # mdevctl's definition of a live mdevctl-managed matrix (the registry holds the kernel's
    # sets while it is live, the definition's once it stops).
    definition: Matrix | None = None
    control_usage_domains: bool = True
    guest: tuple[Apqn, ...] = ()
    # What sysfs holds when it drifted to sets the registry cannot accept: shown in the
    # properties and claimed in every decision (Registry.set_truth), while the registry
    # keeps its last valid sets.
    truth: MdevInfo | None = None
    in_use: bool = False  # a guest runs with it (a queue it gets reads "in use")
    # A forced Stop/Remove gave up waiting for the guest: the kernel removes the mdev when
    # the guest lets go, and the resync that sees it go says so (not "removed outside").
    release_pending: str = ""

    @property
    def adopted(self) -> bool:
        """Found live without a definition (the ``Adopted`` property)."""
        return self.manager == EXTERNAL


@dataclass
class State:
    """Everything the daemon holds; see the module docstring for who may change it."""

    layout: str
    version: str
    registry: Registry = field(default_factory=Registry)
    meta: dict[str, Meta] = field(default_factory=dict)
    # The last read of each card; its ``domains`` are the queues present (one shared set per
    # card, not 65,536 Apqn tuples on a 256 x 256 host), and the Adapter views built from it.
    infos: dict[int, AdapterInfo] = field(default_factory=dict)
    # The cards among them with a queue bound by driver_override (note_overrides, which
    # every change of ``infos`` calls): a change's check looks at those, not every card.
    overridden: frozenset[int] = frozenset()
    adapters: dict[int, AdapterView] = field(default_factory=dict)
    reservations: Reservations = field(default_factory=Reservations)
    on_disk: dict[str, StoredMatrix] = field(default_factory=dict)  # as last written
    # mdevctl's definition files as last looked at (see mdevctl.scan_dir)
    mdevctl_seen: dict[str, Fingerprint] = field(default_factory=dict)
    on_disk_reservations: Reservations = field(default_factory=Reservations)
    settling: bool = False
    pending: str = ""  # what a command has been waiting on for long (Manager.Pending)
    # Autostart waits for the AP bus to report its bindings complete (or for a timeout), so
    # no matrix starts against a half-probed bus (mdevctl #53).
    bindings_ready: bool = True
    stats: Statistics = field(default_factory=Statistics)
    # chzdev's persistent masks as last read (Manager.BootHostPool; service/boot.py), the
    # file's stamp then, and the disagreement with our reservations last signalled.
    boot_pool: BootPool | None = None
    boot_stamp: Stamp | None = None
    boot_drift: str = ""

    # -- a group's way back ------------------------------------------------------------------
    def snapshot(self) -> State:
        """A copy to go back to (:meth:`restore`) if a group of changes cannot be stored.

        Shallow where the values are immutable (views, records, infos), so it costs a copy
        of each container, not of the host."""
        snap = copy.copy(self)
        snap.registry = self.registry.copy()
        snap.meta = {u: copy.copy(m) for u, m in self.meta.items()}
        snap.infos = dict(self.infos)
        snap.adapters = dict(self.adapters)
        snap.on_disk = dict(self.on_disk)
        snap.mdevctl_seen = dict(self.mdevctl_seen)
        snap.stats = copy.deepcopy(self.stats)
        return snap

    def restore(self, snap: State) -> None:
        """Back to ``snap`` in place (readers hold this object, not a copy)."""
        for f in fields(self):
            setattr(self, f.name, getattr(snap, f.name))

    # -- inventory ------------------------------------------------------------------------
    def take_inventory(self, infos: dict[int, AdapterInfo]) -> None:
        self.infos = dict(infos)
        self.note_overrides()
        self.adapters = {a.id: self.adapter_view(a) for a in infos.values()}

    def note_overrides(self) -> None:
        """The registry learns which queues a driver_override gives to vfio_ap (6.19+)."""
        self.registry.vfio_overrides = frozenset(
            (a.id, d) for a in self.infos.values() for d, drv in a.overrides if drv == VFIO_AP
        )
        self.overridden = frozenset(a.id for a in self.infos.values() if a.overrides)

    def overrides(self) -> list[tuple[str, str]]:
        """Every queue bound by driver_override that the inventory shows: (``05.0004``, driver)."""
        return [
            (f"{a:02x}.{d:04x}", drv)
            for a in sorted(self.infos)
            for d, drv in self.infos[a].overrides
        ]

    def present(self, q: Apqn) -> bool:
        """Is this queue on the host (as last read)?"""
        info = self.infos.get(q.adapter)
        return info is not None and q.domain in info.domains

    def adapter_view(self, a: AdapterInfo) -> AdapterView:
        return AdapterView(
            id=a.id,
            type=a.type,
            mode=a.mode,
            online=a.online,
            configured=a.configured,
            domains=tuple(sorted(a.domains)),
            guest_domains=tuple(sorted(a.guest_domains)),
            owners=self.registry.owners_of_adapter(a.id),
            checkstopped=a.checkstopped,
            overrides=a.overrides,
        )

    def touch_adapters(self, changes: Changes, adapters: Iterable[int]) -> None:
        """Refresh the owners of these adapters' views; note the ones that changed."""
        for a in adapters:
            view = self.adapters.get(a)
            if view is None:
                continue
            owners = self.registry.owners_of_adapter(a)
            if owners != view.owners:  # the only field that can differ: compared alone
                self.adapters[a] = replace(view, owners=owners)
                changes.adapters_changed.add(a)

    # -- the kernel's truth -----------------------------------------------------------------
    def kernel_sets(self, uuid: str) -> Matrix | None:
        """What we believe the kernel holds for ``uuid``: None if no mdev is live."""
        meta = self.meta[uuid]
        if not meta.live:
            return None
        if meta.truth is not None:
            return meta.truth.matrix()
        return self.registry.get(uuid)

    def set_truth(self, uuid: str, truth: MdevInfo | None) -> None:
        self.meta[uuid].truth = truth
        if truth is None:
            self.registry.clear_truth(uuid)
        else:
            self.registry.set_truth(uuid, truth.adapters, truth.domains)

    # -- store records ----------------------------------------------------------------------
    def record(self, uuid: str, m: Matrix | None = None, cud: bool | None = None) -> StoredMatrix:
        """The store record of ``uuid`` as it is (or with the sets of ``m``)."""
        m = m if m is not None else self.registry.get(uuid)
        meta = self.meta.get(uuid)
        if cud is None:
            cud = meta.control_usage_domains if meta is not None else True
        return StoredMatrix(
            m.uuid, m.name, m.adapters, m.domains, m.control_domains, m.autostart, cud
        )
