"""APQNs and id sets, in the notation the kernel and lszcrypt use (``05.0004``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from apmatrixd.core.errors import InvalidArgument

MAX_ID = 255
"""Highest adapter or domain id any AP mask can hold (masks are 256 bits)."""


class Apqn(NamedTuple):
    """One AP queue: an (adapter, domain) pair."""

    adapter: int
    domain: int

    def __str__(self) -> str:
        return f"{self.adapter:02x}.{self.domain:04x}"

    @classmethod
    def parse(cls, text: str) -> Apqn:
        """Read ``05.0004`` (hex, as sysfs names queues)."""
        try:
            a, d = text.strip().split(".")
            apqn = cls(int(a, 16), int(d, 16))
        except ValueError:
            raise InvalidArgument(f"not an APQN (want AA.DDDD in hex): {text!r}") from None
        if not (0 <= apqn.adapter <= MAX_ID and 0 <= apqn.domain <= MAX_ID):
            raise InvalidArgument(f"APQN out of range: {text!r}")
        return apqn


def cross(adapters: Iterable[int], domains: Iterable[int]) -> Iterator[Apqn]:
    """Every APQN a matrix of these adapters and domains hands to its guest."""
    doms = sorted(domains)
    for a in sorted(adapters):
        for d in doms:
            yield Apqn(a, d)


def runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs: [4, 5, 6, 9] -> [(4, 6), (9, 9)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def format_ids(ids: Iterable[int], empty: str = "-") -> str:
    """Ids as a Z admin reads them everywhere (messages, logs, Drift, apmatrixctl): two hex
    digits as lszcrypt prints them, runs of three or more as ranges (``04-07,47``)."""
    parts: list[str] = []
    for lo, hi in runs(ids):
        if hi - lo >= 2:
            parts.append(f"{lo:02x}-{hi:02x}")
        else:
            parts.extend(f"{i:02x}" for i in range(lo, hi + 1))
    return ",".join(parts) or empty
