"""vfio_ap and the mdev core: create/remove and the assign/unassign/ap_config store rules.

Checks run in the kernel's order (kernel-facts §1.2-§1.4): parse (EINVAL/ERANGE), range
(ENODEV), idempotency, host-owned (EADDRNOTAVAIL), shared with another mdev (EADDRINUSE).
Before 6.0 (``profile.dynamic`` false, K-5x): every assign/unassign of an mdev a guest holds
is EBUSY before anything is parsed, ``remove`` is EBUSY while it is held, there is no
idempotency shortcut, and assign_adapter/assign_domain need the new id's queues bound to
vfio_ap (``vfio_ap_mdev_verify_queues_reserved_for_apid``/``_apqi``), else EADDRNOTAVAIL.
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
            raise oserror(self.profile.instances_errno)
        self.births += 1
        self.mdevs[uuid] = Mdev(uuid, born=self.births)
        self.emit_mdev("add", uuid, False)
        self.emit_mdev("bind", uuid, True)

    def mdev_remove(self, uuid: str, data: bytes) -> None:
        """``remove``: kstrtoul (any failure EINVAL); 0 is a no-op."""
        try:
            value = kstrtoul(data)
        except OSError:
            raise einval() from None
        if value and uuid in self.guests:
            # 6.0+ waits in Host.write until the guest lets go; only 5.x gets here attached.
            raise oserror(errno.EBUSY)
        if value and uuid in self.mdevs:
            self.index_apm(self.mdevs[uuid], set())
            del self.mdevs[uuid]
            self.emit_mdev("unbind", uuid, False)
            self.emit_mdev("remove", uuid, False)

    # ----------------------------------------------------------------- vfio_ap rules

    def _limit(self, kind: str) -> int:
        return self.max_adapter_id if kind == "adapter" else self.max_domain_id

    def _check_host_owned(self, apm: set[int], aqm: set[int]) -> None:
        if self.upstream:
            if not self.overrides:
                if apm & self.apmask and aqm & self.aqmask:
                    raise oserror(errno.EADDRNOTAVAIL)
                return
            # 6.19: an override decides (vfio_ap: not the host's; any other: the host's).
            vfio = self.names.queue_driver
            for a in apm:
                for d in aqm:
                    override = self.overrides.get((a, d))
                    if (override is None and self.in_pool(a, d)) or override not in (None, vfio):
                        raise oserror(errno.EADDRNOTAVAIL)
            return
        for a in sorted(apm & self.cards.keys()):
            for d in sorted(aqm & self.usage):
                if self.queue_driver(a, d) == CEX4QUEUE:
                    raise oserror(errno.EADDRNOTAVAIL)

    def _check_sharing(self, uuid: str, apm: set[int], aqm: set[int]) -> None:
        for other in self.sharers(uuid, apm, aqm)[:1]:  # the first the kernel finds
            for a in sorted(apm & other.apm):
                for d in sorted(aqm & other.aqm):
                    self.dmesg.append(
                        f"vfio_ap_mdev {uuid}: Userspace may not assign queue "
                        f"{a:02x}.{d:04x} to mdev: already assigned to {other.uuid}"
                    )
            raise oserror(errno.EADDRINUSE)

    def _set_id(self, m: Mdev, kind: str, ident: int, on: bool) -> None:
        """Set or clear one bit of an mdev's mask (the APM through the adapter index)."""
        if kind == "adapter":
            self.index_apm(m, m.apm | {ident} if on else m.apm - {ident})
            return
        target = m.aqm if kind == "domain" else m.adm
        if on:
            target.add(ident)
        else:
            target.discard(ident)

    def _check_reserved(self, kind: str, ident: int, m: Mdev) -> None:
        """5.x: the new id's queues (with every id of the other mask, or at least one queue if
        that mask is empty) must exist and be bound to vfio_ap."""
        vfio = self.names.queue_driver
        if kind == "adapter":
            want = [(ident, d) for d in sorted(m.aqm)]
            anyq = [(ident, d) for d in sorted(self.usage)] if ident in self.cards else []
        else:
            want = [(a, ident) for a in sorted(m.apm)]
            anyq = [(a, ident) for a in sorted(self.cards)] if ident in self.usage else []
        if not want:
            if not any(self.queue_driver(a, d) == vfio for a, d in anyq):
                raise oserror(errno.EADDRNOTAVAIL)
            return
        for a, d in want:
            if not self.queue_exists(a, d) or self.queue_driver(a, d) != vfio:
                raise oserror(errno.EADDRNOTAVAIL)

    def _assign_static(self, uuid: str, kind: str, data: bytes) -> None:
        """assign_* before 6.0: EBUSY while a guest runs, parse, ENODEV, reserved, sharing."""
        if uuid in self.guests:
            raise oserror(errno.EBUSY)
        ident = kstrtoul(data)
        if ident > self._limit(kind):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        if kind != "control_domain":
            self._check_reserved(kind, ident, m)
            apm = m.apm | {ident} if kind == "adapter" else m.apm
            aqm = m.aqm | {ident} if kind == "domain" else m.aqm
            try:
                self._check_sharing(uuid, apm, aqm)
            except OSError:
                self._set_id(m, kind, ident, False)  # the kernel clears the bit, set or not
                raise
        self._set_id(m, kind, ident, True)

    def mdev_assign(self, uuid: str, kind: str, data: bytes) -> None:
        """assign_adapter/_domain/_control_domain: parse, ENODEV, idempotent, then checks."""
        if self.upstream and not self.profile.dynamic:
            self._assign_static(uuid, kind, data)
            return
        ident = kstrtoul(data)
        if ident > self._limit(kind):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        if ident in {"adapter": m.apm, "domain": m.aqm, "control_domain": m.adm}[kind]:
            return
        if kind != "control_domain":
            apm = m.apm | {ident} if kind == "adapter" else m.apm
            aqm = m.aqm | {ident} if kind == "domain" else m.aqm
            self._check_host_owned(apm, aqm)
            self._check_sharing(uuid, apm, aqm)
        self._set_id(m, kind, ident, True)

    def mdev_unassign(self, uuid: str, kind: str, data: bytes) -> None:
        """unassign_*: parse and range only; an unassigned id is a successful no-op."""
        if self.upstream and not self.profile.dynamic and uuid in self.guests:
            raise oserror(errno.EBUSY)
        ident = kstrtoul(data)
        if ident > self._limit(kind):
            raise oserror(errno.ENODEV)
        self._set_id(self.mdevs[uuid], kind, ident, False)

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
            max(apm, default=-1) > self.max_adapter_id
            or max(aqm, default=-1) > self.max_domain_id
            or max(adm, default=-1) > self.max_domain_id
        ):
            raise oserror(errno.ENODEV)
        m = self.mdevs[uuid]
        self.index_apm(m, apm)
        m.aqm, m.adm = aqm, adm
