"""The emulated host: one LPAR's AP bus and vfio_ap driver behind the ``SysfsTree`` contract.

``Host`` = ``ApKernel`` (state, rules, errnos, uevents; see ``kernel.py`` for the choices
made where the kernel is unknown) + ``Tree`` (the sysfs rendering) + path resolution, the
lock, and fault injection. Every public method takes ``lock`` and raises nothing but
``OSError``: an unexpected internal error is recorded in ``internal_errors`` and surfaces as
``EIO``, so a face can always pass ``err.errno`` to ``write(2)`` and tests can still see it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from apmatrixd.sim.kernel import ApKernel, oserror
from apmatrixd.sim.parse import cstr, kstrtoul
from apmatrixd.sim.profile import profile
from apmatrixd.sim.scenario import Scenario, load_scenario
from apmatrixd.sim.state import Guest
from apmatrixd.sim.tree import Attr, Dir, Link, Node, Tree
from apmatrixd.sim.vfs import NodeKind, UeventListener

P = ParamSpec("P")
R = TypeVar("R")

PAGE_SIZE = 4096
MAX_SYMLINKS = 40
FAULT_ENV = "APMATRIXD_TEST_FAULTS"
"""Test hook of ``apmatrixd --simulate``: kernel writes that fail, as :meth:`Host.inject_fault`.

