"""The three kinds of exported object: the Manager, one Matrix per matrix, one Adapter per card.

Thin on purpose: each method authorises (via :func:`call`), unpacks D-Bus values, and queues
its change as a command on the service (reads are answered at once). The command decides,
writes the kernel and the store, and reports what changed; the
:class:`~apmatrixd.bus.tree.ObjectTree` turns those reports into signals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from dbus_fast import Variant

from apmatrixd import libvirt
from apmatrixd.bus import names
from apmatrixd.bus.base import Exported, Sig, call, live_prop, prop, signal
from apmatrixd.core import InvalidArgument
from apmatrixd.service import apply, managers, ops
from apmatrixd.service.state import DRIFT_KINDS, Statistics

if TYPE_CHECKING:
    from apmatrixd.auth import Authority
    from apmatrixd.service import AdapterView, HostView, MatrixView, Service
    from apmatrixd.service.apply import Applied

Str = Annotated[str, Sig("s")]
Path = Annotated[str, Sig("o")]
U32 = Annotated[int, Sig("u")]
Fd = Annotated[int, Sig("h")]
Ids = Annotated[list[int], Sig("au")]
Paths = Annotated[list[str], Sig("ao")]
Options = Annotated[dict[str, Variant], Sig("a{sv}")]
Clashes = Annotated[list[tuple[int, int, str]], Sig("a(uus)")]
TwoStr = Annotated[tuple[str, str], Sig("ss")]

OPTIONS: dict[str, str] = {
    "adapters": "au",
    "domains": "au",
    "control_domains": "au",
    "name": "s",
    "autostart": "b",
    "start": "b",
    "control_usage_domains": "b",
}
"""CreateMatrix options and the variant signature each must have."""


def _ids(ids: Iterable[int]) -> list[int]:
    return sorted(ids)


def _pairs(apqns: Iterable[tuple[int, int]]) -> list[list[int]]:
    return [[a, d] for a, d in sorted(apqns)]


def manager_values(host: HostView) -> dict[str, Any]:
    return {
        "Version": host.version,
        "Layout": host.layout,
        "MaxAdapterId": host.max_adapter_id,
        "MaxDomainId": host.max_domain_id,
        "HostAdapters": _ids(host.host_adapters),
        "HostDomains": _ids(host.host_domains),
        "Settling": bool(host.settling),
        "Pending": host.pending,
        "KernelGeneration": host.kernel_generation,
        "KernelFeatures": list(host.kernel_features),
        "BootHostPool": boot_host_pool(host),
    }


def statistics_value(stats: Statistics) -> dict[str, Variant]:
    """Manager.Statistics: every drift kind (0 included), refusals by error name, the time of
    the last rescan in microseconds since the epoch (0: none yet)."""

    def by_kind(counts: Mapping[str, int]) -> Variant:
        return Variant("a{st}", {k: counts.get(k, 0) for k in DRIFT_KINDS})

    return {
        "drifts": by_kind(stats.drifts),
        "drifts_not_adopted": by_kind(stats.drifts_not_adopted),
        "refused": Variant("a{st}", dict(sorted(stats.refused.items()))),
        "last_rescan": Variant("t", round(stats.last_rescan * 1_000_000)),
    }


def boot_host_pool(host: HostView) -> dict[str, Variant]:
    """Manager.BootHostPool: chzdev's persistent masks, for guests (see the interface XML)."""
    pool = host.boot_pool
    if pool is None:
        return {}
    out = {"file": Variant("s", pool.path)}
    if pool.error:
        out["error"] = Variant("s", pool.error)
    if pool.apmask is not None and pool.reserved_adapters is not None:
        out["apmask"] = Variant("s", pool.apmask)
        out["reserved_adapters"] = Variant("au", _ids(pool.reserved_adapters))
    if pool.aqmask is not None and pool.reserved_domains is not None:
        out["aqmask"] = Variant("s", pool.aqmask)
        out["reserved_domains"] = Variant("au", _ids(pool.reserved_domains))
    if host.boot_drift:
        out["drift"] = Variant("s", host.boot_drift)
    return out


def matrix_values(m: MatrixView) -> dict[str, Any]:
    return {
        "Uuid": m.uuid,
        "Name": m.name,
        "Adapters": _ids(m.adapters),
        "Domains": _ids(m.domains),
        "ControlDomains": _ids(m.control_domains),
        "Apqns": _pairs(m.apqns),
        "GuestApqns": _pairs(m.guest_apqns),
        "State": m.state,
        "Autostart": bool(m.autostart),
        "Adopted": bool(m.adopted),
        "Manager": m.manager,
        "SysfsPath": m.sysfs_path,
        "InUse": bool(m.in_use),
        "Lost": [[a, d, why] for a, d, _kind, why in m.lost],
        "LostReasons": [[a, d, kind] for a, d, kind, _why in m.lost],
        "ControlUsageDomains": bool(m.control_usage_domains),
    }


