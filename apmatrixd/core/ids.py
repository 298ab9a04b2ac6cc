"""Adapter and domain ids as a Z admin types them: hex, like lszcrypt and chzdev.

Grammar (every number is hexadecimal, with or without ``0x``)::

    IDS   = ITEM *("," ITEM)          e.g. 5   05   0x05   4-7   4,0x47   00-3f,ff
    ITEM  = ID / ID "-" ID            a range includes both ends and must not run backwards
    ID    = ["0x"] 1*4HEXDIG          value 00 .. ff

``none`` is the empty set (for ``update``). A bare ``47`` is 0x47 = 71, as lszcrypt prints it.
Here in the core because apmatrixctl and the daemon (declared documents) read the same ids.
"""

from __future__ import annotations

import re

from apmatrixd.core.apqn import MAX_ID

_ID = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,4})")
NONE = "none"


class IdError(ValueError):
    """A malformed id list (a usage error: exit 2)."""


def parse_id(text: str) -> int:
    m = _ID.fullmatch(text.strip())
    if m is None:
        raise IdError(f"not a hex id: {text.strip()!r} (write 5, 05 or 0x05)")
    value = int(m.group(1), 16)
    if value > MAX_ID:
        raise IdError(f"id {text.strip()!r} is above ff")
    return value


def parse_ids(text: str, allow_none: bool = False) -> frozenset[int]:
    """``4-7,0x47`` -> {4, 5, 6, 7, 0x47}. Raises :class:`IdError`."""
    if allow_none and text.strip().lower() == NONE:
        return frozenset()
    out: set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        if sep and (lo != lo.rstrip() or hi != hi.lstrip()):
            raise IdError(f"no spaces inside a range: {item.strip()!r} (write 4-7)")
        if sep and not lo.strip():
            raise IdError(f"{item.strip()!r}: ids are never negative; a range is written 4-7")
        if not item.strip():
            raise IdError(f"an empty id in {text.strip()!r} (write 4,7 or 4-7)")
        if sep and not hi.strip():
            raise IdError(f"{item.strip()!r}: a range needs its last id (write 4-7)")
        first = parse_id(lo)
        last = parse_id(hi) if sep else first
        if last < first:
            raise IdError(f"range runs backwards: {item.strip()!r}")
        out.update(range(first, last + 1))
    return frozenset(out)
