"""Which vfio_ap generation the host runs, told from what sysfs shows (never a version string).

- an mdev without ``guest_matrix``: before 6.0. A running guest's matrix cannot change
  (EBUSY), only bound queues can be assigned, ``remove`` fails while a guest runs.
- ``guest_matrix``: 6.0+. Hot plug into running guests, over-provisioning, ``remove`` waits
  for the guest to let go.
- ``ap_config`` in an mdev: 6.10+. One atomic write of all three masks.
- ``devices/vfio_ap/matrix/features``: 6.12+. The features are listed.
- bus ``bindings``: the AP bus sends ``APMASK=``/``AQMASK=`` uevents when a mask changes
  (every ap_bus.c with ``bindings`` that was read has both, ~5.10 on); without it the masks
  are read by the rescan timer.
- ``driver_override`` on queues, bus ``bindings_complete_count``: 6.19+. The all-ones
  release rule; overrides and restricted masks exclude each other.

Until an mdev exists, a host without the ``features`` file (before 6.12) cannot say whether
it is older than 6.0: :attr:`Features.dynamic` is then None, and nothing that depends on it
is decided (the kernel's own answer counts).
"""

from __future__ import annotations

from dataclasses import dataclass

MATRIX_FEATURES = "features"


@dataclass(frozen=True)
class Features:
    """What the running kernel's vfio_ap and AP bus can do."""

    dynamic: bool | None = None
    """guest_matrix and hot plug (6.0+); None: not known yet (no mdev, no features file)."""
    ap_config: bool | None = None
    """The three masks in one write (6.10+); None: not known yet."""
    listed: frozenset[str] | None = None
    """The tokens of the matrix device's ``features`` file (6.12+), None without one."""
    driver_override: bool = False
    """Queue ``driver_override`` (6.19+)."""
    bindings_count: bool = False
    """Bus ``bindings_complete_count`` (6.19+)."""
    mask_uevents: bool = False
    """A mask change comes with a uevent on the bus root (bus ``bindings``, ~5.10+)."""
    layout: str = "upstream"

    @property
    def generation(self) -> str:
        """A Z admin's name for it: ``6.19+``, ``6.12+``, ``6.10+``, ``6.0+``, ``before 6.0``."""
        if self.layout != "upstream":
            return self.layout
        if self.driver_override or self.bindings_count:
            return "6.19+"
        if self.listed is not None:
            return "6.12+"
        if self.ap_config:
            return "6.10+"
        if self.dynamic:
            return "6.0+"
        if self.dynamic is False:
            return "before 6.0"
        return "6.0-6.11 or older (known once a matrix exists)"

    @property
    def all_ones_release(self) -> bool:
        """6.19's in_use rule: a released adapter counts against every domain (and back)."""
        return self.layout == "upstream" and (self.driver_override or self.bindings_count)

    @property
    def static(self) -> bool:
        """Before 6.0: a running guest's matrix is fixed and only bound queues are assigned."""
        return self.layout == "upstream" and self.dynamic is False

    def names(self) -> list[str]:
        """What the Manager's ``KernelFeatures`` lists."""
        out = []
        if self.dynamic:
            out += ["guest_matrix", "hotplug"]
        if self.ap_config:
            out.append("ap_config")
        if self.listed is not None:
            out.append("features")
        if self.driver_override:
            out.append("driver_override")
        if self.bindings_count:
            out.append("bindings_complete_count")
        return out