``PATH:ERRNO[:COUNT]`` entries separated by ``;``, e.g.
``devices/vfio_ap/matrix/<uuid>/assign_domain:EBUSY;bus/ap/aqmask:5:2``: the next COUNT
(default 1) writes to PATH (relative to the sysfs root) fail with ERRNO (a name or a number)
and change nothing. ``PATH:delay=SECONDS[:COUNT]`` makes the next COUNT writes to PATH block
that long first, as a ``remove`` of an mdev QEMU holds open blocks on a real host (the rest of
the tree stays readable meanwhile). Test-only, like ``APMATRIXD_TEST_KILL_AT`` (store.py):
the real kernel is never touched by it."""


def _guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Take the host lock; let OSError through; turn anything else into a recorded EIO."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        host = args[0]
        assert isinstance(host, Host)
        with host.lock:
            try:
                return func(*args, **kwargs)
            except OSError:
                raise
            except Exception as exc:
                host.internal_errors.append(f"{func.__name__}{args[1:]!r}: {exc!r}")
                raise OSError(errno.EIO, f"emulator internal error: {exc!r}") from exc

    return wrapper


class Host(ApKernel):
    """An emulated LPAR. Implements ``apmatrixd.sim.vfs.SysfsTree``."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.tree = Tree(self, (self.control_text, self.control_store))
        # What /proc/sys/kernel/random/boot_id is to a real host: new at every boot.
        self.boot_id = str(uuidlib.uuid4())
        self.faults: dict[str, deque[int]] = {}
        self.delays: dict[str, deque[float]] = {}
        self.internal_errors: list[str] = []

    @classmethod
    def from_name(cls, name_or_path: str) -> Host:
        """A host booted from a built-in scenario name or a scenario file; ``NAME@KERNEL``
        (``default@5.15``) boots it on another kernel generation."""
        name, at, kernel = name_or_path.rpartition("@") if "@" in name_or_path else ("", "", "")
        if not at:
            return cls(load_scenario(name_or_path))
        profile(kernel)
        return cls(dataclasses.replace(load_scenario(name), kernel=kernel))

    # ----------------------------------------------------------------- names

    @property
    def matrix_dir(self) -> str:
        """``devices/vfio_ap/matrix`` (upstream) or ``devices/ap_matrix/matrix`` (rfc2017)."""
        return self.tree.matrix_dir

    @property
    def mdev_type(self) -> str:
        """``vfio_ap-passthrough`` or ``ap_matrix-passthrough``."""
        return self.names.mdev_type

    @property
    def mdev_type_dir(self) -> str:
        return f"{self.matrix_dir}/mdev_supported_types/{self.names.mdev_type}"

    @property
    def queue_driver_name(self) -> str:
        """The AP-bus driver of queues given to guests: ``vfio_ap`` or ``vfio_ap_matrix``."""
        return self.names.queue_driver

    def mdev_dir(self, uuid: str) -> str:
        return f"{self.matrix_dir}/{uuid}"

    # ----------------------------------------------------------------- resolution

    @staticmethod
    def _split(path: str) -> list[str]:
        if not isinstance(path, str):
            raise oserror(errno.EINVAL, f"path must be a string, not {type(path).__name__}")
        return path.split("/")

    def _walk(self, path: str, follow: bool) -> tuple[list[str], Node]:
        """Resolve like the VFS: ``..`` and symlinks in the middle; the last link if ``follow``."""
        names = self._split(path)
        node: Node = self.tree.root()
        for name in names:  # most paths are plain names and no link: straight down
            if name in ("", ".", "..") or not isinstance(node, Dir):
                break
            child = node.child(name)
            if child is None or isinstance(child, Link):
                break
            node = child
        else:
            return names, node
        return self._walk_links(names, follow)

    def _walk_links(self, parts: list[str], follow: bool) -> tuple[list[str], Node]:
        """The general walk, from the root again: dots, and links followed as they come."""
        comps = deque(parts)
        names: list[str] = []
        nodes: list[Node] = [self.tree.root()]
        hops = 0
        while comps:
            name = comps.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if names:
                    names.pop()
                    nodes.pop()
                continue
            here = nodes[-1]
            if not isinstance(here, Dir):
                raise oserror(errno.ENOTDIR)
            child = here.child(name)
            if child is None:
                raise oserror(errno.ENOENT)
            if isinstance(child, Link) and (comps or follow):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise oserror(errno.ELOOP)
                comps.extendleft(reversed(child.target.split("/")))
                continue
            names.append(name)
            nodes.append(child)
        return names, nodes[-1]

    # ----------------------------------------------------------------- SysfsTree

    @_guarded
    def kind(self, path: str) -> NodeKind:
        node = self._walk(path, follow=False)[1]
        if isinstance(node, Dir):
            return "dir"
        return "link" if isinstance(node, Link) else "file"

    @_guarded
    def mode(self, path: str) -> int:
        """0o755 dirs, 0o777 links, 0o444 / 0o200 / 0o644 attributes."""
        node = self._walk(path, follow=False)[1]
        if isinstance(node, Dir):
            return 0o755
        return 0o777 if isinstance(node, Link) else node.mode

    @_guarded
    def listdir(self, path: str) -> list[str]:
        node = self._walk(path, follow=True)[1]
        if not isinstance(node, Dir):
            raise oserror(errno.ENOTDIR)
        return node.names()

    @_guarded
    def readlink(self, path: str) -> str:
        node = self._walk(path, follow=False)[1]
        if not isinstance(node, Link):
            raise oserror(errno.EINVAL)
        return node.target

    @_guarded
    def exists(self, path: str) -> bool:
        """True if ``path`` resolves (following links), for tests and faces."""
        try:
            self._walk(path, follow=True)
        except OSError:
            return False
        return True

    def _attr(self, path: str) -> tuple[str, Attr]:
        names, node = self._walk(path, follow=True)
        if isinstance(node, Dir):
            raise oserror(errno.EISDIR)
        assert isinstance(node, Attr)
        return "/".join(names), node

    @_guarded
    def read(self, path: str) -> bytes:
        """One ``show()``: the whole attribute (EACCES for write-only attributes)."""
        attr = self._attr(path)[1]
        if attr.show is None:
            raise oserror(errno.EACCES)
        return attr.show().encode("latin-1")

    def write(self, path: str, data: bytes) -> int:
        """One ``store()``: EACCES for read-only attributes; at most a page is taken.

        An armed delay (:meth:`inject_delay`) blocks first, without the host lock. On 6.0+ a
        ``remove`` of an mdev a guest holds blocks until the guest lets go (the vfio core
        asks QEMU for the device and waits), with the lock released meanwhile."""
        # No delay armed, no guest running (the common case): no lock taken to find that out.
        # One armed or started meanwhile races with this write as before: the checks and the
        # store never were one hold of the lock.
        delay = self._take_delay(path) if self.delays else 0.0
        if delay > 0:
            time.sleep(delay)
        held = self._remove_waits_for(path, data) if self.guests else None
        if held is not None:
            self._wait_released(held)
        return self._store(path, data)

    @_guarded
    def _remove_waits_for(self, path: str, data: bytes) -> str | None:
        if not self.guests or not self.profile.dynamic:
            return None
        try:
            names = self._walk(path, follow=True)[0]
        except OSError:
            return None
        matrix = self.matrix_dir.split("/")
        if len(names) != len(matrix) + 2 or names[:-2] != matrix or names[-1] != "remove":
            return None
        uuid = names[-2]
        try:
            value = kstrtoul(cstr(bytes(data))[:PAGE_SIZE])
        except (OSError, TypeError):
            return None
        return uuid if value and uuid in self.guests else None

    def _wait_released(self, uuid: str) -> None:
        """The vfio core's wait in ``vfio_unregister_group_dev``: ask, then wait for release.

        The guest's ``release_after`` stands for QEMU's own unplug; without one only
        :meth:`detach_guest` ends the wait, as on a real host whose QEMU ignores the request."""
        with self.lock:
            guest = self.guests.get(uuid)
            if guest is None:
                return
            guest.requests += 1
            self.dmesg.append(f"vfio_ap_mdev {uuid}: device in use, asking the guest to release")
            start = time.monotonic()
            while uuid in self.guests:
                left = None
                if guest.release_after is not None:
                    left = guest.release_after - (time.monotonic() - start)
                    if left <= 0:
                        self._detach(uuid)
                        break
                self.released.wait(0.5 if left is None else min(left, 0.5))

    @_guarded
    def _take_delay(self, path: str) -> float:
        if not self.delays:
            return 0.0
        canonical = self._attr(path)[0]
        for key in (canonical, self._norm(path)):
            queue = self.delays.get(key)
            if queue:
                return queue.popleft()
        return 0.0

    @_guarded
    def _store(self, path: str, data: bytes) -> int:
        canonical, attr = self._attr(path)
        if attr.store is None:
            raise oserror(errno.EACCES)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise oserror(errno.EINVAL, "data must be bytes")
        buf = bytes(data)
        self._take_fault(canonical, path)
        if not buf:
            return 0
        buf = buf[:PAGE_SIZE]
        if self.guests:
            before = self.guest_views()
            try:
                attr.store(buf)
            finally:
                self.count_updates(before)
        else:
            attr.store(buf)
        return len(buf)

    def subscribe(self, listener: UeventListener) -> Callable[[], None]:
        return super().subscribe(listener)

    # ----------------------------------------------------------------- test hooks

    @staticmethod
    def _norm(path: str) -> str:
        return "/".join(p for p in path.split("/") if p not in ("", "."))

    @_guarded
    def inject_fault(self, path: str, err: int, count: int = 1) -> None:
        """The next ``count`` writes to ``path`` fail with ``OSError(err)`` and change nothing."""
        self._split(path)
        if not isinstance(err, int) or isinstance(err, bool) or not 0 < err < 4096:
            raise oserror(errno.EINVAL, f"errno must be a positive int, not {err!r}")
        if not isinstance(count, int) or count < 0:
            raise oserror(errno.EINVAL, f"count must be an int >= 0, not {count!r}")
        queue = self.faults.setdefault(self._norm(path), deque())
        queue.extend([err] * count)

    @_guarded
    def inject_delay(self, path: str, seconds: float, count: int = 1) -> None:
        """The next ``count`` writes to ``path`` block ``seconds`` before they are stored."""
        self._split(path)
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
            raise oserror(errno.EINVAL, f"delay must be 0..3600 seconds, not {seconds!r}")
        if not isinstance(count, int) or count < 0:
            raise oserror(errno.EINVAL, f"count must be an int >= 0, not {count!r}")
        self.delays.setdefault(self._norm(path), deque()).extend([float(seconds)] * count)

    def inject_faults_from_env(self, text: str) -> list[str]:
        """Arm the faults of a :data:`FAULT_ENV` value; the entries armed (ValueError if bad)."""
        armed = []
        for entry in filter(None, (e.strip() for e in text.split(";"))):
            path, _, rest = entry.partition(":")
            code, _, count = rest.partition(":")
            if code.startswith("delay="):
                try:
                    seconds = float(code[len("delay=") :])
                except ValueError:
                    raise ValueError(f"{FAULT_ENV}: bad delay in {entry!r}") from None
                if not path or not (count or "1").isdigit():
                    raise ValueError(f"{FAULT_ENV}: bad entry {entry!r} (want PATH:delay=S[:N])")
                self.inject_delay(path, seconds, int(count or 1))
                armed.append(entry)
                continue
            num = int(code) if code.isdigit() else getattr(errno, code, None)
            if not path or not isinstance(num, int) or not (count or "1").isdigit():
                raise ValueError(f"{FAULT_ENV}: bad entry {entry!r} (want PATH:ERRNO[:COUNT])")
            self.inject_fault(path, num, int(count or 1))
            armed.append(entry)
        return armed

    def _take_fault(self, canonical: str, path: str) -> None:
        if not self.faults:
            return
        for key in (canonical, self._norm(path)):
            queue = self.faults.get(key)
            if queue:
                err = queue.popleft()
                raise oserror(err)

    # ----------------------------------------------------------------- running guests

    @_guarded
    def attach_guest(self, uuid: str, release_after: float | None = None) -> None:
        """A guest starts with mdev ``uuid`` (QEMU opens it; KVM gets its APCB).

        ``release_after``: seconds QEMU takes to let go once the kernel asks (a ``remove``
        on 6.0+); None: it lets go only on :meth:`detach_guest`."""
        if not isinstance(uuid, str) or uuid not in self.mdevs:
            raise oserror(errno.ENOENT, f"no mdev {uuid!r}")
        if uuid in self.guests:
            raise oserror(errno.EBUSY, f"mdev {uuid} is already in use by a guest")
        if release_after is not None and (
            not isinstance(release_after, int | float) or not 0 <= release_after <= 3600
        ):
            raise oserror(errno.EINVAL, f"release_after must be 0..3600 s, not {release_after!r}")
        m = self.mdevs[uuid]
        apcb = (frozenset(m.apm), frozenset(m.aqm), frozenset(m.adm))
        self.guests[uuid] = Guest(uuid, release_after, apcb)

    @_guarded
    def detach_guest(self, uuid: str) -> None:
        """The guest stops or QEMU unplugs the device: a waiting ``remove`` goes on."""
        if uuid not in self.guests:
            raise oserror(errno.ENOENT, f"no guest holds mdev {uuid!r}")
        self._detach(uuid)

    def _detach(self, uuid: str) -> None:
        del self.guests[uuid]
        self.released.notify_all()

    @_guarded
    def guest(self, uuid: str) -> Guest | None:
        """The guest holding ``uuid`` (its update and request counters), if any."""
        return self.guests.get(uuid)

    def control_store(self, data: bytes) -> None:
        """The FUSE face's ``.apmatrixd-sim`` file: ``attach UUID [SECONDS]`` / ``detach UUID``
        (what ``apmatrixd-sim guest`` writes; the in-process face calls the methods)."""
        words = cstr(data).decode("ascii", "replace").split()
        if len(words) in (2, 3) and words[0] == "attach":
            try:
                after = float(words[2]) if len(words) == 3 else None
            except ValueError:
                raise oserror(errno.EINVAL) from None
            self.attach_guest(words[1], after)
        elif len(words) == 2 and words[0] == "detach":
            self.detach_guest(words[1])
        else:
            raise oserror(errno.EINVAL)

    def control_text(self) -> str:
        return "".join(
            f"{g.uuid} release_after={g.release_after} updates={g.updates} "
            f"requests={g.requests}\n"
            for g in self.guests.values()
        )

    # ----------------------------------------------------------------- hot plug (guarded)

    @_guarded
    def plug_adapter(self, id: int, type: str = "CEX8C") -> None:
        """Adapter ``id`` of ``type`` enters the LPAR: card and queues added and bound."""
        super().plug_adapter(id, type)

    @_guarded
    def unplug_adapter(self, id: int) -> None:
        """Adapter ``id`` leaves the LPAR: its queues and card are unbound and removed."""
        super().unplug_adapter(id)

    @_guarded
    def plug_domain(self, id: int) -> None:
        """Usage domain ``id`` enters the LPAR's AQM: a queue appears on every card."""
        super().plug_domain(id)

    @_guarded
    def unplug_domain(self, id: int) -> None:
        """Usage domain ``id`` leaves the LPAR's AQM: its queues vanish."""
        super().unplug_domain(id)

    @_guarded
    def scan(self) -> None:
        """One AP bus scan (what ``config_time`` would trigger): may send BINDINGS=complete."""
        super().scan()

    @_guarded
    def mdev_uuids(self) -> list[str]:
        """The live mdevs, in creation order."""
        return list(self.mdevs)
