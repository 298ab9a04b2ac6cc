"""Matrices, the host pool and the host's limits: plain values, no behaviour beyond sets."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from apmatrixd.core.apqn import MAX_ID, Apqn, cross
from apmatrixd.core.errors import InvalidArgument, OutOfRange, RangeViolation

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalize_uuid(text: str) -> str:
    """Lower-case 8-4-4-4-12, the way the mdev core names the device directory."""
    if type(text) is str and _CANONICAL.fullmatch(text):
        return text  # already so (every path a change builds asks again): no UUID parsed
    try:
        parsed = uuidlib.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"malformed UUID: {text!r}") from None
    canonical = str(parsed)
    if canonical != text.lower():
        raise InvalidArgument(f"malformed UUID (want 8-4-4-4-12 hex): {text!r}")
    return canonical


def id_set(ids: Iterable[int], what: str) -> frozenset[int]:
    """Ids as a set, refusing anything no 256-bit mask can hold."""
    out = frozenset(ids)
    bad = sorted(i for i in out if not isinstance(i, int) or not 0 <= i <= MAX_ID)
    if bad:
        raise InvalidArgument(f"{what} id out of 0..255: {bad[0]}")
    return out


@dataclass(frozen=True)
class Limits:
    """The highest ids the host accepts (255/255 with APXA, 63/15 without)."""

    max_adapter: int = MAX_ID
    max_domain: int = MAX_ID

    def violations(
        self, adapters: Iterable[int], domains: Iterable[int], control_domains: Iterable[int]
    ) -> list[RangeViolation]:
        out = [
            RangeViolation("adapter", a, self.max_adapter) for a in adapters if a > self.max_adapter
        ]
        for kind, ids in (("domain", domains), ("control domain", control_domains)):
            out += [RangeViolation(kind, d, self.max_domain) for d in ids if d > self.max_domain]
        return sorted(out, key=lambda v: (v.kind, v.id))

    def check(
        self,
        adapters: Iterable[int] = (),
        domains: Iterable[int] = (),
        control_domains: Iterable[int] = (),
    ) -> None:
        bad = self.violations(adapters, domains, control_domains)
        if bad:
            raise OutOfRange(bad)


@dataclass(frozen=True)
class Matrix:
    """One guest's AP configuration: adapters x usage domains, plus control domains."""

    uuid: str
    adapters: frozenset[int] = frozenset()
    domains: frozenset[int] = frozenset()
    control_domains: frozenset[int] = frozenset()
    name: str = ""
    autostart: bool = False

    def apqns(self) -> Iterator[Apqn]:
        return cross(self.adapters, self.domains)

    def with_sets(
        self,
        adapters: Iterable[int] | None = None,
        domains: Iterable[int] | None = None,
        control_domains: Iterable[int] | None = None,
    ) -> Matrix:
        # Every field named: dataclasses.replace() costs a few times the constructor, and each
        # change makes several of these (a test checks no field is left behind).
        return Matrix(
            self.uuid,
            self.adapters if adapters is None else frozenset(adapters),
            self.domains if domains is None else frozenset(domains),
            self.control_domains if control_domains is None else frozenset(control_domains),
            self.name,
            self.autostart,
        )

    @property
    def label(self) -> str:
        return self.name or self.uuid


@dataclass(frozen=True)
class HostPool:
    """APQNs that belong to the host's own crypto drivers (zcrypt), not to vfio_ap.

    Upstream kernels define the pool by two masks: APQN (a, d) is the host's iff a is in
    ``apmask`` and d in ``aqmask``. The 2017 RFC layout reserved queue by queue instead;
    then ``queues`` lists the host-bound queues and the masks are unused.
    """

    adapters: frozenset[int] = field(default_factory=lambda: frozenset(range(MAX_ID + 1)))
    domains: frozenset[int] = field(default_factory=lambda: frozenset(range(MAX_ID + 1)))
    queues: frozenset[Apqn] | None = None

    @property
    def per_queue(self) -> bool:
        return self.queues is not None

    def owns(self, apqn: Apqn) -> bool:
        if self.queues is not None:
            return apqn in self.queues
        return apqn.adapter in self.adapters and apqn.domain in self.domains
