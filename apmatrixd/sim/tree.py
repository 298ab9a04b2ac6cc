"""The sysfs face of the emulated kernel: every directory, link and attribute, built on demand.

Nothing here is stored: each lookup builds the one node it needs from ``ApKernel`` state, so
a path costs O(depth) and a 65536-queue host costs no memory until listed. The exceptions are
the directories on the way to an mdev's attributes (every change walks them): their entries
are fixed for the host's life (layout and kernel profile) and every child is still looked up
in the live state, so they are built once; an mdev's own directory is kept while the same
``Mdev`` stands under its UUID (its entries close over that object). Formats follow
kernel-facts §1 and §2 exactly (``sysfs_emit`` strings, lower-case hex, ascending ids).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from apmatrixd.sim.kernel import (
    CEX4CARD,
    CEX4QUEUE,
    ApKernel,
    oserror,
    parse_device_name,
    sorted_ids,
)
from apmatrixd.sim.parse import format_mask, sysfs_streq


@dataclass(slots=True)
class Attr:
    """A sysfs attribute: ``show`` for reads, ``store`` for writes (None = not permitted)."""

    mode: int
    show: Callable[[], str] | None
    store: Callable[[bytes], None] | None


@dataclass(slots=True)
class Link:
    """A sysfs symlink with the relative target sysfs would create."""

    target: str


@dataclass(slots=True)
class Dir:
    """A directory: its names on demand and an O(1) lookup of one child."""

    names: Callable[[], list[str]]
    child: Callable[[str], Node | None]


Node = Attr | Link | Dir
Entries = dict[str, Callable[[], Node]]


def ro(show: Callable[[], str]) -> Attr:
    return Attr(0o444, show, None)


def const(text: str) -> Callable[[], Attr]:
    return lambda: Attr(0o444, lambda: text, None)


def wo(store: Callable[[bytes], None]) -> Attr:
    return Attr(0o200, None, store)


def rw(show: Callable[[], str], store: Callable[[bytes], None]) -> Attr:
    return Attr(0o644, show, store)


def _noop(_data: bytes) -> None:
    """Stores whose only effect the emulator has no state for (reset, counters)."""


def fixed(entries: Entries, extra: Callable[[str], Node | None] | None = None,
          more: Callable[[], list[str]] | None = None) -> Dir:  # fmt: skip
    """A directory of known entries, optionally followed by computed ones."""

    def names() -> list[str]:
        return list(entries) + (more() if more else [])

    def child(name: str) -> Node | None:
        make = entries.get(name)
        if make is not None:
            return make()
        return extra(name) if extra else None

    return Dir(names, child)


def rel(link_dir: str, target: str) -> str:
    """Relative symlink text from directory ``link_dir`` to ``target`` (both root-relative)."""
    a = link_dir.split("/") if link_dir else []
    b = target.split("/")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return "/".join([".."] * (len(a) - n) + b[n:])


def link(link_dir: str, target: str) -> Callable[[], Link]:
    return lambda: Link(rel(link_dir, target))


def matrix_text(apm: set[int], aqm: set[int], max_a: int, max_d: int) -> str:
    """``vfio_ap_mdev_matrix_show``: ``05.0004`` lines, or ``05.`` / ``.0004``, or nothing."""
    adapters, domains = sorted_ids(apm, max_a), sorted_ids(aqm, max_d)
    if adapters and domains:
        return "".join(f"{a:02x}.{d:04x}\n" for a in adapters for d in domains)
    if adapters:
        return "".join(f"{a:02x}.\n" for a in adapters)
    return "".join(f".{d:04x}\n" for d in domains)


CONTROL = ".apmatrixd-sim"
MKVPS_CCA = "".join(
    f"{key} {gen}: - -\n" for key in ("AES", "APKA", "ASYM") for gen in ("NEW", "CUR", "OLD")
)
MKVPS_EP11 = "WK CUR: - -\nWK NEW: - -\n"


class Tree:
    """Renders one ``ApKernel`` as the sysfs tree; paths are root-relative, no leading slash."""

    def __init__(
        self,
        k: ApKernel,
        control: tuple[Callable[[], str], Callable[[bytes], None]] | None = None,
    ) -> None:
        self.k = k
        self.control = control
        self.matrix_dir = f"devices/{k.names.root}/matrix"
        self._dirs: dict[str, Dir] = {}
        self._mdevs: dict[str, tuple[object, Dir]] = {}

    def _once(self, key: str, build: Callable[[], Dir]) -> Dir:
        d = self._dirs.get(key)
        if d is None:
            d = self._dirs[key] = build()
        return d

    # ----------------------------------------------------------------- helpers

    def uevent(
        self,
        devpath: str,
        subsystem: str | None,
        devtype: str | None = None,
        driver: Callable[[], str | None] = lambda: None,
        env: Callable[[], dict[str, str]] = dict,
    ) -> Callable[[], Attr]:
        """A device's ``uevent`` file: shows its variables, a write re-emits a synthetic event."""
        k = self.k

        def show() -> str:
            if subsystem is None:
                return ""
            lines = [f"DEVTYPE={devtype}"] if devtype else []
            drv = driver()
            if drv:
                lines.append(f"DRIVER={drv}")
            lines += [f"{key}={val}" for key, val in env().items()]
            return "".join(line + "\n" for line in lines)

        def fire(action: str, synth: dict[str, str]) -> None:
            if subsystem is not None:  # devices without bus or class send nothing
                k.emit(action, devpath, subsystem, devtype, driver(), {**synth, **env()})

        return lambda: rw(show, lambda data: k.synth_uevent(data, fire))

    def kobj_uevent(self, devpath: str, subsystem: str) -> Callable[[], Attr]:
        """The write-only ``uevent`` of a bus or driver kobject."""
        k = self.k

        def fire(action: str, synth: dict[str, str]) -> None:
            k.emit(action, devpath, subsystem, env=synth)

        return lambda: wo(lambda data: k.synth_uevent(data, fire))

    # ----------------------------------------------------------------- top level

    def root(self) -> Dir:
        return self._once("", self._root)

    def _root(self) -> Dir:
        """``bus``, ``class``, ``devices``; plus the emulator's own control file, found by name
        only (never listed, so nothing walking the tree sees it), for ``apmatrixd-sim guest``."""
        ctl = self.control

        def control(name: str) -> Node | None:
            if name != CONTROL or ctl is None:
                return None
            return Attr(0o600, ctl[0], ctl[1])

        return fixed({"bus": self.bus, "class": self.klass, "devices": self.devices}, control)

    def devices(self) -> Dir:
        return self._once("devices", self._devices)

    def _devices(self) -> Dir:
        return fixed({"ap": self.ap_root, self.k.names.root: self.matrix_root})

    def klass(self) -> Dir:
        target = link("class/mdev_bus", self.matrix_dir)
        return fixed({"mdev_bus": lambda: fixed({"matrix": target})})

    # ----------------------------------------------------------------- devices/ap

    def ap_root(self) -> Dir:
        k = self.k
        entries: Entries = {
            "subsystem": link("devices/ap", "bus/ap"),
            "uevent": self.uevent("/devices/ap", "ap"),
        }

        def card(name: str) -> Node | None:
            parsed = parse_device_name(name)
            if parsed is None or parsed[1] is not None or parsed[0] not in k.cards:
                return None
            return self.card(parsed[0])

        return fixed(entries, card, lambda: [f"card{a:02x}" for a in sorted(k.cards)])

    def card(self, a: int) -> Dir:
        k = self.k
        c = k.cards[a]
        spec = c.spec
        here = f"devices/ap/card{a:02x}"
        entries: Entries = {
            "hwtype": const(f"{spec.hwtype}\n"),
            "raw_hwtype": const(f"{spec.hwtype}\n"),
            "depth": const("8\n"),
            "ap_functions": const(f"0x{spec.functions(k.apxa):08X}\n"),
            "request_count": lambda: rw(lambda: "0\n", _noop),
            "requestq_count": const("0\n"),
            "pendingq_count": const("0\n"),
            "modalias": const(f"ap:t{spec.hwtype:02X}\n"),
            "config": lambda: rw(lambda: f"{int(c.config)}\n", lambda b: k.card_config(a, b)),
            "chkstop": lambda: ro(lambda: f"{int(c.chkstop)}\n"),
            "max_msg_size": const("12288\n"),
            "subsystem": link(here, "bus/ap"),
            "uevent": self.uevent(
                f"/{here}", "ap", "ap_card", lambda: c.driver, lambda: k.card_env(a)
            ),
        }
        if c.driver is not None:
            entries["driver"] = link(here, f"bus/ap/drivers/{c.driver}")
            entries["type"] = const(f"{spec.type}\n")
            entries["online"] = lambda: rw(
                lambda: f"{int(c.config and not c.chkstop and c.online)}\n",
                lambda b: k.card_online(a, b),
            )
            entries["load"] = const("0\n")
            mode = spec.uevent_mode
            if mode in ("cca", "ep11"):
                entries["serialnr"] = const(f"93AA{a:04X}\n")
            if mode == "ep11":
                entries["API_ordinalnr"] = const("4\n")
                entries["FW_version"] = const("7.21\n")
                entries["op_modes"] = const("\n")

        def queue(name: str) -> Node | None:
            parsed = parse_device_name(name)
            if parsed is None or parsed[0] != a or parsed[1] is None:
                return None
            return self.queue(a, parsed[1]) if parsed[1] in k.usage else None

        return fixed(entries, queue, lambda: [f"{a:02x}.{d:04x}" for d in sorted(k.usage)])

    def queue(self, a: int, d: int) -> Dir:
        k = self.k
        c = k.cards[a]
        drv = k.queue_driver(a, d)
        here = f"devices/ap/card{a:02x}/{a:02x}.{d:04x}"
        entries: Entries = {
            "request_count": lambda: rw(lambda: "-\n" if (a, d) in k.uninit else "0\n", _noop),
            "requestq_count": const("0\n"),
            "pendingq_count": const("0\n"),
            "reset": lambda: rw(lambda: "No Reset Timer set.\n", _noop),
            "interrupt": const(
                "Interrupts enabled.\n" if drv == CEX4QUEUE else "Interrupts disabled.\n"
            ),
            "config": lambda: ro(lambda: f"{int(c.config)}\n"),
            "chkstop": lambda: ro(lambda: f"{int(c.chkstop)}\n"),
            "ap_functions": const(f"0x{c.spec.functions(k.apxa):08X}\n"),
            "subsystem": link(here, "bus/ap"),
            "uevent": self.uevent(
                f"/{here}", "ap", "ap_queue", lambda: k.queue_driver(a, d), lambda: k.queue_env(a)
            ),
        }
        if drv is not None:
            entries["driver"] = link(here, f"bus/ap/drivers/{drv}")
        if k.upstream and k.profile.driver_override:
            entries["driver_override"] = lambda: rw(
                lambda: k.override_show(a, d), lambda b: k.override_store(a, d, b)
            )
        if drv == CEX4QUEUE:
            entries["online"] = lambda: rw(
                lambda: f"{int(c.config and not c.chkstop and d not in c.offline_queues)}\n",
                lambda b: k.queue_online(a, d, b),
            )
            entries["load"] = const("0\n")
            if c.spec.uevent_mode == "cca":
                entries["mkvps"] = const(MKVPS_CCA)
            elif c.spec.uevent_mode == "ep11":
                entries["mkvps"] = const(MKVPS_EP11)
                entries["op_modes"] = const("\n")
        elif drv == k.names.queue_driver and k.upstream:
            entries["status"] = lambda: ro(lambda: f"{k.queue_status(a, d)}\n")
        return fixed(entries)

    # ----------------------------------------------------------------- the matrix device

    def matrix_root(self) -> Dir:
        return self._once("matrix_root", self._matrix_root)

    def _matrix_root(self) -> Dir:
        """``devices/vfio_ap``: a root device without bus, so its uevents are filtered."""
        return fixed(
            {
                "matrix": self.matrix_dev,
                "uevent": self.uevent(f"/devices/{self.k.names.root}", None),
            }
        )

    def matrix_dev(self) -> Dir:
        return self._once("matrix_dev", self._matrix_dev)

    def _matrix_dev(self) -> Dir:
        k, here, n = self.k, self.matrix_dir, self.k.names
        entries: Entries = {
            "mdev_supported_types": lambda: fixed({n.mdev_type: self.mdev_type_dir}),
            "driver": link(here, f"bus/{n.matrix_bus}/drivers/{n.matrix_driver}"),
            "subsystem": link(here, f"bus/{n.matrix_bus}"),
            "uevent": self.uevent(f"/{here}", n.matrix_bus, None, lambda: n.matrix_driver),
        }
        if k.upstream and k.profile.matrix_features:
            entries["features"] = const("guest_matrix hotplug ap_config\n")

        def mdev(name: str) -> Node | None:
            return self.mdev(name) if name in k.mdevs else None

        return fixed(entries, mdev, lambda: list(k.mdevs))

    def mdev_type_dir(self) -> Dir:
        k, n = self.k, self.k.names
        here = f"{self.matrix_dir}/mdev_supported_types/{n.mdev_type}/devices"

        def dev(name: str) -> Node | None:
            return Link(rel(here, f"{self.matrix_dir}/{name}")) if name in k.mdevs else None

        return fixed(
            {
                "available_instances": lambda: ro(lambda: f"{65536 - len(k.mdevs)}\n"),
                "create": lambda: wo(k.mdev_create),
                "device_api": const("vfio-ap\n"),
                "devices": lambda: Dir(lambda: list(k.mdevs), dev),
                "name": const(f"{n.type_name}\n"),
            }
        )

    def mdev(self, uuid: str) -> Dir:
        m = self.k.mdevs[uuid]
        kept = self._mdevs.get(uuid)
        if kept is not None and kept[0] is m:
            return kept[1]
        if len(self._mdevs) > 2 * len(self.k.mdevs) + 64:  # drop the removed ones
            self._mdevs = {u: v for u, v in self._mdevs.items() if self.k.mdevs.get(u) is v[0]}
        d = self._mdev(uuid)
        self._mdevs[uuid] = (m, d)
        return d

    def _mdev(self, uuid: str) -> Dir:
        k, n = self.k, self.k.names
        here = f"{self.matrix_dir}/{uuid}"
        m = k.mdevs[uuid]
        entries: Entries = {}

        def assign(kind: str, store: Callable[[str, str, bytes], None]) -> Callable[[], Attr]:
            return lambda: wo(lambda b: store(uuid, kind, b))

        for kind in ("adapter", "domain", "control_domain"):
            entries[f"assign_{kind}"] = assign(kind, k.mdev_assign)
            entries[f"unassign_{kind}"] = assign(kind, k.mdev_unassign)
        mx_a, mx_d = k.max_adapter_id, k.max_domain_id
        cdoms = lambda: ro(lambda: "".join(f"{d:04x}\n" for d in sorted_ids(m.adm, mx_d)))  # noqa: E731
        if k.upstream:

            def ap_config() -> str:
                return ",".join(format_mask(x) for x in (m.apm, m.aqm, m.adm)) + "\n"

            def guest() -> str:
                apm, aqm, _ = k.guest_view(m)
                return matrix_text(apm, aqm, mx_a, mx_d)

            if k.profile.ap_config:
                entries["ap_config"] = lambda: rw(ap_config, lambda b: k.mdev_ap_config(uuid, b))
            entries["control_domains"] = cdoms
            entries["matrix"] = lambda: ro(lambda: matrix_text(m.apm, m.aqm, mx_a, mx_d))
            if k.profile.dynamic:
                entries["guest_matrix"] = lambda: ro(guest)
        else:
            entries["adapters"] = lambda: ro(
                lambda: "".join(f"{a:02x}\n" for a in sorted_ids(m.apm, mx_a))
            )
            entries["domains"] = lambda: ro(
                lambda: "".join(f"{d:04x}\n" for d in sorted_ids(m.aqm, mx_d))
            )
            entries["control_domains"] = cdoms
        entries["remove"] = lambda: wo(lambda b: k.mdev_remove(uuid, b))
        entries["mdev_type"] = link(here, f"{self.matrix_dir}/mdev_supported_types/{n.mdev_type}")
        entries["driver"] = link(here, f"bus/mdev/drivers/{n.mdev_driver}")
        entries["subsystem"] = link(here, "bus/mdev")
        entries["uevent"] = self.uevent(f"/{here}", "mdev", None, lambda: n.mdev_driver)
        return fixed(entries)

    # ----------------------------------------------------------------- bus/

    def bus(self) -> Dir:
        return fixed(
            {"ap": self.bus_ap, self.k.names.matrix_bus: self.bus_matrix, "mdev": self.bus_mdev}
        )

    def bus_ap(self) -> Dir:
        k = self.k
        # APSB (AP secure bind, for Secure Execution guests) comes with the machines whose
        # cards are CEX8 (z16); an LPAR of older cards does not list it.
        apsb = any(spec.generation >= 8 for spec in k.scenario.adapters)
        features = " ".join(
            f
            for f in ("APSC", "APXA" if k.apxa else "", "QACT", "RC8A", "APSB" if apsb else "")
            if f
        )

        def bindings() -> str:
            total = k.queue_count()
            bound = total - k.unbound_queue_count()
            return f"{bound}/{total} (complete)\n" if bound == total else f"{bound}/{total}\n"

        def scans_store(_data: bytes) -> None:
            k.scan()

        entries: Entries = {
            "devices": self.bus_ap_devices,
            "drivers": lambda: fixed(
                {
                    CEX4CARD: lambda: self.ap_driver(CEX4CARD),
                    CEX4QUEUE: lambda: self.ap_driver(CEX4QUEUE),
                    k.names.queue_driver: lambda: self.ap_driver(k.names.queue_driver),
                }
            ),
            "ap_adapter_mask": lambda: ro(
                lambda: format_mask(a for a, c in k.cards.items() if c.config) + "\n"
            ),
            "ap_control_domain_mask": lambda: ro(lambda: format_mask(k.control) + "\n"),
            "ap_usage_domain_mask": lambda: ro(lambda: format_mask(k.usage) + "\n"),
            "ap_domain": lambda: rw(lambda: f"{k.ap_domain}\n", k.ap_domain_store),
            "ap_interrupts": lambda: ro(lambda: f"{int(k.interrupts)}\n"),
            "ap_max_adapter_id": const(f"{k.max_adapter_id}\n"),
            "ap_max_domain_id": const(f"{k.max_domain_id}\n"),
            "bindings": lambda: ro(bindings),
            "config_time": lambda: rw(lambda: f"{k.config_time}\n", k.config_time_store),
            "poll_thread": lambda: rw(lambda: f"{int(k.poll_thread)}\n", k.poll_thread_store),
            "poll_timeout": lambda: rw(lambda: f"{k.poll_timeout}\n", k.poll_timeout_store),
            "scans": lambda: rw(lambda: f"{k.scans}\n", scans_store),
            "drivers_autoprobe": lambda: rw(
                lambda: f"{int(k.drivers_autoprobe)}\n", k.autoprobe_store
            ),
            "drivers_probe": lambda: wo(k.drivers_probe),
            "uevent": self.kobj_uevent("/bus/ap", "bus"),
        }
        if k.profile.bus_features:
            entries["features"] = const(features + "\n")
        if k.profile.driver_override:
            entries["bindings_complete_count"] = lambda: ro(
                lambda: f"{k.bindings_complete_count}\n"
            )
        if k.upstream:
            entries["apmask"] = lambda: rw(
                lambda: format_mask(k.apmask) + "\n", lambda b: k.mask_store("apmask", b)
            )
            entries["aqmask"] = lambda: rw(
                lambda: format_mask(k.aqmask) + "\n", lambda b: k.mask_store("aqmask", b)
            )
        return fixed(entries)

    def device_path(self, a: int, d: int | None) -> str:
        if d is None:
            return f"devices/ap/card{a:02x}"
        return f"devices/ap/card{a:02x}/{a:02x}.{d:04x}"

    def bus_ap_devices(self) -> Dir:
        k = self.k
        here = "bus/ap/devices"

        def names() -> list[str]:
            out = []
            for a in sorted(k.cards):
                out.append(f"card{a:02x}")
                out += [f"{a:02x}.{d:04x}" for d in sorted(k.usage)]
            return out

        def child(name: str) -> Node | None:
            parsed = parse_device_name(name)
            if parsed is None:
                return None
            a, d = parsed
            if a not in k.cards or (d is not None and d not in k.usage):
                return None
            return Link(rel(here, self.device_path(a, d)))

        return Dir(names, child)

    def ap_driver(self, drv: str) -> Dir:
        k = self.k
        here = f"bus/ap/drivers/{drv}"
        entries: Entries = {
            "bind": lambda: wo(lambda b: k.driver_bind(drv, b)),
            "unbind": lambda: wo(lambda b: k.driver_unbind(drv, b)),
            "uevent": self.kobj_uevent(f"/{here}", "drivers"),
        }

        def bound(a: int, d: int | None) -> bool:
            if d is None:
                return k.cards[a].driver == drv
            return k.queue_driver(a, d) == drv

        def names() -> list[str]:
            out = []
            for a in sorted(k.cards):
                if drv == CEX4CARD:
                    if bound(a, None):
                        out.append(f"card{a:02x}")
                else:
                    out += [f"{a:02x}.{d:04x}" for d in sorted(k.usage) if bound(a, d)]
            return out

        def child(name: str) -> Node | None:
            parsed = parse_device_name(name)
            if parsed is None:
                return None
            a, d = parsed
            if a not in k.cards or (d is not None and d not in k.usage) or not bound(a, d):
                return None
            return Link(rel(here, self.device_path(a, d)))

        return fixed(entries, child, names)

    def bus_matrix(self) -> Dir:
        n = self.k.names
        here = f"bus/{n.matrix_bus}"

        def probe(data: bytes) -> None:
            if not sysfs_streq(data, "matrix"):
                raise oserror(errno.ENODEV)

        return fixed(
            {
                "devices": lambda: fixed({"matrix": link(f"{here}/devices", self.matrix_dir)}),
                "drivers": lambda: fixed(
                    {
                        n.matrix_driver: lambda: fixed(
                            {
                                "matrix": link(
                                    f"{here}/drivers/{n.matrix_driver}", self.matrix_dir
                                ),
                                "uevent": self.kobj_uevent(
                                    f"/{here}/drivers/{n.matrix_driver}", "drivers"
                                ),
                            }
                        )
                    }
                ),
                "drivers_autoprobe": lambda: rw(lambda: "1\n", _noop),
                "drivers_probe": lambda: wo(probe),
                "uevent": self.kobj_uevent(f"/{here}", "bus"),
            }
        )

    def bus_mdev(self) -> Dir:
        k, n = self.k, self.k.names

        def uuids(here: str) -> Dir:
            def child(name: str) -> Node | None:
                return Link(rel(here, f"{self.matrix_dir}/{name}")) if name in k.mdevs else None

            return Dir(lambda: list(k.mdevs), child)

        def probe(data: bytes) -> None:
            if not any(sysfs_streq(data, u) for u in k.mdevs):
                raise oserror(errno.ENODEV)

        drv_dir = f"bus/mdev/drivers/{n.mdev_driver}"
        return fixed(
            {
                "devices": lambda: uuids("bus/mdev/devices"),
                "drivers": lambda: fixed(
                    {
                        n.mdev_driver: lambda: fixed(
                            {"uevent": self.kobj_uevent(f"/{drv_dir}", "drivers")},
                            uuids(drv_dir).child,
                            lambda: list(k.mdevs),
                        )
                    }
                ),
                "drivers_autoprobe": lambda: rw(lambda: "1\n", _noop),
                "drivers_probe": lambda: wo(probe),
                "uevent": self.kobj_uevent("/bus/mdev", "bus"),
            }
        )
