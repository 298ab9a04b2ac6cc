"""The wire: one connection to apmatrixd, calls that turn D-Bus errors into one-line refusals,
and a snapshot of everything the daemon exports (GetManagedObjects + the Manager's properties).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError, DBusError, InvalidAddressError

from apmatrixd.bus import names, request

BUS_FAILURES = (OSError, EOFError, TimeoutError, AuthError, DBusError)
"""What a lost or refused bus connection raises, in every dbus-fast version (1.84 has no
DBusFastError base class)."""

PROPS_IFACE = "org.freedesktop.DBus.Properties"
CALL_TIMEOUT = 120.0
"""Long enough for a polkit agent to ask for a password."""

NOT_RUNNING = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}
HOW_TO_START = (
    "start it with 'systemctl start apmatrixd' "
    "(or try it out: 'sudo tools/demo', then --address unix:path=/run/apmatrixd-demo/bus)"
)


class CtlError(Exception):
    """What apmatrixctl prints as one line before exiting with ``code``.

    ``proposal`` (adapters, domains, matrix UUID or "") lets the caller draw the refused change.
    """

    def __init__(
        self,
        message: str,
        code: int = 1,
        name: str = "",
        proposal: tuple[frozenset[int], frozenset[int], str] | None = None,
    ) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code
        self.name = name
        self.proposal = proposal
        self.picture: list[str] = []


@dataclass(frozen=True)
class Target:
    """Which bus: an address, the session bus, or the system bus (default)."""

    address: str | None = None
    session: bool = False

    def describe(self) -> str:
        if self.address:
            return f"the bus at {self.address}"
        return "the session bus" if self.session else "the system bus"


def unvariant(value: Any) -> Any:
    if isinstance(value, Variant):
        return unvariant(value.value)
    if isinstance(value, list | tuple):
        return [unvariant(x) for x in value]
    if isinstance(value, dict):
        return {k: unvariant(x) for k, x in value.items()}
    return value


class Connection:
    """An open connection to the bus; every call goes to apmatrixd."""

    def __init__(self, bus: MessageBus, target: Target) -> None:
        self.bus = bus
        self.target = target

    @classmethod
    async def open(cls, target: Target) -> Connection:
        try:
            if target.address:
                bus = MessageBus(bus_address=target.address, negotiate_unix_fd=True)
            else:
                kind = BusType.SESSION if target.session else BusType.SYSTEM
                bus = MessageBus(bus_type=kind, negotiate_unix_fd=True)
        except InvalidAddressError as err:
            raise CtlError(f"bad bus address {target.address!r}: {err}", code=2) from None
        except OSError as err:  # dbus-fast < 2 connects the socket in the constructor
            raise CtlError(
                f"cannot reach {target.describe()} ({err.strerror or err}); "
                f"apmatrixd is not running there: {HOW_TO_START}"
            ) from None
        try:
            await asyncio.wait_for(bus.connect(), 15)
        except (*BUS_FAILURES, ValueError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise CtlError(
                f"cannot reach {target.describe()} ({why or type(err).__name__}); "
                f"apmatrixd is not running there: {HOW_TO_START}"
            ) from None
        return cls(bus, target)

    def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self,
        path: str,
        iface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        proposal: tuple[frozenset[int], frozenset[int], str] | None = None,
        unix_fds: Sequence[int] = (),
    ) -> list[Any]:
        """One call; ``h`` arguments in ``body`` are indices into ``unix_fds``."""
        try:
            reply = await request.call(
                self.bus, path, iface, member, signature, body,
                flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION,
                timeout=CALL_TIMEOUT, unix_fds=unix_fds,
            )  # fmt: skip
        except BUS_FAILURES as err:
            raise CtlError(f"no answer from apmatrixd ({err or type(err).__name__})") from None
        if reply is None:
            raise CtlError("the connection to the bus was lost")
        if reply.message_type == MessageType.ERROR:
            raise self._error(str(reply.error_name), reply.body, proposal)
        return list(reply.body)

    def _error(
        self,
        name: str,
        body: list[Any],
        proposal: tuple[frozenset[int], frozenset[int], str] | None,
    ) -> CtlError:
        text = request.error_text(body)
        if name in NOT_RUNNING or name.startswith("org.freedesktop.DBus.Error.Spawn"):
            return CtlError(
                f"apmatrixd is not running ({names.BUS_NAME} has no owner on "
                f"{self.target.describe()}): {HOW_TO_START}",
                name=name,
            )
        short = name.rsplit(".", 1)[-1]
        return CtlError(f"{short}: {text}" if text else short, name=name, proposal=proposal)

    async def props(self, path: str, iface: str) -> dict[str, Any]:
        (values,) = await self.call(path, PROPS_IFACE, "GetAll", "s", [iface])
        return {k: unvariant(v) for k, v in values.items()}

    async def snapshot(self) -> Snapshot:
        host = await self.props(names.MANAGER_PATH, names.MANAGER_IFACE)
        (objs,) = await self.call(
            names.MANAGER_PATH, names.OBJECT_MANAGER_IFACE, "GetManagedObjects"
        )
        snap = Snapshot(HostInfo.of(host), statistics=host.get("Statistics", {}))
        for path, ifaces in objs.items():
            if names.MATRIX_IFACE in ifaces:
                m = MatrixInfo.of(path, unvariant(ifaces[names.MATRIX_IFACE]))
                snap.matrices[m.uuid] = m
            if names.ADAPTER_IFACE in ifaces:
                a = AdapterInfo.of(path, unvariant(ifaces[names.ADAPTER_IFACE]))
                snap.adapters[a.id] = a
        return snap


# -- what the daemon exports, as plain values -----------------------------------------------------
def _pairs(value: Any) -> frozenset[tuple[int, int]]:
    return frozenset((int(a), int(d)) for a, d in value)


@dataclass(frozen=True)
class HostInfo:
    version: str
    layout: str
    max_adapter_id: int
    max_domain_id: int
    host_adapters: frozenset[int]
    host_domains: frozenset[int]
    settling: bool
    kernel_generation: str = ""
    kernel_features: tuple[str, ...] = ()
    boot_host_pool: dict[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, p: dict[str, Any]) -> HostInfo:
        return cls(
            boot_host_pool=dict(p.get("BootHostPool", {})),
            kernel_generation=str(p.get("KernelGeneration", "")),
            kernel_features=tuple(str(x) for x in p.get("KernelFeatures", ())),
            version=str(p.get("Version", "")),
            layout=str(p.get("Layout", "")),
            max_adapter_id=int(p.get("MaxAdapterId", 255)),
            max_domain_id=int(p.get("MaxDomainId", 255)),
            host_adapters=frozenset(p.get("HostAdapters", ())),
            host_domains=frozenset(p.get("HostDomains", ())),
            settling=bool(p.get("Settling", False)),
        )

    def json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "layout": self.layout,
            "max_adapter_id": self.max_adapter_id,
            "max_domain_id": self.max_domain_id,
            "host_adapters": sorted(self.host_adapters),
            "host_domains": sorted(self.host_domains),
            "settling": self.settling,
            "kernel_generation": self.kernel_generation,
            "kernel_features": list(self.kernel_features),
            "boot_host_pool": self.boot_host_pool,
        }


@dataclass(frozen=True)
class MatrixInfo:
    path: str
    uuid: str
    name: str
    adapters: frozenset[int]
    domains: frozenset[int]
    control_domains: frozenset[int]
    apqns: frozenset[tuple[int, int]]
    guest_apqns: frozenset[tuple[int, int]]
    state: str
    autostart: bool
    adopted: bool
    sysfs_path: str
    in_use: bool = False
    lost: tuple[tuple[int, int, str], ...] = ()
    control_usage_domains: bool = True
    manager: str = "apmatrixd"
    lost_reasons: tuple[tuple[int, int, str], ...] = ()  # Lost's APQNs, the reason as a word

    @classmethod
    def of(cls, path: str, p: dict[str, Any]) -> MatrixInfo:
        return cls(
            control_usage_domains=bool(p.get("ControlUsageDomains", True)),
            in_use=bool(p.get("InUse", False)),
            lost=tuple((int(a), int(d), str(w)) for a, d, w in p.get("Lost", ())),
            lost_reasons=tuple((int(a), int(d), str(w)) for a, d, w in p.get("LostReasons", ())),
            path=path,
            uuid=str(p.get("Uuid", names.uuid_of_path(path) or "")),
            name=str(p.get("Name", "")),
            adapters=frozenset(p.get("Adapters", ())),
            domains=frozenset(p.get("Domains", ())),
            control_domains=frozenset(p.get("ControlDomains", ())),
            apqns=_pairs(p.get("Apqns", ())),
            guest_apqns=_pairs(p.get("GuestApqns", ())),
            state=str(p.get("State", "")),
            autostart=bool(p.get("Autostart", False)),
            adopted=bool(p.get("Adopted", False)),
            manager=str(p.get("Manager", "apmatrixd")),
            sysfs_path=str(p.get("SysfsPath", "")),
        )

    @property
    def label(self) -> str:
        """``guest1 (1111...)`` or the bare UUID."""
        return f"{self.name} ({self.uuid})" if self.name else self.uuid

    def json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "state": self.state,
            "adapters": sorted(self.adapters),
            "domains": sorted(self.domains),
            "control_domains": sorted(self.control_domains),
            "apqns": [list(x) for x in sorted(self.apqns)],
            "guest_apqns": [list(x) for x in sorted(self.guest_apqns)],
            "autostart": self.autostart,
            "adopted": self.adopted,
            "manager": self.manager,
            "sysfs_path": self.sysfs_path,
            "in_use": self.in_use,
            "lost": [{"adapter": a, "domain": d, "reason": w} for a, d, w in self.lost],
            "control_usage_domains": self.control_usage_domains,
            "path": self.path,
        }


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    id: int
    type: str
    mode: str
    online: bool
    configured: bool
    domains: frozenset[int]
    guest_domains: frozenset[int]
    owners: dict[int, str] = field(hash=False)
    checkstopped: bool = False
    overrides: tuple[tuple[int, str], ...] = ()

    @classmethod
    def of(cls, path: str, p: dict[str, Any]) -> AdapterInfo:
        return cls(
            checkstopped=bool(p.get("Checkstopped", False)),
            overrides=tuple((int(d), str(drv)) for d, drv in p.get("DriverOverrides", ())),
            path=path,
            id=int(p.get("Id", 0)),
            type=str(p.get("Type", "")),
            mode=str(p.get("Mode", "")),
            online=bool(p.get("Online", False)),
            configured=bool(p.get("Configured", False)),
            domains=frozenset(p.get("Domains", ())),
            guest_domains=frozenset(p.get("GuestDomains", ())),
            owners={int(d): str(u) for d, u in p.get("Owners", [])},
        )

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "mode": self.mode,
            "online": self.online,
            "configured": self.configured,
            "domains": sorted(self.domains),
            "guest_domains": sorted(self.guest_domains),
            "owners": [[d, u] for d, u in sorted(self.owners.items())],
            "checkstopped": self.checkstopped,
            "driver_overrides": [[d, drv] for d, drv in self.overrides],
            "path": self.path,
        }


@dataclass
class Snapshot:
    host: HostInfo
    matrices: dict[str, MatrixInfo] = field(default_factory=dict)
    adapters: dict[int, AdapterInfo] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)  # the Manager's Statistics

    def sorted_matrices(self) -> list[MatrixInfo]:
        """Named ones first, by name; then the unnamed, by UUID."""
        return sorted(self.matrices.values(), key=lambda m: (m.name == "", m.name, m.uuid))

    def short_label(self, owner: str) -> str:
        """A matrix's name, else the first 8 digits of its UUID."""
        m = self.matrices.get(owner)
        return (m.name or m.uuid[:8]) if m is not None else owner[:8]

    def owner_label(self, owner: str) -> str:
        m = self.matrices.get(owner)
        return m.label if m is not None else owner

    def resolve(self, ref: str) -> MatrixInfo:
        """A matrix by name, UUID or unique UUID prefix."""
        by_name = [m for m in self.matrices.values() if m.name and m.name == ref]
        if by_name:
            return by_name[0]
        low = ref.strip().lower()
        if low in self.matrices:
            return self.matrices[low]
        hits = [m for m in self.sorted_matrices() if low and m.uuid.startswith(low)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            which = ", ".join(m.label for m in hits)
            raise CtlError(  # a lookup that failed, like NotFound: exit 1, not a usage error
                f"InvalidArgument: {ref!r} is ambiguous: it starts {which} (give more of it)",
                name=names.error_name("InvalidArgument"),
            )
        raise CtlError(
            f"NotFound: no matrix named {ref!r} (give a name, a UUID or a unique UUID prefix)",
            name=names.error_name("NotFound"),
        )
