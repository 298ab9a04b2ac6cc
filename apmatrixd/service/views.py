"""What clients see: the host, each matrix and each adapter as plain frozen values."""

from __future__ import annotations

from dataclasses import dataclass

from apmatrixd.core import Apqn


@dataclass(frozen=True)
class HostView:
    version: str
    layout: str
    max_adapter_id: int
    max_domain_id: int
    host_adapters: tuple[int, ...]
    host_domains: tuple[int, ...]
    settling: bool = False
    pending: str = ""


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