def adapter_values(a: AdapterView) -> dict[str, Any]:
    return {
        "Id": a.id,
        "Type": a.type,
        "Mode": a.mode,
        "Online": bool(a.online),
        "Configured": bool(a.configured),
        "Domains": _ids(a.domains),
        "GuestDomains": _ids(a.guest_domains),
        "Owners": [[d, u] for d, u in sorted(a.owners.items())],
        "Checkstopped": bool(a.checkstopped),
        "DriverOverrides": [[d, drv] for d, drv in a.overrides],
    }


def parse_options(options: dict[str, Variant], schema: dict[str, str] = OPTIONS) -> dict[str, Any]:
    """An a{sv} as keyword arguments (CreateMatrix's by default); unknown keys or wrong types
    are refused by name, so a caller learns at once what a daemon of this version takes."""
    out: dict[str, Any] = {}
    for key, var in options.items():
        want = schema.get(key)
        if want is None:
            known = ", ".join(sorted(schema)) or "none yet"
            raise InvalidArgument(f"unknown option {key!r} (known: {known})")
        if var.signature != want:
            raise InvalidArgument(f"option {key!r} must be of type {want}, not {var.signature}")
        out[key] = var.value
    return out


APPLY_OPTIONS = {"check": "b", "prune": "b"}
RELEASE_OPTIONS = {"force": "b", "timeout": "u"}
UPDATE_OPTIONS = {"mode": "s", "sets": "as"}
CONFIGURE_OPTIONS = {"name": "s", "autostart": "b"}
PROPOSE_OPTIONS = {"autostart": "b"}
NO_OPTIONS: dict[str, str] = {}
"""Reserve/Release/CheckWithOptions take none yet: the a{sv} is where later ones go."""


def parse_release(options: dict[str, Variant]) -> tuple[bool, float | None]:
    """StopWithOptions/RemoveWithOptions: ``force`` (b) and ``timeout`` (u, seconds > 0)."""
    parse_options(options, RELEASE_OPTIONS)
    timeout = options["timeout"].value if "timeout" in options else None
    if timeout is not None and timeout == 0:
        raise InvalidArgument("timeout must be at least 1 second")
    force = bool(options["force"].value) if "force" in options else False
    return force, float(timeout) if timeout is not None else None


def applied_value(result: Applied) -> dict[str, Variant]:
    """Apply's answer: ``changed`` and the ``plan``, one a{sv} per step (see the XML)."""
    steps: list[dict[str, Variant]] = []
    for step in result.plan:
        out = {
            "action": Variant("s", step.action),
            "target": Variant("s", step.target),
            "text": Variant("s", step.text),
        }
        if step.uuid:
            out["uuid"] = Variant("s", step.uuid)
        for key, ids in (
            ("adapters", step.adapters),
            ("domains", step.domains),
            ("control_domains", step.control_domains),
        ):
            if ids is not None:
                out[key] = Variant("au", _ids(ids))
        steps.append(out)
    return {"changed": Variant("b", result.changed), "plan": Variant("aa{sv}", steps)}


