"""vfio_ap and the mdev core: create/remove and the assign/unassign/ap_config store rules.

Checks run in the kernel's order (kernel-facts §1.2-§1.4): parse (EINVAL/ERANGE), range
(ENODEV), idempotency, host-owned (EADDRNOTAVAIL), shared with another mdev (EADDRINUSE).
"""

from __future__ import annotations

import errno

from apmatrixd.sim.parse import cstr, einval, hex2bitmap, kstrtoul, strsep, uuid_is_valid
from apmatrixd.sim.state import (
    AP_CONFIG_STRLEN,
    CEX4QUEUE,
    MAX_INSTANCES,
    KernelState,
    Mdev,
    oserror,
)


class VfioAp(KernelState):
    """The matrix device's mdevs and their store rules."""

    # ----------------------------------------------------------------- mdev core

    def mdev_create(self, data: bytes) -> None:
        """``create``: 36 or 37 bytes, guid_parse, lower-cased name, EEXIST, EUSERS."""
        if len(data) not in (36, 37):
            raise einval()
        text = cstr(data)
        if not uuid_is_valid(text):
            raise einval()
        uuid = text[:36].decode("ascii").lower()
        if uuid in self.mdevs:
            raise oserror(errno.EEXIST)
        if len(self.mdevs) >= MAX_INSTANCES:
            raise oserror(errno.EUSERS)
        self.mdevs[uuid] = Mdev(uuid)
        self.emit_mdev("add", uuid, False)
        self.emit_mdev("bind", uuid, True)

    def mdev_remove(self, uuid: str, data: bytes) -> None:
        """``remove``: kstrtoul (any failure EINVAL); 0 is a no-op."""
        try:
            value = kstrtoul(data)
        except OSError:
            raise einval() from None
        if value and uuid in self.mdevs:
            del self.mdevs[uuid]
            self.emit_mdev("unbind", uuid, False)
            self.emit_mdev("remove", uuid, False)

    # ----------------------------------------------------------------- vfio_ap rules

    def _limit(self, kind: str) -> int:
        return self.max_adapter_id if kind == "adapter" else self.max_domain_id

    def _check_host_owned(self, apm: set[int], aqm: set[int]) -> None:
        if self.upstream:
            if apm & self.apmask and aqm & self.aqmask:
                raise oserror(errno.EADDRNOTAVAIL)
            return
        for a in sorted(apm & self.cards.keys()):
            for d in sorted(aqm & self.usage):
                if self.queue_driver(a, d) == CEX4QUEUE:
                    raise oserror(errno.EADDRNOTAVAIL)

    def _check_sharing(self, uuid: str, apm: set[int], aqm: set[int]) -> None:
        # The kernel's mdev_list is head-inserted: the newest mdev is checked first.
        for other in reversed(list(self.mdevs.values())):
            if other.uuid == uuid:
                continue
            both_a, both_d = apm & other.apm, aqm & other.aqm
            if both_a and both_d:
                for a in sorted(both_a):
                    for d in sorted(both_d):
                        self.dmesg.append(
                            f"vfio_ap_mdev {uuid}: Userspace may not assign queue "
                            f"{a:02x}.{d:04x} to mdev: already assigned to {other.uuid}"
                        )
                raise oserror(errno.EADDRINUSE)

    def mdev_assign(self, uuid: str, kind: str, data: bytes) -> None:
        """assign_adapter/_domain/_control_domain: parse, ENODEV, idempotent, then checks."""
        ident = kstrtoul(data)
        if ident > self._limit(kind):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        target = {"adapter": m.apm, "domain": m.aqm, "control_domain": m.adm}[kind]
        if ident in target:
            return
        if kind != "control_domain":
            apm = m.apm | {ident} if kind == "adapter" else m.apm
            aqm = m.aqm | {ident} if kind == "domain" else m.aqm
            self._check_host_owned(apm, aqm)
            self._check_sharing(uuid, apm, aqm)
        target.add(ident)

    def mdev_unassign(self, uuid: str, kind: str, data: bytes) -> None:
        """unassign_*: parse and range only; an unassigned id is a successful no-op."""
        ident = kstrtoul(data)
        if ident > self._limit(kind):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        {"adapter": m.apm, "domain": m.aqm, "control_domain": m.adm}[kind].discard(ident)

    def mdev_ap_config(self, uuid: str, data: bytes) -> None:
        """ap_config: three masks, atomic; EINVAL, EADDRNOTAVAIL, EADDRINUSE, ENODEV."""
        rest: bytes | None = cstr(data)[:AP_CONFIG_STRLEN]
        masks: list[set[int]] = []
        for _ in range(3):
            token, rest = strsep(rest, b",\n")
            if token is None:
                raise einval()
            masks.append(set(hex2bitmap(token)))
        apm, aqm, adm = masks
        self._check_host_owned(apm, aqm)
        self._check_sharing(uuid, apm, aqm)
        if (
            any(a > self.max_adapter_id for a in apm)
            or any(d > self.max_domain_id for d in aqm)
            or any(d > self.max_domain_id for d in adm)
        ):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        m.apm, m.aqm, m.adm = apm, aqm, adm
