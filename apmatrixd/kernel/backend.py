"""The sysfs backend: reads the AP host and its matrices, and changes them all or nothing.

The only code in apmatrixd that writes sysfs. It is called after the core registry has
approved a change, so a refusal here means the kernel disagrees with the registry (or
something changed behind our back): every multi-write change is undone in reverse order on
the first failure and reported as :class:`KernelError` with the kernel's errno.

Both kernel layouts live here; the rest of the daemon sees only ``Kernel.layout``:

- ``upstream``: ``devices/vfio_ap/matrix``, type ``vfio_ap-passthrough``, host pool =
  ``bus/ap/apmask`` x ``bus/ap/aqmask``, mdev read files ``matrix``/``guest_matrix``.
- ``rfc2017``: ``devices/ap_matrix/matrix``, type ``ap_matrix-passthrough``, host pool = the
  queues bound to ``cex4queue``, reservation by unbind/bind to ``vfio_ap_matrix``, mdev read
  files ``adapters``/``domains``; the guest view is computed here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from apmatrixd.core.apqn import MAX_ID, Apqn, cross
from apmatrixd.core.errors import InvalidArgument
from apmatrixd.core.matrix import HostPool, Limits, Matrix, normalize_uuid
from apmatrixd.kernel import formats
from apmatrixd.kernel.errors import KernelError, KernelTimeout, LockBusy
from apmatrixd.kernel.features import MATRIX_FEATURES, Features
from apmatrixd.kernel.io import SysfsIO
from apmatrixd.kernel.snapshot import LAYOUTS, AdapterInfo, HostSnapshot, Layout, MdevInfo

__all__ = [
    "KINDS",
    "LAYOUTS",
    "AdapterInfo",
    "HostSnapshot",
    "Kernel",
    "KernelError",
    "Layout",
    "MdevInfo",
    "Write",
]

log = logging.getLogger(__name__)

KINDS = ("adapter", "domain", "control_domain")
HOST_DRIVER = "cex4queue"
AP_DEVICES = "devices/ap"
AP_BUS = "bus/ap"
S390_AP_LOCK = "/run/lock/s390apconfig.lock"
LOCK_WAIT = 10.0
"""Seconds a change waits for the s390 lock (held by chzdev or ap-check) before Busy."""
LOCK_POLL = 0.05
"""The lock s390-tools (ap-check, chzdev) take around AP configuration changes."""

_CARD_RE = re.compile(r"card([0-9a-f]{2})")
_QUEUE_RE = re.compile(r"([0-9a-f]{2})\.([0-9a-f]{4})")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MODES = {"C": "CCA-Coproc", "P": "EP11-Coproc", "A": "Accelerator"}


@dataclass(frozen=True)
class Write:
    """One sysfs write and the write that undoes it (None: nothing to undo).

    ``wait``: the write may block (the ``remove`` of an mdev a running guest holds, 6.0+); it
    runs in a thread of its own and is given up after this many seconds (KernelTimeout)."""

    path: str
    data: str
    undo_path: str | None = None
    undo_data: str = ""
    wait: float | None = None

    def __str__(self) -> str:
        return f"writing {self.data!r} to {self.path}"


def ap_config_text(m: Matrix) -> str:
    """An mdev's ``ap_config``: the three masks, comma-separated, as the kernel prints them."""
    masks = (m.adapters, m.domains, m.control_domains)
    return ",".join(formats.format_mask(x) for x in masks) + "\n"


