"""Typed refusals. Each maps to one named D-Bus error and one kernel errno.

The registry raises these before anything is written, so a caller always learns which
APQNs clash and who owns them instead of a bare errno from sysfs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from apmatrixd.core.apqn import Apqn

HOST = "host"
"""Owner name of APQNs that belong to the host's own crypto drivers."""


class Clash(NamedTuple):
    """An APQN a change wants, and who holds it now (a matrix UUID or ``host``).

    A named tuple, not a dataclass: a whole-host Check answers with 65,536 of them, and a
    tuple is built, sorted (by APQN, owner, name, as the frozen dataclass was) and unpacked
    in C, several times faster.
    """

    apqn: Apqn
    owner: str
    owner_name: str = ""

    def __str__(self) -> str:
        who = self.owner
        if self.owner_name and self.owner_name != self.owner:
            who = f"{self.owner_name} ({self.owner})"
        return f"{self.apqn} owned by {who}"


class ApmatrixError(Exception):
    """Base of every refusal apmatrixd gives; ``name`` is the D-Bus error suffix."""

    name = "Failed"


class InvalidArgument(ApmatrixError):
    name = "InvalidArgument"


@dataclass(frozen=True)
class RangeViolation:
    kind: str  # "adapter" | "domain" | "control domain"
    id: int
    maximum: int

    def __str__(self) -> str:
        return f"{self.kind} {self.id:#04x} > max {self.maximum:#04x}"


class OutOfRange(InvalidArgument):
    """An id above the host's maximum (the kernel says ENODEV)."""

    def __init__(self, violations: list[RangeViolation], context: str = "") -> None:
        self.violations = violations
        prefix = f"{context}: " if context else ""
        super().__init__(prefix + "id out of range: " + ", ".join(map(str, violations)))


class NotFound(ApmatrixError):
    name = "NotFound"


class AlreadyExists(ApmatrixError):
    name = "AlreadyExists"


class _ClashError(ApmatrixError):
    what = "clash"
    also = ""
    """How the clashes of the other kind are introduced, when a change has both (the error is
    named after one kind; the text names every APQN under the kind it really is)."""

    def __init__(self, clashes: list[Clash], context: str = "") -> None:
        self.clashes = sorted(clashes)
        mine = [c for c in self.clashes if self._mine(c)]
        other = [c for c in self.clashes if not self._mine(c)]
        prefix = f"{context}: " if context else ""
        text = f"{prefix}{self.what}: {_listed(mine)}"
        if other and self.also:
            text += f"; {self.also}: {_listed(other)}"
        super().__init__(text)

    def _mine(self, clash: Clash) -> bool:
        return True


def _listed(clashes: list[Clash]) -> str:
    more = f"; and {len(clashes) - 32} more" if len(clashes) > 32 else ""
    return "; ".join(map(str, clashes[:32])) + more


class Conflict(_ClashError):
    """APQNs already held by another matrix (the kernel says EADDRINUSE)."""

    name = "Conflict"
    what = "APQNs already in use"
    also = "and still belonging to the host"

    def _mine(self, clash: Clash) -> bool:
        return clash.owner != "host"


class HostOwned(_ClashError):
    """APQNs still in the host pool (the kernel says EADDRNOTAVAIL)."""

    name = "HostOwned"
    what = "APQNs still belong to the host"
    also = "and already in use"

    def _mine(self, clash: Clash) -> bool:
        return clash.owner == "host"


class Busy(_ClashError):
    """The host pool would take back APQNs a matrix holds (the kernel says EBUSY)."""

    name = "Busy"
    what = "APQNs are held by matrices"


class Unavailable(ApmatrixError):
    """A kernel before 6.0 assigns only queues bound to vfio_ap (it says EADDRNOTAVAIL)."""

    name = "Unavailable"

    def __init__(self, missing: list[str], context: str = "") -> None:
        self.missing = missing
        shown = ", ".join(missing[:32]) + (
            f", and {len(missing) - 32} more" if len(missing) > 32 else ""
        )
        prefix = f"{context}: " if context else ""
        super().__init__(
            f"{prefix}this kernel (before 6.0) assigns only queues that exist and are bound "
            f"to vfio_ap; missing: {shown}"
        )


class GuestRunning(ApmatrixError):
    """A guest holds the matrix: Stop/Remove need force; before 6.0 nothing may change."""

    name = "Busy"


class DriverOverride(ApmatrixError):
    """Queues bound by ``driver_override`` (6.19+): the masks cannot change, and a matrix
    may not claim a queue overridden to another driver."""

    name = "DriverOverride"

    def __init__(self, overrides: list[tuple[str, str]], what: str) -> None:
        self.overrides = overrides
        shown = ", ".join(f"{q} -> {drv}" for q, drv in overrides[:32])
        more = f", and {len(overrides) - 32} more" if len(overrides) > 32 else ""
        super().__init__(f"{what}: queues bound by driver_override: {shown}{more}")


class NotManaged(ApmatrixError):
    """The matrix is managed by mdevctl or by someone else (an mdev made outside apmatrixd):
    apmatrixd changes, starts, stops or removes only its own, unless an admin takes it over."""

    name = "NotManaged"


class Timeout(ApmatrixError):
    """The kernel did not finish in time (a guest that does not let go of its matrix)."""

    name = "Timeout"


RANK = (
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "NotManaged",
    "HostOwned",
    "Conflict",
    "Busy",
    "Unavailable",
    "DriverOverride",
)
"""Which refusal names several problems of one change: the most basic first (a typo before
an ownership question), as :data:`apmatrixd.service.ops.ORDER` does for one decision."""


class Refusals(ApmatrixError):
    """Several problems of one change (a declared document), each with where it is, in one
    refusal named after the most basic of them; the text lists every one."""

    def __init__(self, problems: list[tuple[str, ApmatrixError]]) -> None:
        self.problems = problems
        names = [err.name for _where, err in problems]
        self.name = min(names, key=lambda n: RANK.index(n) if n in RANK else len(RANK))
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''}: " if n > 1 else ""
        super().__init__(head + "; ".join(f"{where}: {err}" for where, err in problems))
