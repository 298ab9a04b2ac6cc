"""Printing: aligned tables and key/value blocks for people, one JSON document for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from apmatrixd.ctl.client import MatrixInfo
from apmatrixd.ctl.ids import format_apqns, format_ids

MANAGED_BY = {
    "apmatrixd": "apmatrixd",
    "mdevctl": "mdevctl (its definition; apmatrixctl take-over to manage it here)",
    "external": "nobody: an mdev made outside apmatrixd (apmatrixctl take-over to manage it)",
}


class Output:
    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stdout

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def lines(self, lines: Sequence[str]) -> None:
        for ln in lines:
            self.line(ln)

    def json(self, doc: Any) -> None:
        self.line(json.dumps(doc, indent=2, sort_keys=False))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [len(h) for h in header]
        for r in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
        for r in [header, *rows]:
            self.line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def matrix_block(m: MatrixInfo) -> list[str]:
    rows = [
        ("Name", m.name or "-"),
        ("UUID", m.uuid),
        ("State", m.state),
        ("Adapters", format_ids(m.adapters)),
        ("Domains", format_ids(m.domains)),
        (
            "Control domains",
            format_ids(m.control_domains)
            + (" (every usage domain is one too)" if m.control_usage_domains else ""),
        ),
        ("APQNs", format_apqns(m.apqns)),
        ("Guest APQNs", format_apqns(m.guest_apqns)),
        ("Autostart", "yes" if m.autostart else "no"),
        ("Managed by", MANAGED_BY.get(m.manager, m.manager)),
        ("Sysfs path", m.sysfs_path or "-"),
        ("In use", "yes, a guest runs with it" if m.in_use else "no"),
    ]
    out = [f"{k + ':':<17}{v}" for k, v in rows]
    if m.lost:
        out.append(f"{'Not given:':<17}{len(m.lost)} APQN{'s' if len(m.lost) != 1 else ''}")
        out += [f"  {a:02x}.{d:04x}  {why}" for a, d, why in m.lost[:32]]
        if len(m.lost) > 32:
            out.append(f"  ... and {len(m.lost) - 32} more (--json lists them all)")
    return out
