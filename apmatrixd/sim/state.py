"""The emulated kernel's memory: cards, queue bindings, masks, mdevs, and its uevents.

The store rules live in ``vfio.py`` (mdev core, vfio_ap) and ``apbus.py`` (AP bus, zcrypt);
``kernel.py`` joins them and documents the choices made where the kernel is unknown.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from apmatrixd.sim.profile import profile
from apmatrixd.sim.scenario import AdapterSpec, Scenario
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
    born: int = 0  # creation order: the kernel's mdev_list order, which its checks walk


@dataclass
class Guest:
    """A running KVM guest that holds an mdev open (QEMU's ``-device vfio-ap``)."""

    uuid: str
    release_after: float | None
    """Seconds QEMU takes to unplug once the kernel asks for the device back (None: never on
    its own; only a detach lets go)."""
    apcb: tuple[frozenset[int], frozenset[int], frozenset[int]]
    """Before 6.0: the masks copied into the guest's CRYCB when it opened the device."""
    updates: int = 0
    """APCB rewrites pushed into the running guest (hot plug/unplug, one per store)."""
    requests: int = 0
    """Times the kernel asked QEMU to release the device (a ``remove`` that waited)."""


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


class KernelState:
    """State, queries, uevents and bindings of one emulated LPAR; public methods hold ``lock``."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.layout = scenario.layout
        self.profile = profile(scenario.kernel)
        self.names = RFC2017 if scenario.layout == "rfc2017" else UPSTREAM
        self.apxa = scenario.apxa
        self.max_adapter_id = scenario.max_adapter_id
        self.max_domain_id = scenario.max_domain_id
        self.lock = threading.RLock()
        self.released = threading.Condition(self.lock)  # a guest let go of its mdev
        self.guests: dict[str, Guest] = {}
        self.overrides: dict[Apqn, str] = {}  # queue driver_override (6.19+)
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
        # adapter -> the mdevs whose APM has it: who holds an APQN is a look-up, not a walk
        # of every mdev (a big host's start-up creates 1,000, each write checked for sharing).
        # vfio.py changes an APM only through index_apm.
        self.by_adapter: dict[int, set[str]] = {}
        self.births = 0
        usable = sorted(self.usage & self.aqmask)
        self.ap_domain = usable[0] if usable else -1
        self.config_time = 30
        self.poll_thread = False
        self.interrupts = scenario.interrupts  # ap_interrupts: adapter interrupts in use
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
        """The mdev whose APM x AQM contains the APQN, if any (the oldest, should two)."""
        holders = [m for u in self.by_adapter.get(a, ()) if d in (m := self.mdevs[u]).aqm]
        return min(holders, key=lambda m: m.born) if holders else None

    def sharers(self, uuid: str, apm: set[int], aqm: set[int]) -> list[Mdev]:
        """The other mdevs holding an APQN of ``apm`` x ``aqm``, newest first (mdev_list is
        head-inserted: the kernel checks the newest first)."""
        if len(self.mdevs) <= len(apm):  # the kernel's walk of the mdev list is shorter
            found = [
                m
                for m in self.mdevs.values()
                if m.uuid != uuid and not apm.isdisjoint(m.apm) and not aqm.isdisjoint(m.aqm)
            ]
        else:  # the holders of each of the few adapters (the index)
            uuids: set[str] = set()
            for a in apm:
                uuids.update(self.by_adapter.get(a, ()))
            uuids.discard(uuid)
            found = [m for u in uuids if not aqm.isdisjoint((m := self.mdevs[u]).aqm)]
        return sorted(found, key=lambda m: m.born, reverse=True)

    def index_apm(self, m: Mdev, apm: set[int]) -> None:
        """Set ``m``'s APM to ``apm`` and keep ``by_adapter`` in step."""
        for a in m.apm - apm:
            holders = self.by_adapter[a]
            holders.discard(m.uuid)
            if not holders:
                del self.by_adapter[a]
        for a in apm - m.apm:
            self.by_adapter.setdefault(a, set()).add(m.uuid)
        m.apm = apm

    def natural_driver(self, a: int, d: int) -> str | None:
        """The driver a probe picks: the host pool's upstream (a ``driver_override`` wins over
        the masks, and names a driver that may not exist), cex4queue in a booted rfc2017."""
        if self.upstream:
            override = self.overrides.get((a, d))
            if override is not None:
                return override if override in (CEX4QUEUE, self.names.queue_driver) else None
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
        """vfio_ap's shadow APCB (kernel-facts §1.5), recomputed from the current state.

        Before 6.0 a running guest has what its CRYCB got at open, whatever changed since."""
        guest = self.guests.get(m.uuid)
        if guest is not None and not self.profile.dynamic:
            apm0, aqm0, adm0 = guest.apcb
            return set(apm0), set(aqm0), set(adm0)
        aqm = m.aqm & self.usage
        vfio = self.names.queue_driver
        apm = {  # the mdev's configured adapters only: a big host has hundreds of cards
            a
            for a in m.apm
            if (c := self.cards.get(a)) is not None
            and c.config
            and all(self.queue_driver(a, d) == vfio for d in aqm)
        }
        return apm, aqm, m.adm & self.control

    def queue_status(self, a: int, d: int) -> str:
        """vfio_ap ``status``: ``in use`` while the holder's guest runs with this APQN."""
        m = self.held(a, d)
        if m is None:
            return "unassigned"
        if m.uuid in self.guests:
            apm, aqm, _ = self.guest_view(m)
            if a in apm and d in aqm:
                return "in use"
        return "assigned"

    def guest_views(self) -> dict[str, tuple[set[int], set[int], set[int]]]:
        """The APCB of every running guest (to count the rewrites a store pushes)."""
        return {u: self.guest_view(self.mdevs[u]) for u in self.guests if u in self.mdevs}

    def count_updates(self, before: dict[str, tuple[set[int], set[int], set[int]]]) -> None:
        """One APCB rewrite (hot plug into the guest, 6.15+: a cfg-change signal) per changed
        guest; before 6.0 the guest keeps its CRYCB, so there is nothing to count."""
        if not self.profile.dynamic:
            return
        for uuid, view in self.guest_views().items():
            if before.get(uuid) != view:
                self.guests[uuid].updates += 1

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
        if not self.listeners:  # nobody listens: only the sequence number moves (big hosts)
            self.seqnum += 1
            return
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
        """Record a binding; ``qdrv`` only holds bindings that differ from natural."""
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

    def reprobe(self, flips: list[Apqn], old_drivers: list[str | None]) -> None:
        """After a mask write: unbind each queue whose natural driver flipped and probe it
        again, in order. The bindings and uevents of ``unbind_queue`` then ``bind_queue``
        per queue, the per-card parts worked out once: a big host's aqmask write flips
        16,384 queues."""
        qdrv, uninit, listening = self.qdrv, self.uninit, bool(self.listeners)
        card, path, env = -1, "", {}
        for (a, d), was in zip(flips, old_drivers, strict=True):
            key = (a, d)
            if was is None:  # driverless queues are not revised (see kernel.py)
                qdrv[key] = None
                continue
            drv = self.natural_driver(a, d)  # the mask's new verdict
            if drv is None:
                qdrv.pop(key, None)
            else:
                qdrv[key] = None  # driverless between the unbind and the bind
            if was == CEX4QUEUE:
                uninit.add(key)
            if a != card:
                card, path, env = a, f"/devices/ap/card{a:02x}/{a:02x}.", self.queue_env(a)
            if listening:
                self.emit("unbind", f"{path}{d:04x}", "ap", "ap_queue", None, dict(env))
            else:
                self.seqnum += 1
            if drv is None:
                continue
            del qdrv[key]  # bound as the masks say: natural again
            if drv == CEX4QUEUE:
                uninit.discard(key)
                self.cards[a].offline_queues.discard(d)  # zcrypt probe sets online = 1
            self.bindings_armed = True
            if listening:
                self.emit("bind", f"{path}{d:04x}", "ap", "ap_queue", drv, dict(env))
            else:
                self.seqnum += 1

    def probe_driver(self, a: int, d: int) -> str | None:
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
