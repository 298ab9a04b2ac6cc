"""The AP bus and zcrypt: masks, driver bind/unbind, card config/online, bus attributes, hot plug.

Rules from kernel-facts §2 and §3.1: the apmask/aqmask grammar and 6.19 EBUSY rule, reprobe
with unbind/bind uevents, ``CONFIG=``/``ONLINE=`` events, and the bus scan after hot plug.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from apmatrixd.sim.parse import (
    AP_BITS,
    cstr,
    einval,
    format_mask,
    kstrtobool,
    kstrtoul,
    parse_mask,
    sscanf_int,
    uuid_is_valid,
)
from apmatrixd.sim.scenario import AdapterSpec, check_type
from apmatrixd.sim.state import (
    CEX4CARD,
    CEX4QUEUE,
    Card,
    KernelState,
    oserror,
    parse_device_name,
)


class ApBus(KernelState):
    """The AP bus side of the emulated kernel."""

    # ----------------------------------------------------------------- AP bus masks

    def mask_store(self, which: str, data: bytes) -> None:
        """apmask/aqmask: grammar, EBUSY for newly-set bits in use (6.19 rule), reprobe, uevent."""
        if self.profile.driver_override and self.overrides:
            raise einval()  # 6.19: masks and driver_override exclude each other
        current = self.apmask if which == "apmask" else self.aqmask
        new = parse_mask(data, current)
        if new == current:
            return
        added = new - current
        # vfio_ap's in_use callback (6.0+): 6.19 counts every id of the other dimension,
        # 6.0-6.18 the other mask as it stands; before 6.0 nothing is asked at all.
        other: set[int] | frozenset[int] = set(range(AP_BITS))
        if not self.profile.all_ones_in_use:
            other = self.aqmask if which == "apmask" else self.apmask
        for m in reversed(list(self.mdevs.values()) if self.profile.dynamic else []):
            apm = added & m.apm if which == "apmask" else other & m.apm
            aqm = other & m.aqm if which == "apmask" else added & m.aqm
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
        self.reprobe(flips, old_drivers)
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
            override = self.overrides.get((a, d))
            if override is not None:
                if drv != override:  # ap_device_probe: only the named driver matches
                    raise oserror(errno.ENODEV)
            elif (drv == CEX4QUEUE) != self.in_pool(a, d):
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
            drv = self.probe_driver(a, d)
            if drv is not None:  # no driver matches: the device stays unbound, no error
                self.bind_queue(a, d, drv)

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
        """``ap_poll_thread_start()`` returns 0 without starting when interrupts are in use
        (``ap_irq_flag``): the write succeeds and ``poll_thread`` stays 0."""
        on = kstrtobool(data)
        self.poll_thread = on and not self.interrupts

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
        drv = self.probe_driver(a, d)
        if drv is not None:
            self.bind_queue(a, d, drv)

    # ----------------------------------------------------------------- driver_override (6.19)

    def override_show(self, a: int, d: int) -> str:
        """``driver_override``: the driver name, or ``(null)`` (sysfs_emit of NULL) if none."""
        return f"{self.overrides.get((a, d), '(null)')}\n"

    def override_store(self, a: int, d: int, data: bytes) -> None:
        """``driver_override``: a driver name (one trailing newline dropped; empty clears).

        EINVAL while apmask or aqmask is not all ones (the two ways of choosing a driver
        exclude each other). Like every driver_override, it only decides the next probe: the
        queue stays bound where it is until it is unbound and probed again."""
        text = cstr(data)
        if text.endswith(b"\n"):
            text = text[:-1]
        if len(text) >= 4096:
            raise einval()
        full = frozenset(range(AP_BITS))
        if self.apmask != full or self.aqmask != full:
            raise einval()
        was = self.queue_driver(a, d)
        if text:
            self.overrides[(a, d)] = text.decode("latin-1")
        else:
            self.overrides.pop((a, d), None)
        self.set_queue_driver(a, d, was)  # the binding itself does not move

    def _remove_queue(self, a: int, d: int) -> None:
        self.unbind_queue(a, d)
        self.emit_queue("remove", a, d)
        self.qdrv.pop((a, d), None)
        self.overrides.pop((a, d), None)  # a new queue device starts without one
        self.uninit.discard((a, d))
        self.cards[a].offline_queues.discard(d)

    def unplug_adapter(self, id: int) -> None:
        """An adapter leaves the LPAR: its queues, then the card, are unbound and removed."""
        with self.lock:
            if not isinstance(id, int) or id not in self.cards:
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
            if not isinstance(id, int) or id not in self.usage:
                raise oserror(errno.ENODEV, f"domain {id!r} is not a usage domain")
            for a in sorted(self.cards):
                self._remove_queue(a, id)
            self.usage.discard(id)
            self.scans += 1
            self.scan_done()