class Kernel:
    """The AP host and its vfio_ap matrices through a :class:`SysfsIO`."""

    def __init__(
        self, io: SysfsIO, layout: str | None = None, lock_path: str | None = None
    ) -> None:
        self.io = io
        self.lock_path = lock_path
        self._sets: dict[frozenset[int], frozenset[int]] = {}
        self._layout = LAYOUTS[layout] if layout else self._detect()
        # What the rescan timer and hot plug read lies below these (mdevs, cards, masks).
        for directory in (self._layout.matrix, AP_DEVICES, AP_BUS):
            io.keep(directory)
        self.features = Features(layout=self._layout.name)
        self.detect_features()
        self.on_late_write: Callable[[Write, KernelError | None], None] | None = None
        """Told (from a helper thread) when a write given up on by its timeout returns."""
        self._held: contextlib.ExitStack | None = None  # hold_lock(): the lock kept
        self._holder = 0  # the thread that holds it
        self._boot = ""  # the running kernel's boot id, once read

    # -- layout -----------------------------------------------------------------------------
    def _detect(self) -> Layout:
        for candidate in LAYOUTS.values():
            if self.io.is_dir(candidate.matrix):
                return candidate
        raise KernelError(
            errno.ENODEV,
            LAYOUTS["upstream"].matrix,
            "detecting",
            "no AP matrix device (neither devices/vfio_ap/matrix nor devices/ap_matrix/matrix):"
            " vfio_ap module not loaded?",
        )

    @property
    def layout(self) -> str:
        return self._layout.name

    @property
    def vfio_driver(self) -> str:
        return self._layout.vfio_driver

    def mdev_path(self, uuid: str) -> str:
        """The mdev directory relative to the sysfs root (QEMU's ``sysfsdev=`` below /sys)."""
        return f"{self._layout.matrix}/{normalize_uuid(uuid)}"

    def mdev_sysfs_path(self, uuid: str) -> str:
        """The absolute path QEMU takes (``-device vfio-ap,sysfsdev=``)."""
        return os.path.join(self.io.root, self.mdev_path(uuid))

    # -- low-level I/O with errno kept ------------------------------------------------------
    def _read(self, path: str) -> str:
        try:
            return self.io.read(path)
        except OSError as e:
            raise KernelError.from_oserror(e, path, "reading") from None

    def _read_optional(self, path: str) -> str | None:
        """An attribute some kernels lack: None if absent. One open instead of a stat and
        an open (each a round trip through FUSE, and on the hot-plug path)."""
        try:
            return self.io.read(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise KernelError.from_oserror(e, path, "reading") from None

    def _read_in(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
        """Attributes of one directory, None for an absent one (kernels differ); the
        directory's own absence raises ENOENT."""
        try:
            return self.io.read_in(directory, names)
        except OSError as e:
            raise KernelError.from_oserror(e, e.filename or directory, "reading") from None

    def _write(self, path: str, data: str) -> None:
        log.debug("write %r to %s", data, path)
        try:
            self.io.write(path, data)
        except OSError as e:
            raise KernelError.from_oserror(e, path, f"writing {data!r}") from None

    def _listdir(self, path: str) -> list[str]:
        try:
            return self.io.listdir(path)
        except OSError as e:
            raise KernelError.from_oserror(e, path, "listing") from None

    def _list_optional(self, path: str) -> list[str]:
        try:
            return self._listdir(path)
        except KernelError:
            return []

    def _driver_of(self, queue_dir: str) -> str | None:
        try:
            return os.path.basename(self.io.readlink(f"{queue_dir}/driver").rstrip("/"))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise KernelError.from_oserror(e, f"{queue_dir}/driver", "reading link") from None

    def _optional_mask(self, path: str) -> frozenset[int] | None:
        """Bus QCI masks: absent on old kernels, ``not supported`` without QCI."""
        if not self.io.exists(path):
            return None
        text = self._read(path)
        if text.strip() == "not supported":
            return None
        return formats.parse_mask(text, path)

    def hold_lock(self) -> None:
        """Take the lock and keep it until :meth:`release_lock` (a group of changes: each
        member plans from what the one before wrote, so nobody may write in between).
        :meth:`locked` in the holding thread then takes nothing more. Blocking, as locked."""
        if self._held is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.locked())
        self._held, self._holder = stack, threading.get_ident()

    def release_lock(self) -> None:
        """Let go of what :meth:`hold_lock` took (nothing if it holds nothing)."""
        held, self._held, self._holder = self._held, None, 0
        if held is not None:
            held.close()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise with s390-tools when a lock path was given (real /sys only).

        Blocking: called from the service's worker thread, never from the event loop.
        """
        if self.lock_path is None or (
            self._held is not None and self._holder == threading.get_ident()
        ):
            yield
            return
        path = self.lock_path
        # /run/lock is world-writable: a link planted there is not followed, and a file some
        # user created first (to hold the lock and freeze every change) is not taken. The
        # shipped tmpfiles.d entry creates it root-owned at boot.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise KernelError.from_oserror(e, path, "opening the lock") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise KernelError(
                    errno.EPERM,
                    path,
                    "opening the lock",
                    f"not a regular file owned by uid {os.geteuid()} (uid {st.st_uid}): refused",
                )
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(path, LOCK_WAIT) from None
                    time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)

    def boot_id(self) -> str:
        """Which boot of the host this is: a journal entry of another boot says nothing about
        what the kernel holds now. The emulator's own (each emulated host is a new boot),
        else the running kernel's; '' if unknown."""
        tree_boot = getattr(getattr(self.io, "tree", None), "boot_id", None)
        if isinstance(tree_boot, str):
            return tree_boot
        if not self._boot:  # read once: it is the same for as long as this process runs
            try:
                with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                    self._boot = f.read().strip()
            except OSError:
                return ""
        return self._boot

    # -- the generation ---------------------------------------------------------------------
    def detect_features(self) -> Features:
        """What this kernel's vfio_ap can do, from its files (see ``features.py``); kept in
        :attr:`features` and refreshed by :meth:`read_host` and after an mdev is created."""
        if self._layout.name != "upstream":
            self.features = Features(False, False, layout=self._layout.name)
            return self.features
        dynamic: bool | None = None
        ap_config: bool | None = None
        listed: frozenset[str] | None = None
        text = self._read_optional(f"{self._layout.matrix}/{MATRIX_FEATURES}")
        if text is not None:
            listed = frozenset(text.split())
            dynamic, ap_config = "guest_matrix" in listed, "ap_config" in listed
        else:
            try:
                mdevs = self.list_mdevs()
            except KernelError:  # no type directory yet: nothing to tell from
                mdevs = []
            if mdevs:
                base = self.mdev_path(mdevs[0])
                dynamic = self.io.exists(f"{base}/guest_matrix")
                ap_config = self.io.exists(f"{base}/ap_config")
        override = False
        for name in self._list_optional(AP_DEVICES):
            if _CARD_RE.fullmatch(name):
                queues = [
                    q for q in self._list_optional(f"{AP_DEVICES}/{name}") if _QUEUE_RE.fullmatch(q)
                ]
                if queues:
                    override = self.io.exists(f"{AP_DEVICES}/{name}/{queues[0]}/driver_override")
                    break
        self.features = Features(
            dynamic=dynamic,
            ap_config=ap_config,
            listed=listed,
            driver_override=override,
            bindings_count=self.io.exists(f"{AP_BUS}/bindings_complete_count"),
            mask_uevents=self.io.exists(f"{AP_BUS}/bindings"),
        )
        return self.features

    def bindings_complete(self) -> bool:
        """The AP bus has bound every queue it found (``bindings`` reads ``n/n (complete)``).

        A bus without the attribute (the 2017 layout's era) counts as complete."""
        text = self._read_optional(f"{AP_BUS}/bindings")
        return text is None or text.rstrip("\n").endswith("(complete)")

    # -- reading ----------------------------------------------------------------------------
    def read_limits(self) -> Limits:
        ids = []
        for name in ("ap_max_adapter_id", "ap_max_domain_id"):
            path = f"{AP_BUS}/{name}"
            value = formats.parse_int(self._read(path), path)
            if not 0 <= value <= MAX_ID:
                raise formats.malformed(path, f"maximum id {value}")
            ids.append(value)
        return Limits(ids[0], ids[1])

    def read_pool(self, adapters: Mapping[int, AdapterInfo] | None = None) -> HostPool:
        if self._layout.name == "upstream":
            apmask, aqmask = f"{AP_BUS}/apmask", f"{AP_BUS}/aqmask"
            return HostPool(
                adapters=formats.parse_mask(self._read(apmask), apmask),
                domains=formats.parse_mask(self._read(aqmask), aqmask),
            )
        if adapters is None:
            adapters = self.read_adapters()
        queues = frozenset(Apqn(a.id, d) for a in adapters.values() for d in a.host_domains)
        return HostPool(queues=queues)

    def read_adapters(self) -> dict[int, AdapterInfo]:
        # One listing per queue driver instead of one readlink per queue: a 256 x 256 host
        # has 65,536 queues, and the driver directories name every bound one.
        bound = {
            driver: self._bound_to(driver) for driver in (self._layout.vfio_driver, HOST_DRIVER)
        }
        out: dict[int, AdapterInfo] = {}
        possible = self._overrides_possible()
        for name in self._listdir(AP_DEVICES):
            m = _CARD_RE.fullmatch(name)
            if m and self.io.is_dir(f"{AP_DEVICES}/{name}"):
                out[int(m[1], 16)] = self._read_adapter(int(m[1], 16), bound, possible)
        return out

    def _bound_to(self, driver: str) -> dict[int, int]:
        """The queues bound to ``driver``, as one domain bit mask per card: the listing of a
        256 x 256 host names 65,536 queues, and a set of their names (kept while every card is
        read) was a ~8 MiB peak of the start-up; the masks are 256 ints."""
        path = f"{AP_BUS}/drivers/{driver}"
        if not self.io.exists(path):
            return {}
        masks: dict[int, int] = {}
        for name in self._listdir(path):
            if _QUEUE_RE.fullmatch(name):
                a = int(name[:2], 16)
                masks[a] = masks.get(a, 0) | 1 << int(name[3:], 16)
        return masks

    def read_adapter(self, adapter: int) -> AdapterInfo | None:
        """One card and its queues, or None once it is gone (hot plug: one link per queue)."""
        card = f"{AP_DEVICES}/card{adapter:02x}"
        if not self.io.is_dir(card):
            return None
        bound = {self._layout.vfio_driver: {adapter: 0}, HOST_DRIVER: {adapter: 0}}
        for name in self._listdir(card):
            if _QUEUE_RE.fullmatch(name):
                driver = self._driver_of(f"{card}/{name}")
                if driver in bound:
                    bound[driver][adapter] |= 1 << int(name[3:], 16)
        return self._read_adapter(adapter, bound)

    def read_queues(self, info: AdapterInfo, domains: Iterable[int]) -> AdapterInfo | None:
        """``info`` with these queues of its card read again (present? bound to which
        driver?) and the others as they were; None once the card is gone.

        What a burst of queue events (add, remove, bind, unbind) calls for: a link per named
        queue instead of the whole card's (hot plug of one domain on a card with 85)."""
        card = f"{AP_DEVICES}/card{info.id:02x}"
        if not self.io.is_dir(card):
            return None
        present, guest, host = set(info.domains), set(info.guest_domains), set(info.host_domains)
        asked = set(domains)
        for d in sorted(asked):
            present.discard(d)
            guest.discard(d)
            host.discard(d)
            queue = f"{card}/{info.id:02x}.{d:04x}"
            if not self.io.is_dir(queue):
                continue
            present.add(d)
            driver = self._driver_of(queue)
            if driver == self._layout.vfio_driver:
                guest.add(d)
            elif driver == HOST_DRIVER:
                host.add(d)
        kept = tuple((d, drv) for d, drv in info.overrides if d not in asked)
        fresh = self._overrides(info.id, (d for d in asked if d in present and d not in host))
        return replace(
            info,
            domains=self._shared(present),
            guest_domains=self._shared(guest),
            host_domains=self._shared(host),
            overrides=tuple(sorted(kept + fresh)),
        )

    def read_card(self, adapter: int) -> tuple[bool, bool] | None:
        """A card's online and configured state, what its own uevents change; None if gone.
        Not its type, fixed while the card is there: the bus removes and re-creates a card
        whose type or functions change (kernel-facts 2.3), which is read whole. Through FUSE
        each attribute is five round trips."""
        card = f"{AP_DEVICES}/card{adapter:02x}"
        try:
            return self._card_flags(card, self._read_in(card, ("online", "config")))
        except KernelError as err:
            if err.errno == errno.ENOENT:
                return None
            raise

    def _checkstopped(self, card: str) -> bool:
        text = self._read_optional(f"{card}/chkstop")
        return text is not None and formats.parse_bool(text, f"{card}/chkstop")

    def _overrides_possible(self) -> bool:
        """6.19 refuses a driver_override while apmask or aqmask is restricted (and the
        masks while one is set): only a host whose masks are all ones can have any. Two
        reads instead of one per queue."""
        if not self.features.driver_override or self._layout.name != "upstream":
            return False
        full = "0x" + "f" * 64
        return all(
            (self._read_optional(f"{AP_BUS}/{m}") or "").strip() == full
            for m in ("apmask", "aqmask")
        )

    def _overrides(
        self, adapter: int, domains: Iterable[int], possible: bool | None = None
    ) -> tuple[tuple[int, str], ...]:
        """The ``driver_override`` of these queues of ``adapter`` that have one (6.19+)."""
        if not (self._overrides_possible() if possible is None else possible):
            return ()
        out = []
        for d in sorted(domains):
            path = f"{AP_DEVICES}/card{adapter:02x}/{adapter:02x}.{d:04x}/driver_override"
            text = self._read_optional(path)
            value = text.strip() if text is not None else ""
            if value and value != "(null)":
                out.append((d, value))
        return tuple(out)

    def read_overrides(self, adapters: Mapping[int, AdapterInfo]) -> list[tuple[str, str]]:
        """Every queue with a ``driver_override``, as (``05.0004``, driver): one read per
        queue, for the decisions it matters to (Reserve/Release on 6.19+)."""
        out: list[tuple[str, str]] = []
        possible = self._overrides_possible()
        for a in sorted(adapters):
            for d, drv in self._overrides(a, adapters[a].domains, possible):
                out.append((f"{a:02x}.{d:04x}", drv))
        return out

    def _card_state(self, card: str) -> tuple[str, bool, bool]:
        """Type, online, configured; ENOENT (KernelError) if the card is gone."""
        attrs = self._read_in(card, ("type", "online", "config"))
        kind = ""
        if (text := attrs["type"]) is not None:
            kind = formats.single_line(text, f"{card}/type")
        return (kind, *self._card_flags(card, attrs))

    @staticmethod
    def _card_flags(card: str, attrs: Mapping[str, str | None]) -> tuple[bool, bool]:
        """Online, configured (an attribute the kernel lacks reads as true)."""
        online = configured = True
        if (text := attrs["online"]) is not None:
            online = formats.parse_bool(text, f"{card}/online")
        if (text := attrs["config"]) is not None:
            configured = formats.parse_bool(text, f"{card}/config")
        return online, configured

    def _read_adapter(
        self,
        adapter: int,
        bound: Mapping[str, Mapping[int, int]],
        possible: bool | None = None,
    ) -> AdapterInfo:
        card = f"{AP_DEVICES}/card{adapter:02x}"
        kind, online, configured = self._card_state(card)
        vfio = bound[self._layout.vfio_driver].get(adapter, 0)
        on_host = bound[HOST_DRIVER].get(adapter, 0)
        present: set[int] = set()
        guest: set[int] = set()
        host: set[int] = set()
        for name in self._listdir(card):
            m = _QUEUE_RE.fullmatch(name)
            if not m or int(m[1], 16) != adapter:
                continue
            domain = int(m[2], 16)
            present.add(domain)
            if vfio >> domain & 1:
                guest.add(domain)
            elif on_host >> domain & 1:
                host.add(domain)
        return AdapterInfo(
            id=adapter,
            type=kind,
            mode=_MODES.get(kind[-1:], "Unknown"),
            online=online,
            configured=configured,
            domains=self._shared(present),
            guest_domains=self._shared(guest),
            host_domains=self._shared(host),
            checkstopped=self._checkstopped(card),
            overrides=self._overrides(adapter, present - host, possible),
        )

    def _shared(self, ids: set[int]) -> frozenset[int]:
        """One frozenset per distinct set of ids: on a 256 x 256 host every adapter has the
        same domains, and 3 x 256 copies of a 256-entry set were ~8 MiB of the daemon."""
        key = frozenset(ids)
        if len(self._sets) > 4096:
            self._sets.clear()
        return self._sets.setdefault(key, key)

    def read_host(self) -> HostSnapshot:
        self.detect_features()
        limits = self.read_limits()
        adapters = self.read_adapters()
        usage = self._optional_mask(f"{AP_BUS}/ap_usage_domain_mask")
        control = self._optional_mask(f"{AP_BUS}/ap_control_domain_mask")
        mdevs = {u: self._read_mdev(u, lambda: (adapters, usage)) for u in self.list_mdevs()}
        return HostSnapshot(
            layout=self._layout.name,
            limits=limits,
            pool=self.read_pool(adapters),
            adapters=adapters,
            usage_domains=usage,
            control_domains=control,
            mdevs=mdevs,
        )

    def list_mdevs(self) -> list[str]:
        """UUIDs of every mdev of our type (other mdev types are none of our business)."""
        devices = f"{self._layout.type_dir}/devices"
        names = self._listdir(devices)
        return sorted(n for n in names if _UUID_RE.fullmatch(n))

    def read_mdevs(
        self,
        adapters: Mapping[int, AdapterInfo] | None = None,
        only: Iterable[str] | None = None,
        known: Mapping[str, MdevInfo] | None = None,
        guests_only: bool = False,
    ) -> dict[str, MdevInfo]:
        """Every mdev of our type (or those of ``only``). ``adapters`` (the caller's current
        view) spares a re-read where the guest view is computed here; an mdev removed while
        reading is left out. ``known``: what the caller last read of some of them (see
        :meth:`_read_mdev`); ``guests_only``: their sets are taken from there, not read."""
        out: dict[str, MdevInfo] = {}
        host: tuple[Mapping[int, AdapterInfo], frozenset[int] | None] | None = None
        known = known or {}

        def context() -> tuple[Mapping[int, AdapterInfo], frozenset[int] | None]:
            nonlocal host
            if host is None:  # read once, and only if some guest view is computed here
                cards = adapters if adapters is not None else self.read_adapters()
                host = (cards, self._optional_mask(f"{AP_BUS}/ap_usage_domain_mask"))
            return host

        for uuid in self.list_mdevs() if only is None else only:
            try:
                out[uuid] = self._read_mdev(uuid, context, known.get(uuid), guests_only)
            except KernelError as err:
                if err.errno != errno.ENOENT:
                    raise
        return out

    def mdev_exists(self, uuid: str) -> bool:
        return self.io.exists(self.mdev_path(uuid))

    def read_mdev(self, uuid: str) -> MdevInfo:
        uuid = normalize_uuid(uuid)
        return self._read_mdev(
            uuid,
            lambda: (self.read_adapters(), self._optional_mask(f"{AP_BUS}/ap_usage_domain_mask")),
        )

    def read_guest(self, uuid: str) -> frozenset[Apqn]:
        """The guest view of one mdev alone: what the daemon re-reads after a write.

        Upstream (6.0+) it is one attribute, ``guest_matrix``; elsewhere it is computed from
        the whole mdev and the host, as ``read_mdev`` does.
        """
        uuid = normalize_uuid(uuid)
        if self._layout.name == "upstream":
            path = f"{self.mdev_path(uuid)}/guest_matrix"
            if (text := self._read_optional(path)) is not None:
                guest_a, guest_d = formats.parse_matrix(text, path)
                return frozenset(cross(guest_a, guest_d))
        return self.read_mdev(uuid).guest_apqns

    def _read_mdev(
        self,
        uuid: str,
        host: Callable[[], tuple[Mapping[int, AdapterInfo], frozenset[int] | None]],
        known: MdevInfo | None = None,
        guests_only: bool = False,
    ) -> MdevInfo:
        """One mdev; ``host`` gives the cards and usage domains where the guest view must be
        computed here (rfc2017, or upstream before 6.0: no ``guest_matrix``).

        ``known``: what was last read of it. If its sets read the same, its guest view is
        taken from there instead of ``guest_matrix``: the kernel changes a guest view
        without changing the sets only on a change of the host (a card or queue coming,
        going or moving between drivers), and each of those sends uevents, which the caller
        answers with a full read. Its ``status`` (a guest starting or stopping: no uevent)
        is read in any case.

        ``guests_only`` (a burst of only cards and queues, which changes no mdev's sets):
        ``guest_matrix`` alone is read and the sets are ``known``'s, unless the view holds
        an APQN outside them (a hand edit that assigned more): then it is read whole."""
        base = self.mdev_path(uuid)
        upstream = self._layout.name == "upstream"
        if guests_only and upstream and known is not None:
            text = self._read_in(base, ("guest_matrix",))["guest_matrix"]
            if text is not None:
                guest_a, guest_d = formats.parse_matrix(text, f"{base}/guest_matrix")
                if guest_a <= known.adapters and guest_d <= known.domains:
                    guest = frozenset(cross(guest_a, guest_d))
                    return replace(known, guest_apqns=guest, in_use=self._status_in_use(guest))
        # With nothing known, guest_matrix is read with the sets: one lookup of the directory.
        with_guest = ("guest_matrix",) if upstream and known is None else ()
        attrs = self._read_in(base, (*self._set_names(), *with_guest))
        assigned_a, assigned_d, control = self._parse_sets(base, attrs)
        if not upstream:
            guest = self._guest_view(assigned_a, assigned_d, *host())
        elif known is not None and (known.adapters, known.domains, known.control_domains) == (
            assigned_a,
            assigned_d,
            control,
        ):
            guest = known.guest_apqns
        else:
            if not with_guest:
                attrs = self._read_in(base, ("guest_matrix",))
            path = f"{base}/guest_matrix"
            if (text := attrs["guest_matrix"]) is not None:
                guest_a, guest_d = formats.parse_matrix(text, path)
                guest = frozenset(cross(guest_a, guest_d))
            else:  # before 6.0: no guest_matrix, compute it as the kernel would
                guest = self._guest_view(assigned_a, assigned_d, *host())
        return MdevInfo(uuid, assigned_a, assigned_d, control, guest, self._status_in_use(guest))

    def _set_names(self) -> tuple[str, ...]:
        """The attributes an mdev's adapters, domains and control domains are read from:
        ``ap_config`` alone where the kernel has it (6.10+), else one file each
        (``matrix`` holds the first two on the upstream layout)."""
        if self._layout.name != "upstream":
            return ("control_domains", "adapters", "domains")
        if self.features.ap_config:
            return ("ap_config",)
        return ("control_domains", "matrix")

    def _parse_sets(
        self, base: str, attrs: Mapping[str, str | None]
    ) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
        def text_of(name: str) -> str:
            if (text := attrs[name]) is None:  # an mdev always has it: half gone, or not ours
                raise KernelError(errno.ENOENT, f"{base}/{name}", "reading")
            return text

        if "ap_config" in attrs:
            return formats.parse_ap_config(text_of("ap_config"), f"{base}/ap_config")

        def ids(name: str, width: int) -> frozenset[int]:
            return formats.parse_ids(text_of(name), f"{base}/{name}", width)

        control = ids("control_domains", 4)
        if "matrix" in attrs:
            a, d = formats.parse_matrix(text_of("matrix"), f"{base}/matrix")
            return a, d, control
        return ids("adapters", 2), ids("domains", 4), control

    def _read_sets(self, base: str) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
        return self._parse_sets(base, self._read_in(base, self._set_names()))

    def _guest_view(
        self,
        assigned_a: frozenset[int],
        assigned_d: frozenset[int],
        adapters: Mapping[int, AdapterInfo],
        usage: frozenset[int] | None,
    ) -> frozenset[Apqn]:
        """Assigned ∩ configured, minus every adapter with a queue not bound to vfio.

        The architecture cannot take a single APQN from a guest, so one missing queue drops
        its whole adapter (kernel-facts §1.5).
        """
        host_a = {a.id for a in adapters.values() if a.configured}
        if usage is None:
            usage = frozenset(d for a in adapters.values() for d in a.domains)
        domains = assigned_d & usage
        kept = [a for a in sorted(assigned_a & host_a) if domains <= adapters[a].guest_domains]
        return frozenset(cross(kept, domains))

    # -- single writes ----------------------------------------------------------------------
    def create_mdev(self, uuid: str) -> None:
        with self.locked():
            self._write(f"{self._layout.type_dir}/create", normalize_uuid(uuid))

    def remove_mdev(self, uuid: str) -> None:
        with self.locked():
            self._write(f"{self.mdev_path(uuid)}/remove", "1")

    def _attr(self, uuid: str, verb: str, kind: str) -> str:
        if kind not in KINDS:
            raise InvalidArgument(f"unknown assignment kind {kind!r} (want one of {KINDS})")
        return f"{self.mdev_path(uuid)}/{verb}_{kind}"

    def assign(self, uuid: str, kind: str, id: int) -> None:
        path = self._attr(uuid, "assign", kind)
        with self.locked():
            self._write(path, formats.format_id(kind, id))

    def unassign(self, uuid: str, kind: str, id: int) -> None:
        path = self._attr(uuid, "unassign", kind)
        with self.locked():
            self._write(path, formats.format_id(kind, id))

    # -- all-or-nothing changes -------------------------------------------------------------
    def apply_matrix(self, uuid: str, old: Matrix | None, new: Matrix | None) -> None:
        """Take one mdev from ``old`` to ``new`` (None = absent), or leave it as it was."""
        self.run(self.plan_matrix(uuid, old, new))

    def plan_matrix(
        self, uuid: str, old: Matrix | None, new: Matrix | None, wait: float | None = None
    ) -> list[Write]:
        """The writes that take one mdev from ``old`` to ``new`` (None = absent).

        What goes is unassigned first and what comes assigned after, so every intermediate
        cross product is a subset of ``old`` or of ``new`` and the kernel has no reason to
        refuse one that it would not refuse at the end. A removal is one write, with no
        inverse: an mdev is never re-created to undo anything.
        """
        uuid = normalize_uuid(uuid)
        if old is None and new is None:
            return []
        base = self.mdev_path(uuid)
        if new is None:
            return [Write(f"{base}/remove", "1", wait=wait)]
        steps: list[Write] = []
        if old is None:
            steps.append(Write(f"{self._layout.type_dir}/create", uuid, f"{base}/remove", "1"))
            old = Matrix(uuid)
        if self.features.ap_config and self._layout.name == "upstream":
            # 6.10+: one atomic write; a running guest sees one hot plug, not one per id.
            now, then = ap_config_text(old), ap_config_text(new)
            if now != then:
                steps.append(Write(f"{base}/ap_config", then, f"{base}/ap_config", now))
            return steps
        before = (old.adapters, old.domains, old.control_domains)
        after = (new.adapters, new.domains, new.control_domains)
        for kind, was, will in zip(KINDS, before, after, strict=True):
            for i in sorted(was - will):
                text = formats.format_id(kind, i)
                steps.append(Write(f"{base}/unassign_{kind}", text, f"{base}/assign_{kind}", text))
        for kind, was, will in zip(KINDS, before, after, strict=True):
            for i in sorted(will - was):
                text = formats.format_id(kind, i)
                steps.append(Write(f"{base}/assign_{kind}", text, f"{base}/unassign_{kind}", text))
        return steps

    def read_mdev_sets(self, uuid: str) -> Matrix | None:
        """What one mdev holds now (its assignment, not the guest view); None if absent."""
        uuid = normalize_uuid(uuid)
        try:
            a, d, control = self._read_sets(self.mdev_path(uuid))
        except KernelError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        return Matrix(uuid, a, d, control)

    def set_pool(self, old: HostPool, new: HostPool) -> None:
        """Move APQNs between the host's drivers and vfio, all or nothing."""
        self.run(self.plan_pool(old, new))

    def plan_pool(self, old: HostPool, new: HostPool) -> list[Write]:
        """The writes that move the host pool from ``old`` to ``new`` (reads queue drivers on
        the 2017 layout)."""
        if self._layout.name == "upstream":
            if old.per_queue or new.per_queue:
                raise InvalidArgument("the upstream host pool is two masks, not a queue list")
            return self._mask_steps(old, new)
        if old.queues is None or new.queues is None:
            raise InvalidArgument("the rfc2017 host pool is a queue list, not masks")
        return self._queue_steps(old.queues, new.queues)

    def _mask_steps(self, old: HostPool, new: HostPool) -> list[Write]:
        """Narrow both masks first, then widen: no step can hand back an APQN early.

        Writing ``apmask`` before ``aqmask`` when one gains bits and the other loses them
        would briefly give the host (new adapter x old domain), which the kernel refuses
        with EBUSY if a matrix holds it. Narrowing first avoids that; a pure reserve or
        release is still one write.
        """
        steps: list[Write] = []
        current = {"apmask": old.adapters, "aqmask": old.domains}
        plan = [
            ("apmask", old.adapters & new.adapters),
            ("aqmask", old.domains & new.domains),
            ("apmask", new.adapters),
            ("aqmask", new.domains),
        ]
        for name, ids in plan:
            if ids == current[name]:
                continue
            path = f"{AP_BUS}/{name}"
            steps.append(
                Write(path, formats.format_mask(ids), path, formats.format_mask(current[name]))
            )
            current[name] = ids
        return steps

    def _queue_steps(self, old: frozenset[Apqn], new: frozenset[Apqn]) -> list[Write]:
        """Per-queue driver moves: reserve (host -> vfio) first, then release."""
        moves = [(q, self._layout.vfio_driver) for q in sorted(old - new)]
        moves += [(q, HOST_DRIVER) for q in sorted(new - old)]
        steps: list[Write] = []
        for q, target in moves:
            driver = self._driver_of(f"{AP_DEVICES}/card{q.adapter:02x}/{q}")
            if driver == target:
                continue
            name = str(q)
            if driver is not None:
                unbind, bind = (
                    f"{AP_BUS}/drivers/{driver}/unbind",
                    f"{AP_BUS}/drivers/{driver}/bind",
                )
                steps.append(Write(unbind, name, bind, name))
            bind, unbind = f"{AP_BUS}/drivers/{target}/bind", f"{AP_BUS}/drivers/{target}/unbind"
            steps.append(Write(bind, name, unbind, name))
        return steps

    def write(self, step: Write) -> None:
        """One write of a plan (the caller holds :meth:`locked`)."""
        if step.wait is not None:
            self._write_waiting(step, step.wait)
            return
        self._write(step.path, step.data)
        if self.features.dynamic is None and step.path.endswith("/create"):
            self.detect_features()  # the first mdev tells the generation (for later plans)

    def _write_waiting(self, step: Write, timeout: float) -> None:
        """The write in a thread of its own, waited for up to ``timeout``: the vfio core
        blocks a ``remove`` until the guest lets go, and no signal ends that wait. Given up
        on, the write goes on; :attr:`on_late_write` hears when it returns."""
        done = threading.Event()
        guard = threading.Lock()
        late = False
        result: list[BaseException] = []

        def run() -> None:
            try:
                self._write(step.path, step.data)
            except BaseException as err:  # handed to the caller (a test's crash, too)
                result.append(err)
            with guard:
                done.set()
                tell = late
            if tell and self.on_late_write is not None:
                failed = result[0] if result else None
                self.on_late_write(step, failed if isinstance(failed, KernelError) else None)

        threading.Thread(target=run, name="apmatrixd-guest-release", daemon=True).start()
        done.wait(timeout)
        with guard:
            if not done.is_set():
                late = True
                raise KernelTimeout(
                    step.path,
                    timeout,
                    "a running guest still holds the matrix; the kernel "
                    "removes it once the guest lets go",
                )
        if result:
            raise result[0]

    def in_use(self, uuid: str) -> bool:
        """A guest runs with this mdev: the ``status`` of a queue it gets reads ``in use``.

        A guest whose matrix gives it no queue cannot be seen this way (the kernel shows it
        nowhere else); neither can one before the kernel had ``status`` on queues."""
        return self._status_in_use(self.read_guest(uuid))

    def _status_in_use(self, guest: Iterable[Apqn]) -> bool:
        first = min(guest, default=None)
        if first is None:
            return False
        text = self._read_optional(f"{AP_DEVICES}/card{first.adapter:02x}/{first}/status")
        return text is not None and text.strip() == "in use"

    def undo(self, done: Iterable[Write]) -> list[KernelError]:
        """Undo written steps, newest first; the failures (logged), empty if all went back."""
        failed: list[KernelError] = []
        for step in reversed(list(done)):
            if step.undo_path is None:
                continue
            try:
                self._write(step.undo_path, step.undo_data)
            except KernelError as e:
                log.error("undo failed, sysfs may now differ from the registry: %s", e)
                failed.append(e)
        return failed

    def run(self, steps: list[Write]) -> None:
        """All of ``steps`` under the lock, or none: the done ones undone on a refusal."""
        if not steps:
            return
        with self.locked():
            done: list[Write] = []
            try:
                for step in steps:
                    self.write(step)
                    done.append(step)
            except KernelError:
                self.undo(done)
                raise
