"""What clients see: the host, each matrix and each adapter as plain frozen values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from apmatrixd.chzdev import BootPool
from apmatrixd.core import Apqn
from apmatrixd.kernel.snapshot import AdapterInfo


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
    kernel_generation: str = ""
    kernel_features: tuple[str, ...] = ()
    boot_pool: BootPool | None = None  # chzdev's persistent masks; None: no rule file
    boot_drift: str = ""  # where our reservations disagree with them


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
    manager: str
    sysfs_path: str
    in_use: bool = False
    # Each assigned APQN the guest does not get, and why: (adapter, domain, reason), the
    # reason as one of LOSS_REASONS and in words.
    lost: tuple[tuple[int, int, str, str], ...] = ()
    # Every usage domain is a control domain too (CreateMatrix's control_usage_domains).
    control_usage_domains: bool = True


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
    checkstopped: bool = False
    overrides: tuple[tuple[int, str], ...] = ()  # (domain, driver) of driver_override queues


LossReason = Literal[
    "absent",
    "deconfigured",
    "checkstopped",
    "no_queue",
    "driver_override",
    "host_driver",
    "unbound",
    "adapter_left_out",
    "kernel",
]
LOSS_REASONS: tuple[LossReason, ...] = get_args(LossReason)
"""Why a live matrix's guest lacks an assigned APQN, as one fixed word (Matrix.LostReasons):
its adapter is not in the host's configuration, is deconfigured or checkstopped; the host has
no such queue (the domain is not one of its usage domains); the queue is bound by
driver_override, to the host's driver, or to none; its adapter is left out whole for another
queue; or the kernel did not give it for a reason the host does not show."""


def loss_reasons(
    sets: Iterable[Apqn], guest: Iterable[Apqn], infos: Mapping[int, AdapterInfo], vfio: str
) -> tuple[tuple[int, int, LossReason, str], ...]:
    """Why each assigned APQN is not in the guest view, from what the host shows:
    (adapter, domain, one of :data:`LOSS_REASONS`, the reason in words)."""
    given = set(guest)
    wanted = sorted(set(sets) - given)
    if not wanted:
        return ()
    out: list[tuple[int, int, LossReason, str]] = []
    kind: LossReason
    for a, d in wanted:
        info = infos.get(a)
        if info is None:
            kind, why = "absent", f"adapter {a:02x} is not in the host's configuration"
        elif not info.configured:
            kind, why = "deconfigured", f"adapter {a:02x} is deconfigured"
        elif info.checkstopped:
            kind, why = "checkstopped", f"adapter {a:02x} is checkstopped"
        elif d not in info.domains:
            kind = "no_queue"
            why = f"domain {d:04x} is not a usage domain of this host (no queue {a:02x}.{d:04x})"
        elif d not in info.guest_domains:
            override = dict(info.overrides).get(d)
            if override:
                kind = "driver_override"
                why = f"queue {a:02x}.{d:04x} is bound to {override} by driver_override"
            elif d in info.host_domains:
                kind = "host_driver"
                why = f"queue {a:02x}.{d:04x} is bound to cex4queue (the host's), not {vfio}"
            else:
                kind, why = "unbound", f"queue {a:02x}.{d:04x} is bound to no driver"
        else:
            mine = {dd for aa, dd in set(sets) if aa == a}
            bad = sorted(mine - info.guest_domains)
            if bad:
                kind = "adapter_left_out"
                why = (
                    f"adapter {a:02x} is left out whole: its queue {a:02x}.{bad[0]:04x} is "
                    f"not bound to {vfio} (a guest gets whole adapters)"
                )
            else:
                kind, why = "kernel", "not given to the guest by the kernel"
        out.append((a, d, kind, why))
    return tuple(out)
