"""Adapter and domain ids as a Z admin types and reads them: hex, like lszcrypt and chzdev.

The grammar is :mod:`apmatrixd.core.ids` (the daemon reads declared documents with it too);
this module adds the printing.
"""

from __future__ import annotations

from collections.abc import Iterable

from apmatrixd.core.apqn import format_ids, runs
from apmatrixd.core.ids import NONE, IdError, parse_id, parse_ids


def format_apqn(adapter: int, domain: int) -> str:
    return f"{adapter:02x}.{domain:04x}"


def format_apqns(apqns: Iterable[tuple[int, int]]) -> str:
    return " ".join(format_apqn(a, d) for a, d in sorted(apqns)) or "-"


__all__ = [
    "NONE",
    "IdError",
    "format_apqn",
    "format_apqns",
    "format_ids",
    "parse_id",
    "parse_ids",
    "runs",
]
