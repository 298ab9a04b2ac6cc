"""Kernel generations: which files, rules and errnos each one has (kernel-facts §1.6, §7 item 1).

A profile is a handful of flags, each named after what it changes on the sysfs face or in a
store rule, so that the rules in ``vfio.py`` and ``apbus.py`` read as "since 6.0: ..." and the
daemon's detection (``apmatrixd.kernel.features``) can be checked against the same table.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One kernel generation of the AP bus and vfio_ap."""

    version: str
    dynamic: bool
    """6.0: a running guest's matrix changes with assign/unassign (hot plug), ``guest_matrix``,
    APQNs that are not (yet) bound may be assigned, vfio_ap's ``in_use`` callback (EBUSY on
    apmask/aqmask), and ``remove`` of an mdev a guest holds blocks until it lets go. Before:
    EBUSY on every assign/unassign and on remove while a guest is attached, assign needs
    bound queues, and nothing stops the masks from taking an assigned APQN back."""
    ap_config: bool
    """6.10: the mdev's ``ap_config`` (three masks read and written in one go)."""
    matrix_features: bool
    """6.12: ``/sys/devices/vfio_ap/matrix/features``."""
    cfg_change_irq: bool
    """6.15: the guest is signalled (eventfd) whenever its APCB is rewritten."""
    driver_override: bool
    """6.19: queue ``driver_override`` (exclusive with restricted masks, EINVAL both ways),
    bus ``bindings_complete_count``, and the all-ones ``in_use`` rule for apmask/aqmask."""
    mdev_core_counts: bool
    """~6.1: the mdev core counts instances (EUSERS); before, vfio_ap's own counter (EPERM)."""
    bus_features: bool
    """The AP bus ``features`` attribute (not in 5.15's ap_bus.c)."""

    @property
    def instances_errno(self) -> int:
        return errno.EUSERS if self.mdev_core_counts else errno.EPERM

    @property
    def all_ones_in_use(self) -> bool:
        return self.driver_override


def _profile(version: str, since: tuple[int, int], *, bus_features: bool = True) -> Profile:
    at = tuple(int(p) for p in version.split("."))
    return Profile(
        version=version,
        dynamic=at >= (6, 0),
        ap_config=at >= (6, 10),
        matrix_features=at >= (6, 12),
        cfg_change_irq=at >= (6, 15),
        driver_override=at >= (6, 19),
        mdev_core_counts=at >= (6, 1),
        bus_features=bus_features and at >= since,
    )


PROFILES: dict[str, Profile] = {
    v: _profile(v, (6, 0)) for v in ("5.15", "6.0", "6.10", "6.12", "6.15", "6.19")
}
NEWEST = "6.19"


def profile(version: str) -> Profile:
    """The profile of ``version`` (one of :data:`PROFILES`); ValueError naming the known ones."""
    try:
        return PROFILES[version]
    except (KeyError, TypeError):
        known = ", ".join(PROFILES)
        raise ValueError(
            f"kernel {version!r} is not one of the emulated generations ({known})"
        ) from None