class Manager(Exported):
    """``/org/apmatrix/Apmatrix1``: create matrices, check, reserve; host properties."""

    def __init__(self, service: Service, authority: Authority, tree: _Tree) -> None:
        super().__init__(names.MANAGER_IFACE, authority, manager_values(service.host))
        self._service = service
        self._tree = tree

    Version = prop("Version", "s")
    Layout = prop("Layout", "s")
    MaxAdapterId = prop("MaxAdapterId", "u")
    MaxDomainId = prop("MaxDomainId", "u")
    HostAdapters = prop("HostAdapters", "au")
    HostDomains = prop("HostDomains", "au")
    Settling = prop("Settling", "b")
    Pending = prop("Pending", "s")
    KernelGeneration = prop("KernelGeneration", "s")
    KernelFeatures = prop("KernelFeatures", "as")
    Statistics = live_prop(
        "Statistics", "a{sv}", lambda self: statistics_value(self._service.state.stats)
    )
    BootHostPool = prop("BootHostPool", "a{sv}")

    @call
    async def CreateMatrix(self, uuid: Str, options: Options) -> Path:
        kwargs = parse_options(options)
        view = await self._service.change("CreateMatrix", ops.create_matrix, uuid, **kwargs)
        return self._tree.ensure_matrix(view.uuid)

    @call
    async def Apply(self, document: Str, options: Options) -> Options:
        kw = parse_options(options, APPLY_OPTIONS)
        result = await self._service.submit("Apply", apply.apply, document, **kw)
        for step in result.plan:
            if step.action == "create" and not kw.get("check"):
                self._tree.ensure_matrix(step.uuid)
        return applied_value(result)

    @call
    def Check(self, adapters: Ids, domains: Ids, uuid: Str) -> Clashes:
        return self._service.check_rows(adapters, domains, uuid)  # a(uus) takes the tuples

    @call
    def Reserve(self, adapters: Ids, domains: Ids) -> Awaitable[None]:
        return self._service.change("Reserve", ops.reserve, adapters, domains)

    @call
    def Release(self, adapters: Ids, domains: Ids) -> Awaitable[None]:
        return self._service.change("Release", ops.release, adapters, domains)

    @call
    def CheckWithOptions(self, adapters: Ids, domains: Ids, uuid: Str, options: Options) -> Clashes:
        parse_options(options, NO_OPTIONS)
        return self._service.check_rows(adapters, domains, uuid)

    @call
    def ReserveWithOptions(self, adapters: Ids, domains: Ids, options: Options) -> Awaitable[None]:
        parse_options(options, NO_OPTIONS)
        return self._service.change("Reserve", ops.reserve, adapters, domains)

    @call
    def ReleaseWithOptions(self, adapters: Ids, domains: Ids, options: Options) -> Awaitable[None]:
        parse_options(options, NO_OPTIONS)
        return self._service.change("Release", ops.release, adapters, domains)

    def _own_mdevctl_dir(self, dir: str) -> str:
        """The path forms take only the daemon's own mdevctl directory ('' for it): a root
        daemon resolves no path a caller gave it. Any other comes as a descriptor."""
        own = self._service.mdevctl_dir
        if dir not in ("", own):
            raise InvalidArgument(
                f"only {own} is opened by path; pass any other directory open, as a "
                "descriptor, to ImportMdevctlFd/ExportMdevctlFd"
            )
        return own

    @call
    async def ImportMdevctl(self, dir: Str) -> Paths:
        where = self._own_mdevctl_dir(dir)
        uuids = await self._service.submit("ImportMdevctl", ops.import_mdevctl, where)
        return [self._tree.ensure_matrix(u) for u in uuids]

    @call
    async def ExportMdevctl(self, dir: Str) -> None:
        where = self._own_mdevctl_dir(dir)
        await self._service.submit("ExportMdevctl", ops.export_mdevctl, where)

    # The descriptor stays the message's: the dispatcher closes it after the reply, once the
    # command (which reads or writes through it on the worker) has ended.
    @call
    async def ImportMdevctlFd(self, dir: Fd) -> Paths:
        uuids = await self._service.submit("ImportMdevctl", ops.import_mdevctl, dir)
        return [self._tree.ensure_matrix(u) for u in uuids]

    @call
    async def ExportMdevctlFd(self, dir: Fd) -> None:
        await self._service.submit("ExportMdevctl", ops.export_mdevctl, dir)

    @call
    def ProposeMdevctl(
        self,
        action: Str,
        uuid: Str,
        adapters: Ids,
        domains: Ids,
        control_domains: Ids,
        options: Options,
    ) -> Awaitable[None]:
        kw = parse_options(options, PROPOSE_OPTIONS)
        return self._service.submit(
            "ProposeMdevctl", managers.propose, action, uuid, adapters, domains,
            control_domains, **kw,
        )  # fmt: skip

    @call
    async def ReloadMdevctl(self) -> None:
        await self._service.submit("ReloadMdevctl", managers.reload)

    @signal("os")
    def Drift(self, matrix: str, what: str) -> list[str]:
        """Sysfs no longer matches what the daemon holds for ``matrix``."""
        return [matrix, what]


