"""The contract between the emulated kernel and its faces (in-process and FUSE).

Paths are relative to the sysfs root with no leading slash, exactly as below ``/sys``:
``devices/ap/card05/online``, ``bus/ap/apmask``, ``devices/vfio_ap/matrix/<uuid>/assign_domain``.
The empty string is the root itself. Every method raises ``OSError`` carrying the errno the
kernel would give (ENOENT, ENOTDIR, EISDIR, EACCES, EINVAL, ENODEV, EADDRINUSE, ...) and
nothing else, so a face can pass ``err.errno`` straight through to ``write(2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

NodeKind = Literal["dir", "file", "link"]


@dataclass(frozen=True)
class Uevent:
    """One kobject uevent, as the kernel would emit it (before udev adds its own keys)."""

    action: str  # add | remove | change | bind | unbind
    devpath: str  # "/devices/ap/card05" (leading slash, no /sys)
    subsystem: str  # "ap", "matrix", "mdev", "ap_matrix" ...
    seqnum: int
    devtype: str | None = None  # "ap_card", "ap_queue", "mdev" ...
    driver: str | None = None  # DRIVER= while bound
    env: dict[str, str] = field(
        default_factory=dict
    )  # extra keys: CONFIG, ONLINE, MODE, APMASK ...

    def properties(self) -> dict[str, str]:
        """All keys in the order the kernel puts them: ACTION, DEVPATH, SUBSYSTEM, ..."""
        props = {"ACTION": self.action, "DEVPATH": self.devpath, "SUBSYSTEM": self.subsystem}
        if self.devtype:
            props["DEVTYPE"] = self.devtype
        if self.driver:
            props["DRIVER"] = self.driver
        props.update(self.env)
        props["SEQNUM"] = str(self.seqnum)
        return props


UeventListener = Callable[[Uevent], None]


class SysfsTree(Protocol):
    """What a face needs from the model. All calls are serialised by the model's own lock."""

    def kind(self, path: str) -> NodeKind: ...

    def mode(self, path: str) -> int:
        """Permission bits as sysfs shows them: 0o444 RO, 0o200 WO, 0o644 RW, 0o755 dirs."""
        ...

    def listdir(self, path: str) -> list[str]: ...

    def readlink(self, path: str) -> str:
        """The link target, relative as sysfs makes it (``../../../bus/ap/drivers/cex4card``)."""
        ...

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, data: bytes) -> int:
        """One ``write(2)`` is one ``store()``: applies it or raises OSError(errno)."""
        ...

    def subscribe(self, listener: UeventListener) -> Callable[[], None]:
        """Call ``listener`` for every uevent from now on; returns the unsubscribe function."""
        ...
