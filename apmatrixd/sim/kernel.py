"""The emulated kernel's state and rules: AP bus, zcrypt, vfio_ap and the mdev core.

This module owns what the kernel would keep in memory (cards, queue bindings, masks, mdevs)
and every ``store()`` rule with its errno, in the kernel's order of checks; it emits the
uevents the kernel would send. It knows nothing about paths: ``tree.py`` renders the state
as sysfs and routes writes here. State is compact (sets and small dicts) so that a host of
256 adapters x 256 domains costs almost nothing until someone looks at it.

Choices where kernel-facts.md is silent or the real kernel is unknowable here:

- Upstream = 6.19+ semantics without ``driver_override``: ``EBUSY`` on apmask/aqmask uses the
  all-ones rule for the other dimension.
- The guest view is recomputed from scratch whenever it is read (the kernel maintains it
  incrementally, with the same result in every case the emulator can produce). A card with
  ``config=0`` counts as outside the host configuration (the QCI APM lists configured adapters
  only), so its adapter is not in any guest view.
- Queues that were manually unbound are left alone by the reprobe after a mask change (the
  real ``__ap_revise_reserved`` would dereference their NULL driver); ``drivers_probe``,
  ``bind`` or a hot-plug brings them back.
- Reprobes and scans walk devices card-major in ascending id order (the kernel walks its
  device list in registration order, which is the same on a host built by one scan).
- Plugging a usage domain adds queues on every card but does not change the control-domain
  mask (QCI ADM); scenarios set both explicitly.
- ``BINDINGS=complete`` fires at the end of a bus scan (``scan()``, a write to ``scans``,
  hot-plug, ``config`` writes) when every queue is bound and a probe happened since the last.

2017 RFC layout (``layout="rfc2017"``; the real RFC details are unknown, kernel-facts §6), the
rules chosen here: no apmask/aqmask; a freshly booted host has every queue on ``cex4queue``;
mdev files ``adapters``/``domains``/``control_domains`` replace matrix/guest_matrix/ap_config;
assign parses and range-checks exactly like upstream, then ``EADDRNOTAVAIL`` if any queue of
the new cross product exists and is bound to ``cex4queue`` (host-owned), then ``EADDRINUSE``
on overlap with another mdev; binding a queue to ``cex4queue`` while an mdev holds its APQN
is ``EBUSY``; a freshly plugged queue goes to ``cex4queue`` unless an mdev holds its APQN, in
which case it goes to ``vfio_ap_matrix``; the mdev driver is the era's ``vfio_mdev``.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from apmatrixd.sim.parse import (
    AP_BITS,
    cstr,
    einval,
    format_mask,
    hex2bitmap,
    kstrtobool,
    kstrtoul,
    parse_mask,
    sscanf_int,
    strsep,
    uuid_is_valid,
)
from apmatrixd.sim.scenario import AdapterSpec, Scenario, check_type
from apmatrixd.sim.vfs import Uevent, UeventListener

Apqn = tuple[int, int]
MAX_INSTANCES = 256 * 256  # MAX_ZDEV_ENTRIES_EXT
AP_CONFIG_STRLEN = 201
CEX4CARD = "cex4card"
CEX4QUEUE = "cex4queue"


def oserror(code: int, what: str = "") -> OSError:
    """An OSError with the kernel's errno and a readable text."""
    return OSError(code, what or os.strerror(code))


@dataclass
class Card:
    """One AP card device (``cardXX``) and its zcrypt state."""

    spec: AdapterSpec
    config: bool
    online: bool  # zcrypt's flag; reads as 1 only while configured and not checkstopped
    chkstop: bool
    driver: str | None = CEX4CARD
    offline_queues: set[int] = field(default_factory=set)  # zcrypt queue online flag off


