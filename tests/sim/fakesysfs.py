"""A tiny SysfsTree with hooks the real model has no reason to offer.

It pins down the faces' own behaviour (one store per write, a value that changes on every
``show()``, counting calls) independently of the model's rules.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from apmatrixd.sim.vfs import NodeKind, Uevent, UeventListener

Store = Callable[[bytes], None]


class FakeTree:
    """Dirs, links and attributes in dicts; attributes have a value and an optional store."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.dirs: set[str] = {""}
        self.links: dict[str, str] = {}
        self.values: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.stores: dict[str, Store] = {}
        self.listeners: list[UeventListener] = []
        self.stores_called: list[tuple[str, bytes]] = []
        self.show_count = 0
        self.seqnum = 0
        self._build()

    # -- building -----------------------------------------------------------------------------
    def add_dir(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            self.dirs.add("/".join(parts[:i]))

    def add_file(
        self, path: str, value: bytes, mode: int = 0o444, store: Store | None = None
    ) -> None:
        self.add_dir(path.rpartition("/")[0])
        self.values[path] = value
        self.modes[path] = mode
        if store is not None:
            self.stores[path] = store

    def _build(self) -> None:
        card = "devices/ap/card05"
        self.add_file(f"{card}/type", b"CEX5C\n")
        self.add_file(f"{card}/config", b"1\n", 0o644, self._store_config)
        self.add_file(f"{card}/assign", b"", 0o200, self._store_assign)
        self.add_file("devices/ap/create", b"", 0o200, self._store_create)
        self.add_file("devices/ap/ticker", b"", 0o444)
        self.add_dir("bus/ap/devices")
        self.links["bus/ap/devices/card05"] = "../../../devices/ap/card05"

    # -- behaviour ----------------------------------------------------------------------------
    def _emit(self, action: str, devpath: str, env: dict[str, str]) -> None:
        self.seqnum += 1
        event = Uevent(action, devpath, "ap", self.seqnum, devtype="ap_card", env=env)
        for listener in list(self.listeners):
            listener(event)

    def _store_config(self, data: bytes) -> None:
        value = data.strip()
        if value not in (b"0", b"1"):
            raise OSError(errno.EINVAL, "config")
        self.values["devices/ap/card05/config"] = value + b"\n"
        self._emit("change", "/devices/ap/card05", {"CONFIG": value.decode()})

    def _store_assign(self, data: bytes) -> None:
        try:
            n = int(data.strip(), 0)
        except ValueError:
            raise OSError(errno.EINVAL, "assign") from None
        if n > 255:
            raise OSError(errno.ENODEV, "assign")
        if n == 4:
            raise OSError(errno.EADDRINUSE, "assign")

    def _store_create(self, data: bytes) -> None:
        name = data.strip().decode()
        if not name or "/" in name:
            raise OSError(errno.EINVAL, "create")
        if f"devices/ap/{name}" in self.dirs:
            raise OSError(errno.EEXIST, "create")
        self.add_file(f"devices/ap/{name}/remove", b"", 0o200)
        self._emit("add", f"/devices/ap/{name}", {})

    # -- SysfsTree ----------------------------------------------------------------------------
    def _check(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent in self.values:
            raise OSError(errno.ENOTDIR, path)
        if path not in self.dirs and path not in self.values and path not in self.links:
            raise OSError(errno.ENOENT, path)

    def kind(self, path: str) -> NodeKind:
        self._check(path)
        if path in self.dirs:
            return "dir"
        return "link" if path in self.links else "file"

    def mode(self, path: str) -> int:
        kind = self.kind(path)
        if kind == "dir":
            return 0o755
        return 0o777 if kind == "link" else self.modes[path]

    def listdir(self, path: str) -> list[str]:
        if self.kind(path) != "dir":
            raise OSError(errno.ENOTDIR, path)
        prefix = f"{path}/" if path else ""
        names = {
            p[len(prefix) :].split("/")[0]
            for p in (*self.dirs, *self.values, *self.links)
            if p.startswith(prefix) and p != path
        }
        return sorted(names)

    def readlink(self, path: str) -> str:
        if self.kind(path) != "link":
            raise OSError(errno.EINVAL, path)
        return self.links[path]

    def read(self, path: str) -> bytes:
        kind = self.kind(path)
        if kind == "dir":
            raise OSError(errno.EISDIR, path)
        if not self.modes[path] & 0o444:
            raise OSError(errno.EACCES, path)
        self.show_count += 1
        if path == "devices/ap/ticker":  # a different, long value on every show()
            return (f"{self.show_count:08d}\n" * 1000).encode()
        return self.values[path]

    def write(self, path: str, data: bytes) -> int:
        kind = self.kind(path)
        if kind == "dir":
            raise OSError(errno.EISDIR, path)
        store = self.stores.get(path)
        if store is None:
            raise OSError(errno.EACCES, path)
        self.stores_called.append((path, data))
        store(data)
        return len(data)

    def subscribe(self, listener: UeventListener) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)
