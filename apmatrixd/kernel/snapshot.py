"""What a read of the host returns: plain frozen values, and where each layout keeps things."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from apmatrixd.core.apqn import Apqn
from apmatrixd.core.matrix import HostPool, Limits, Matrix


@dataclass(frozen=True)
class Layout:
    """Where one kernel generation keeps the matrix device and what it calls things."""

    name: str
    matrix: str
    mdev_type: str
    vfio_driver: str

    @property
    def type_dir(self) -> str:
        return f"{self.matrix}/mdev_supported_types/{self.mdev_type}"


LAYOUTS = {
    "upstream": Layout("upstream", "devices/vfio_ap/matrix", "vfio_ap-passthrough", "vfio_ap"),
    "rfc2017": Layout(
        "rfc2017", "devices/ap_matrix/matrix", "ap_matrix-passthrough", "vfio_ap_matrix"
    ),
}


@dataclass(frozen=True)
class AdapterInfo:
    """One AP card as the host sees it (what the Adapter D-Bus object shows)."""

    id: int
    type: str
    mode: str
    online: bool
    configured: bool
    domains: frozenset[int] = frozenset()  # queues present
    guest_domains: frozenset[int] = frozenset()  # queues bound to the vfio driver
    host_domains: frozenset[int] = frozenset()  # queues bound to cex4queue
    checkstopped: bool = False
    # 6.19+: queues whose driver a driver_override names (domain, driver), as far as they
    # show: read only while both masks are all ones (6.19 allows none otherwise), for the
    # queues bound to vfio_ap or to no driver (an override naming the host's driver on a
    # queue the host holds anyway changes nothing that shows; Reserve finds it).
    overrides: tuple[tuple[int, str], ...] = ()

    @property
    def vfio_domains(self) -> frozenset[int]:
        """Alias of ``guest_domains`` under the name the service uses."""
        return self.guest_domains


@dataclass(frozen=True)
class MdevInfo:
    """One live matrix as sysfs shows it: the assignment and what the guest really gets."""

    uuid: str
    adapters: frozenset[int] = frozenset()
    domains: frozenset[int] = frozenset()
    control_domains: frozenset[int] = frozenset()
    guest_apqns: frozenset[Apqn] = frozenset()
    in_use: bool = False  # a guest runs with it (see Kernel.in_use)

    def matrix(self) -> Matrix:
        return Matrix(self.uuid, self.adapters, self.domains, self.control_domains)


@dataclass(frozen=True)
class HostSnapshot:
    """Everything the registry needs to match the kernel, read in one pass."""

    layout: str
    limits: Limits
    pool: HostPool
    adapters: Mapping[int, AdapterInfo] = field(default_factory=dict)
    usage_domains: frozenset[int] | None = None  # bus ap_usage_domain_mask, if readable
    control_domains: frozenset[int] | None = None  # bus ap_control_domain_mask, if readable
    mdevs: Mapping[str, MdevInfo] = field(default_factory=dict)

    @property
    def max_adapter_id(self) -> int:
        return self.limits.max_adapter

    @property
    def max_domain_id(self) -> int:
        return self.limits.max_domain