@dataclass
class Mdev:
    """One mediated device: the assigned masks, as vfio_ap stores them."""

    uuid: str
    apm: set[int] = field(default_factory=set)
    aqm: set[int] = field(default_factory=set)
    adm: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Names:
    """The names that differ between the two layouts."""

    root: str  # devices/<root>
    matrix_bus: str  # bus/<matrix_bus>, uevent SUBSYSTEM of the matrix device
    matrix_driver: str  # driver of the matrix device on that bus
    mdev_type: str
    type_name: str
    queue_driver: str  # the AP-bus driver that takes queues for guests
    mdev_driver: str


UPSTREAM = Names(
    "vfio_ap",
    "matrix",
    "vfio_ap",
    "vfio_ap-passthrough",
    "VFIO AP Passthrough Device",
    "vfio_ap",
    "vfio_ap_mdev",
)
RFC2017 = Names(
    "ap_matrix",
    "ap_matrix",
    "ap_matrix",
    "ap_matrix-passthrough",
    "AP Matrix Passthrough Device",
    "vfio_ap_matrix",
    "vfio_mdev",
)


class ApKernel:
    """State and store rules of one emulated LPAR; every public method holds ``lock``."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.layout = scenario.layout
        self.names = RFC2017 if scenario.layout == "rfc2017" else UPSTREAM
        self.apxa = scenario.apxa
        self.max_adapter_id = scenario.max_adapter_id
        self.max_domain_id = scenario.max_domain_id
        self.lock = threading.RLock()
        self.cards: dict[int, Card] = {
            s.id: Card(s, s.config, s.online, s.chkstop) for s in scenario.adapters
        }
        self.usage: set[int] = set(scenario.usage_domains)
        self.control: set[int] = set(scenario.control_domains)
        self.apmask: frozenset[int] = scenario.apmask
        self.aqmask: frozenset[int] = scenario.aqmask
        # Queue bindings that differ from the natural one (see natural_driver); None = unbound.
        self.qdrv: dict[Apqn, str | None] = {}
        # Queues taken from cex4queue: bus state "uninitiated", request_count reads "-".
        self.uninit: set[Apqn] = set()
        self.mdevs: dict[str, Mdev] = {}
        usable = sorted(self.usage & self.aqmask)
        self.ap_domain = usable[0] if usable else -1
        self.config_time = 30
        self.poll_thread = False
        self.poll_timeout = 250000
        self.drivers_autoprobe = True
        self.scans = 1
        self.bindings_complete_count = 1
        self.bindings_armed = False
        self.seqnum = self._boot_event_count()
        self.listeners: list[UeventListener] = []
        self.dmesg: deque[str] = deque(maxlen=1000)

    # ----------------------------------------------------------------- queries

    @property
    def upstream(self) -> bool:
        return self.layout == "upstream"

    def queue_exists(self, a: int, d: int) -> bool:
        return a in self.cards and d in self.usage

    def in_pool(self, a: int, d: int) -> bool:
        """Host pool: apmask x aqmask (the rfc2017 layout has no masks: nothing is pooled)."""
        return self.upstream and a in self.apmask and d in self.aqmask

    def held(self, a: int, d: int) -> Mdev | None:
        """The mdev whose APM x AQM contains the APQN, if any."""
        for m in self.mdevs.values():
            if a in m.apm and d in m.aqm:
                return m
        return None

    def natural_driver(self, a: int, d: int) -> str:
        """The driver a probe picks: the host pool's upstream, cex4queue in a booted rfc2017."""
        if self.upstream:
            return CEX4QUEUE if self.in_pool(a, d) else self.names.queue_driver
        return CEX4QUEUE

    def queue_driver(self, a: int, d: int) -> str | None:
        key = (a, d)
        if key in self.qdrv:
            return self.qdrv[key]
        return self.natural_driver(a, d)

    def queue_count(self) -> int:
        return len(self.cards) * len(self.usage)

    def unbound_queue_count(self) -> int:
        return sum(1 for v in self.qdrv.values() if v is None)

    def guest_view(self, m: Mdev) -> tuple[set[int], set[int], set[int]]:
        """vfio_ap's shadow APCB (kernel-facts §1.5), recomputed from the current state."""
        host_apm = {a for a, c in self.cards.items() if c.config}
        aqm = m.aqm & self.usage
        apm = {
            a
            for a in m.apm & host_apm
            if all(self.queue_driver(a, d) == self.names.queue_driver for d in aqm)
        }
        return apm, aqm, m.adm & self.control

    def queue_status(self, a: int, d: int) -> str:
        """vfio_ap ``status``: no guest is ever attached here, so never ``in use``."""
        return "assigned" if self.held(a, d) is not None else "unassigned"

    def card_env(self, a: int) -> dict[str, str]:
        hw = self.cards[a].spec.hwtype
        return {
            "DEV_TYPE": f"{hw:04X}",
            "MODALIAS": f"ap:t{hw:02X}",
            "MODE": self.cards[a].spec.uevent_mode,
        }

    def queue_env(self, a: int) -> dict[str, str]:
        return {"MODE": self.cards[a].spec.uevent_mode}

    # ----------------------------------------------------------------- uevents

    def subscribe(self, listener: UeventListener) -> Callable[[], None]:
        """Deliver every later uevent to ``listener``, synchronously, in kernel order."""
        with self.lock:
            self.listeners.append(listener)

        def unsubscribe() -> None:
            with self.lock:
                if listener in self.listeners:
                    self.listeners.remove(listener)

        return unsubscribe

    def emit(
        self,
        action: str,
        devpath: str,
        subsystem: str,
        devtype: str | None = None,
        driver: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.seqnum += 1
        event = Uevent(action, devpath, subsystem, self.seqnum, devtype, driver, env or {})
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # a listener's bug must not corrupt the kernel state
                self.dmesg.append(f"uevent listener failed: {exc!r}")

    def emit_card(self, action: str, a: int, extra: dict[str, str] | None = None) -> None:
        env = dict(extra or {})
        env.update(self.card_env(a))
        self.emit(action, f"/devices/ap/card{a:02x}", "ap", "ap_card", self.cards[a].driver, env)

    def emit_queue(self, action: str, a: int, d: int, extra: dict[str, str] | None = None) -> None:
        env = dict(extra or {})
        env.update(self.queue_env(a))
        drv = self.queue_driver(a, d) if self.queue_exists(a, d) else None
        path = f"/devices/ap/card{a:02x}/{a:02x}.{d:04x}"
        self.emit(action, path, "ap", "ap_queue", drv, env)

    def emit_root(self, env: dict[str, str]) -> None:
        self.emit("change", "/devices/ap", "ap", env=env)

    def matrix_devpath(self) -> str:
        return f"/devices/{self.names.root}/matrix"

    def emit_mdev(self, action: str, uuid: str, bound: bool) -> None:
        drv = self.names.mdev_driver if bound else None
        self.emit(action, f"{self.matrix_devpath()}/{uuid}", "mdev", driver=drv)

    def _boot_event_count(self) -> int:
        return len(self.scenario.adapters) * (2 + 2 * len(self.scenario.usage_domains)) + 5

    def boot_uevents(self) -> Iterator[Uevent]:
        """The coldplug story of the scenario's boot, seqnums 1..N (generated on demand).

        Cards and queues are added and bound by the first bus scan, then ``INITSCAN=done``
        and ``BINDINGS=complete``; then vfio_ap loads: the matrix device is added, bound,
        and registered as mdev parent (``MDEV_STATE=registered``).
        """
        sc = self.scenario
        seq = 0
        domains = sorted(sc.usage_domains)

        def mk(action: str, path: str, sub: str, dt: str | None, drv: str | None,
               env: dict[str, str]) -> Uevent:  # fmt: skip
            nonlocal seq
            seq += 1
            return Uevent(action, path, sub, seq, dt, drv, env)

        for spec in sc.adapters:
            a, hw = spec.id, spec.hwtype
            cenv = {"DEV_TYPE": f"{hw:04X}", "MODALIAS": f"ap:t{hw:02X}", "MODE": spec.uevent_mode}
            cpath = f"/devices/ap/card{a:02x}"
            yield mk("add", cpath, "ap", "ap_card", None, cenv)
            yield mk("bind", cpath, "ap", "ap_card", CEX4CARD, cenv)
            qenv = {"MODE": spec.uevent_mode}
            for d in domains:
                qpath = f"{cpath}/{a:02x}.{d:04x}"
                pooled = not self.upstream or (a in sc.apmask and d in sc.aqmask)
                drv = CEX4QUEUE if pooled else self.names.queue_driver
                yield mk("add", qpath, "ap", "ap_queue", None, qenv)
                yield mk("bind", qpath, "ap", "ap_queue", drv, qenv)
        yield mk("change", "/devices/ap", "ap", None, None, {"INITSCAN": "done"})
        done = {"BINDINGS": "complete", "COMPLETECOUNT": "1"}
        yield mk("change", "/devices/ap", "ap", None, None, done)
        mpath, mbus, mdrv = self.matrix_devpath(), self.names.matrix_bus, self.names.matrix_driver
        yield mk("add", mpath, mbus, None, None, {})
        yield mk("bind", mpath, mbus, None, mdrv, {})
        yield mk("change", mpath, mbus, None, mdrv, {"MDEV_STATE": "registered"})

    # ----------------------------------------------------------------- queue binding

    def set_queue_driver(self, a: int, d: int, drv: str | None) -> None:
        """Record a binding; the override map only holds bindings that differ from natural."""
        key = (a, d)
        if drv == self.natural_driver(a, d):
            self.qdrv.pop(key, None)
        else:
            self.qdrv[key] = drv
        if drv == CEX4QUEUE:
            self.uninit.discard(key)
            self.cards[a].offline_queues.discard(d)  # zcrypt probe sets online = 1

    def unbind_queue(self, a: int, d: int) -> None:
        was = self.queue_driver(a, d)
        if was is None:
            return
        self.set_queue_driver(a, d, None)
        if was == CEX4QUEUE:
            self.uninit.add((a, d))
        self.emit_queue("unbind", a, d)

    def bind_queue(self, a: int, d: int, drv: str) -> None:
        self.set_queue_driver(a, d, drv)
        self.bindings_armed = True
        self.emit_queue("bind", a, d)

    def probe_driver(self, a: int, d: int) -> str:
        """What an automatic probe of a driverless queue binds it to."""
        if not self.upstream and self.held(a, d) is not None:
            return self.names.queue_driver
        return self.natural_driver(a, d)

    def scan_done(self) -> None:
        """End of a bus scan: announce ``BINDINGS=complete`` once per transition."""
        if self.bindings_armed and self.unbound_queue_count() == 0:
            self.bindings_armed = False
            self.bindings_complete_count += 1
            self.emit_root(
                {"BINDINGS": "complete", "COMPLETECOUNT": str(self.bindings_complete_count)}
            )

    def scan(self) -> None:
        """A bus scan (``scans`` write, config_time tick): only the bindings check is left."""
        with self.lock:
            self.scans += 1
            self.scan_done()

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

    # ----------------------------------------------------------------- AP bus masks

    def mask_store(self, which: str, data: bytes) -> None:
        """apmask/aqmask: grammar, EBUSY for newly-set bits in use (6.19 rule), reprobe, uevent."""
        current = self.apmask if which == "apmask" else self.aqmask
        new = parse_mask(data, current)
        if new == current:
            return
        added = new - current
        everything = set(range(AP_BITS))
        for m in reversed(list(self.mdevs.values())):
            apm = added & m.apm if which == "apmask" else everything & m.apm
            aqm = everything & m.aqm if which == "apmask" else added & m.aqm
            if apm and aqm:
                for a in sorted(apm):
                    for d in sorted(aqm):
                        self.dmesg.append(
                            f"vfio_ap_mdev {m.uuid}: Can not reserve queue "
                            f"{a:02x}.{d:04x} for host driver: in use by mdev"
                        )
                raise oserror(errno.EBUSY)
        changed = current ^ new
        if which == "apmask":
            flips = [
                (a, d)
                for a in sorted(changed & self.cards.keys())
                for d in sorted(self.usage & self.aqmask)
            ]
        else:
            flips = [
                (a, d)
                for a in sorted(self.apmask & self.cards.keys())
                for d in sorted(changed & self.usage)
            ]
        old_drivers = [self.queue_driver(a, d) for a, d in flips]
        if which == "apmask":
            self.apmask = new
        else:
            self.aqmask = new
        for (a, d), was in zip(flips, old_drivers, strict=True):
            if was is None:  # driverless queues are not revised (see module docstring)
                self.qdrv[(a, d)] = None
                continue
            # Natural driver flipped with the mask: put the old binding back, then reprobe.
            self.qdrv[(a, d)] = was
            self.unbind_queue(a, d)
            self.bind_queue(a, d, self.natural_driver(a, d))
        self.emit_root({which.upper(): format_mask(new) + "\n"})

    # ----------------------------------------------------------------- drivers

    def find_device(self, data: bytes) -> tuple[int, int | None] | None:
        """``bus_find_device_by_name``: ``cardXX`` or ``XX.YYYY`` (sysfs_streq)."""
        s = cstr(data)
        if s.endswith(b"\n"):
            s = s[:-1]
        try:
            name = s.decode("ascii")
        except UnicodeDecodeError:
            return None
        parsed = parse_device_name(name)
        if parsed is None:
            return None
        a, d = parsed
        if a not in self.cards or (d is not None and d not in self.usage):
            return None
        return parsed

    def driver_bind(self, drv: str, data: bytes) -> None:
        """Driver ``bind``: ENODEV (no such device / no match / pool says no), EBUSY if bound."""
        dev = self.find_device(data)
        if dev is None:
            raise oserror(errno.ENODEV)
        a, d = dev
        if d is None:
            if drv != CEX4CARD:
                raise oserror(errno.ENODEV)
            if self.cards[a].driver is not None:
                raise oserror(errno.EBUSY)
            self.cards[a].driver = CEX4CARD
            self.emit_card("bind", a)
            return
        if drv == CEX4CARD:
            raise oserror(errno.ENODEV)
        if self.queue_driver(a, d) is not None:
            raise oserror(errno.EBUSY)
        if self.upstream:
            if (drv == CEX4QUEUE) != self.in_pool(a, d):
                raise oserror(errno.ENODEV)
        elif drv == CEX4QUEUE and self.held(a, d) is not None:
            raise oserror(errno.EBUSY)
        self.bind_queue(a, d, drv)

    def driver_unbind(self, drv: str, data: bytes) -> None:
        """Driver ``unbind``: ENODEV unless the device is bound to this driver."""
        dev = self.find_device(data)
        if dev is None:
            raise oserror(errno.ENODEV)
        a, d = dev
        if d is None:
            if self.cards[a].driver != drv:
                raise oserror(errno.ENODEV)
            self.cards[a].driver = None
            self.emit_card("unbind", a)
            return
        if self.queue_driver(a, d) != drv:
            raise oserror(errno.ENODEV)
        self.unbind_queue(a, d)

    def drivers_probe(self, data: bytes) -> None:
        """Bus ``drivers_probe``: attach a driverless device (ENODEV if there is none)."""
        dev = self.find_device(data)
        if dev is None:
            raise oserror(errno.ENODEV)
        a, d = dev
        if d is None:
            if self.cards[a].driver is None:
                self.cards[a].driver = CEX4CARD
                self.emit_card("bind", a)
        elif self.queue_driver(a, d) is None:
            self.bind_queue(a, d, self.probe_driver(a, d))

    # ----------------------------------------------------------------- cards and queues

    @staticmethod
    def _zero_one(data: bytes) -> int:
        value = sscanf_int(data)
        if value is None or value not in (0, 1):
            raise einval()
        return value

    def card_config(self, a: int, data: bytes) -> None:
        """Card ``config``: 0/1 (else EINVAL); CONFIG= for the card, then each queue flipped."""
        cfg = bool(self._zero_one(data))
        card = self.cards[a]
        changed = card.config != cfg
        card.config = cfg
        self.emit_card("change", a, {"CONFIG": str(int(cfg))})
        if changed:  # the rescan after the SCLP notification finds every queue flipped
            for d in sorted(self.usage):
                self.emit_queue("change", a, d, {"CONFIG": str(int(cfg))})
        self.scans += 1
        self.scan_done()

    def card_online(self, a: int, data: bytes) -> None:
        """zcrypt card ``online``: ENODEV for 1 while deconfigured; ONLINE= card then queues."""
        online = bool(self._zero_one(data))
        card = self.cards[a]
        if online and (not card.config or card.chkstop):
            raise oserror(errno.ENODEV)
        card.online = online
        self.emit_card("change", a, {"ONLINE": str(int(online))})
        for d in sorted(self.usage):
            if self.queue_driver(a, d) != CEX4QUEUE:
                continue
            if (d not in card.offline_queues) != online:
                if online:
                    card.offline_queues.discard(d)
                else:
                    card.offline_queues.add(d)
                self.emit_queue("change", a, d, {"ONLINE": str(int(online))})

    def queue_online(self, a: int, d: int, data: bytes) -> None:
        """zcrypt queue ``online``: ENODEV while deconfigured, EINVAL while the card is off."""
        online = bool(self._zero_one(data))
        card = self.cards[a]
        if online and (not card.config or card.chkstop):
            raise oserror(errno.ENODEV)
        if online and not card.online:
            raise einval()
        if online:
            card.offline_queues.discard(d)
        else:
            card.offline_queues.add(d)
        self.emit_queue("change", a, d, {"ONLINE": str(int(online))})

    # ----------------------------------------------------------------- bus attributes

    def ap_domain_store(self, data: bytes) -> None:
        value = sscanf_int(data, 0)
        if value is None or value < 0 or value > self.max_domain_id:
            raise einval()
        if self.upstream and value not in self.aqmask:
            raise einval()
        self.ap_domain = value

    def config_time_store(self, data: bytes) -> None:
        value = sscanf_int(data)
        if value is None or not 5 <= value <= 120:
            raise einval()
        self.config_time = value

    def poll_thread_store(self, data: bytes) -> None:
        self.poll_thread = kstrtobool(data)

    def poll_timeout_store(self, data: bytes) -> None:
        try:
            value = kstrtoul(data)
        except OSError:
            raise einval() from None
        if value > 120_000_000_000:
            raise einval()
        self.poll_timeout = value

    def autoprobe_store(self, data: bytes) -> None:
        self.drivers_autoprobe = cstr(data)[:1] != b"0"

    def synth_uevent(self, data: bytes, event: Callable[[str, dict[str, str]], None]) -> None:
        """A write to a ``uevent`` file: ``ACTION [UUID [KEY=VALUE ...]]`` (kobject_synth)."""
        s = cstr(data)
        if s.endswith(b"\n"):
            s = s[:-1]
        words = s.split(b" ")
        if words[0] not in (b"add", b"remove", b"change", b"move", b"online", b"offline",
                            b"bind", b"unbind"):  # fmt: skip
            raise einval()
        env = {"SYNTH_UUID": "0"}
        if len(words) > 1:
            if len(words[1]) != 36 or not uuid_is_valid(words[1]):
                raise einval()
            env["SYNTH_UUID"] = words[1].decode("ascii")
            for arg in words[2:]:
                key, sep, value = arg.partition(b"=")
                if not sep or not key.isalnum():
                    raise einval()
                env[f"SYNTH_ARG_{key.decode('ascii')}"] = value.decode("latin-1")
        event(words[0].decode("ascii"), env)

    # ----------------------------------------------------------------- hot plug

    def plug_adapter(self, id: int, type: str = "CEX8C") -> None:
        """An adapter enters the LPAR configuration: the scan adds and binds card and queues."""
        with self.lock:
            if not isinstance(id, int) or not 0 <= id <= self.max_adapter_id:
                raise oserror(errno.EINVAL, f"adapter id {id!r} out of range")
            try:
                check_type(type)
            except (ValueError, TypeError):
                raise oserror(errno.EINVAL, f"bad adapter type {type!r}") from None
            if id in self.cards:
                raise oserror(errno.EEXIST, f"adapter {id:02x} is already plugged")
            spec = AdapterSpec(id, type)
            self.cards[id] = Card(spec, True, True, False, None)
            self.emit_card("add", id)
            self.cards[id].driver = CEX4CARD
            self.emit_card("bind", id)
            for d in sorted(self.usage):
                self._add_queue(id, d)
            self.scans += 1
            self.scan_done()

    def _add_queue(self, a: int, d: int) -> None:
        self.qdrv[(a, d)] = None
        self.emit_queue("add", a, d)
        self.bind_queue(a, d, self.probe_driver(a, d))

    def _remove_queue(self, a: int, d: int) -> None:
        self.unbind_queue(a, d)
        self.emit_queue("remove", a, d)
        self.qdrv.pop((a, d), None)
        self.uninit.discard((a, d))
        self.cards[a].offline_queues.discard(d)

    def unplug_adapter(self, id: int) -> None:
        """An adapter leaves the LPAR: its queues, then the card, are unbound and removed."""
        with self.lock:
            if id not in self.cards:
                raise oserror(errno.ENODEV, f"adapter {id!r} is not plugged")
            for d in sorted(self.usage):
                self._remove_queue(id, d)
            if self.cards[id].driver is not None:
                self.cards[id].driver = None
                self.emit_card("unbind", id)
            self.emit_card("remove", id)
            del self.cards[id]
            self.scans += 1
            self.scan_done()

    def plug_domain(self, id: int) -> None:
        """A usage domain enters the LPAR's AQM: a queue appears on every card."""
        with self.lock:
            if not isinstance(id, int) or not 0 <= id <= self.max_domain_id:
                raise oserror(errno.EINVAL, f"domain id {id!r} out of range")
            if id in self.usage:
                raise oserror(errno.EEXIST, f"domain {id:04x} is already a usage domain")
            self.usage.add(id)
            for a in sorted(self.cards):
                self._add_queue(a, id)
            self.scans += 1
            self.scan_done()

    def unplug_domain(self, id: int) -> None:
        """A usage domain leaves the LPAR's AQM: its queue vanishes from every card."""
        with self.lock:
            if id not in self.usage:
                raise oserror(errno.ENODEV, f"domain {id!r} is not a usage domain")
            for a in sorted(self.cards):
                self._remove_queue(a, id)
            self.usage.discard(id)
            self.scans += 1
            self.scan_done()


def parse_device_name(name: str) -> tuple[int, int | None] | None:
    """``card05`` -> (5, None), ``05.00ab`` -> (5, 0xab); only the kernel's exact spelling."""
    try:
        if name.startswith("card") and len(name) == 6:
            a = int(name[4:], 16)
            return (a, None) if name == f"card{a:02x}" else None
        if len(name) == 7 and name[2] == ".":
            a, d = int(name[:2], 16), int(name[3:], 16)
            return (a, d) if name == f"{a:02x}.{d:04x}" else None
    except ValueError:
        return None
    return None


def sorted_ids(ids: Iterable[int], limit: int) -> list[int]:
    """Ascending ids up to ``limit``: the order every show() function iterates."""
    return sorted(i for i in ids if i <= limit)


__all__ = ["ApKernel", "Card", "Mdev", "Names", "oserror", "parse_device_name"]