class Matrix(Exported):
    """``/org/apmatrix/Apmatrix1/matrices/<uuid>``: one matrix (mdev), live or defined."""

    def __init__(self, service: Service, authority: Authority, view: MatrixView) -> None:
        super().__init__(names.MATRIX_IFACE, authority, matrix_values(view))
        self._service = service
        self.uuid = view.uuid

    Uuid = prop("Uuid", "s")
    Name = prop("Name", "s")
    Adapters = prop("Adapters", "au")
    Domains = prop("Domains", "au")
    ControlDomains = prop("ControlDomains", "au")
    Apqns = prop("Apqns", "a(uu)")
    GuestApqns = prop("GuestApqns", "a(uu)")
    State = prop("State", "s")
    Autostart = prop("Autostart", "b")
    Adopted = prop("Adopted", "b")
    Manager = prop("Manager", "s")
    SysfsPath = prop("SysfsPath", "s")
    InUse = prop("InUse", "b")
    Lost = prop("Lost", "a(uus)")
    LostReasons = prop("LostReasons", "a(uus)")
    ControlUsageDomains = prop("ControlUsageDomains", "b")

    @call
    def AssignAdapter(self, adapter: U32) -> Awaitable[None]:
        return self._change("AssignAdapter", "adapter", adapter, add=True)

    @call
    def UnassignAdapter(self, adapter: U32) -> Awaitable[None]:
        return self._change("UnassignAdapter", "adapter", adapter, add=False)

    @call
    def AssignDomain(self, domain: U32) -> Awaitable[None]:
        return self._change("AssignDomain", "domain", domain, add=True)

    @call
    def UnassignDomain(self, domain: U32) -> Awaitable[None]:
        return self._change("UnassignDomain", "domain", domain, add=False)

    @call
    def AssignControlDomain(self, domain: U32) -> Awaitable[None]:
        return self._change("AssignControlDomain", "control_domain", domain, add=True)

    @call
    def UnassignControlDomain(self, domain: U32) -> Awaitable[None]:
        return self._change("UnassignControlDomain", "control_domain", domain, add=False)

    @call
    def Update(self, adapters: Ids, domains: Ids, control_domains: Ids) -> Awaitable[None]:
        return self._service.change(
            "Update", ops.update, self.uuid, adapters, domains, control_domains
        )

    @call
    def UpdateWithOptions(
        self, adapters: Ids, domains: Ids, control_domains: Ids, options: Options
    ) -> Awaitable[None]:
        kw = parse_options(options, UPDATE_OPTIONS)
        return self._service.change(
            "Update", ops.update, self.uuid, adapters, domains, control_domains, **kw
        )

    @call
    def Configure(self, options: Options) -> Awaitable[None]:
        kw = parse_options(options, CONFIGURE_OPTIONS)
        if not kw:
            raise InvalidArgument("Configure: give name and/or autostart")
        return self._service.change("Configure", ops.configure, self.uuid, **kw)

    @call
    def Start(self) -> Awaitable[None]:
        return self._service.change("Start", ops.start, self.uuid)

    @call
    def Stop(self) -> Awaitable[None]:
        return self._service.submit("Stop", ops.stop, self.uuid)

    @call
    def Remove(self) -> Awaitable[None]:
        return self._service.submit("Remove", ops.remove, self.uuid)

    @call
    def StopWithOptions(self, options: Options) -> Awaitable[None]:
        force, timeout = parse_release(options)
        return self._service.submit("Stop", ops.stop, self.uuid, force, timeout)

    @call
    def RemoveWithOptions(self, options: Options) -> Awaitable[None]:
        force, timeout = parse_release(options)
        return self._service.submit("Remove", ops.remove, self.uuid, force, timeout)

    @call
    def TakeOver(self) -> Awaitable[None]:
        return self._service.submit("TakeOver", managers.take_over, self.uuid)

    @call
    def LibvirtXML(self) -> TwoStr:
        """A read: the XML is made from the sets the properties show."""
        m = self._service.matrix(self.uuid)
        hostdev = libvirt.hostdev_xml(m.uuid)
        return hostdev, libvirt.nodedev_xml(m.uuid, m.adapters, m.domains, m.control_domains)

    def _change(self, what: str, kind: ops.Kind, id: int, *, add: bool) -> Awaitable[None]:
        return self._service.change(what, ops.change_one, self.uuid, kind, id, add=add)


class Adapter(Exported):
    """``/org/apmatrix/Apmatrix1/adapters/<id>``: one AP card and who owns its queues."""

    def __init__(self, authority: Authority, view: AdapterView) -> None:
        super().__init__(names.ADAPTER_IFACE, authority, adapter_values(view))

    Id = prop("Id", "u")
    Type = prop("Type", "s")
    Mode = prop("Mode", "s")
    Online = prop("Online", "b")
    Configured = prop("Configured", "b")
    Domains = prop("Domains", "au")
    GuestDomains = prop("GuestDomains", "au")
    Owners = prop("Owners", "a(us)")
    Checkstopped = prop("Checkstopped", "b")
    DriverOverrides = prop("DriverOverrides", "a(us)")


class _Tree:
    """What the Manager needs from the object tree (kept small to avoid an import cycle)."""

    def ensure_matrix(self, uuid: str) -> str:
        raise NotImplementedError
