"""ASCII pictures: who owns every APQN of the host (adapters down, domains across), a proposed
change drawn over it with the clashing cells marked, and what one guest really gets.

Only the adapters and domains that matter are drawn (present on the host, held by a matrix, or
in the proposal). Consecutive ids whose rows (columns) look the same are drawn once with a range
label (``07-ff``), and columns that still do not fit in the width go on to further pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from apmatrixd.ctl.client import MatrixInfo, Snapshot
from apmatrixd.ctl.ids import format_ids

HOST = "#"
FREE = "."
ABSENT = "-"
CLASH = "!"
GRANT = "+"
KEPT = "="
"""A proposed APQN the matrix being changed already holds."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
MANY = "*"
"""The symbol of every matrix past the 62nd."""

GUEST = "G"
NOT_GIVEN = "o"

WIDTH = 80
MAX_ROWS = 24
"""More adapters than this, and runs of adapters that look the same are drawn as one row."""


# -- the grid -------------------------------------------------------------------------------------
def _label(lo: int, hi: int) -> str:
    return f"{lo:02x}" if lo == hi else f"{lo:02x}-{hi:02x}"


def _merge(ids: list[int], key: Callable[[int], tuple[str, ...]]) -> list[tuple[int, int]]:
    """Runs of consecutive ids with the same key, as (first, last)."""
    out: list[tuple[int, int]] = []
    last_key: tuple[str, ...] | None = None
    for i in ids:
        k = key(i)
        if out and out[-1][1] == i - 1 and k == last_key:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
        last_key = k
    return out


def grid(
    rows: Iterable[int],
    cols: Iterable[int],
    cell: Callable[[int, int], str],
    width: int = WIDTH,
    corner: str = "",
) -> list[str]:
    """Lines of an adapters x domains grid; ``cell(adapter, domain)`` gives 1 or 2 characters."""
    rs, cs = sorted(set(rows)), sorted(set(cols))
    if not rs or not cs:
        return ["(nothing to draw)"]
    # Merge only what needs it: a small host keeps every adapter and domain in sight.
    if len(rs) > MAX_ROWS:
        rgroups = _merge(rs, lambda a: tuple(cell(a, d) for d in cs))
    else:
        rgroups = [(a, a) for a in rs]
    cellw = max(len(cell(lo, d)) for lo, _ in rgroups for d in cs[:1])
    if max(len(corner), 5) + len(cs) * (max(2, cellw) + 1) > width:
        cgroups = _merge(cs, lambda d: tuple(cell(lo, d) for lo, _ in rgroups))
    else:
        cgroups = [(d, d) for d in cs]
    rlabels = [_label(lo, hi) for lo, hi in rgroups]
    lw = max(len(corner), *map(len, rlabels))
    clabels = [_label(lo, hi) for lo, hi in cgroups]
    cw = [
        max(len(lab), *(len(cell(lo, c0)) for lo, _ in rgroups))
        for lab, (c0, _) in zip(clabels, cgroups, strict=True)
    ]

    def fits(idx: list[int], sep: int) -> bool:
        return lw + sum(cw[i] + sep for i in idx) <= width

    everything = list(range(len(cgroups)))
    sep = 2 if fits(everything, 2) else 1
    pages: list[list[int]] = [[]]
    for i in everything:
        if pages[-1] and not fits([*pages[-1], i], sep):
            pages.append([])
        pages[-1].append(i)
    out: list[str] = []
    gap = " " * sep
    for n, page in enumerate(pages):
        if n:
            out.append("")
        out.append(
            (corner.ljust(lw) + "".join(gap + clabels[i].rjust(cw[i]) for i in page)).rstrip()
        )
        for (lo, _), rl in zip(rgroups, rlabels, strict=True):
            cells = "".join(gap + cell(lo, cgroups[i][0]).rjust(cw[i]) for i in page)
            out.append((rl.rjust(lw) + cells).rstrip())
    return out


def pack(items: list[str], width: int = WIDTH, indent: str = "  ") -> list[str]:
    """Legend items on as few lines as fit."""
    lines: list[str] = []
    cur = ""
    for it in items:
        if cur and len(indent) + len(cur) + 3 + len(it) > width:
            lines.append(indent + cur)
            cur = ""
        cur = f"{cur}   {it}" if cur else it
    if cur:
        lines.append(indent + cur)
    return lines


# -- the host's picture -------------------------------------------------------------------------
@dataclass(frozen=True)
class Proposal:
    """A change to draw over the host: its APQNs and the clashes the daemon named."""

    adapters: frozenset[int]
    domains: frozenset[int]
    matrix: str  # the UUID being changed, or ""
    clashes: dict[tuple[int, int], str]  # APQN -> owner (UUID or "host")


class HostPicture:
    """Who owns each APQN: ``host``, ``free``, ``absent`` or a matrix UUID."""

    def __init__(self, snap: Snapshot, proposal: Proposal | None = None) -> None:
        self.snap = snap
        self.proposal = proposal
        self.letters: dict[str, str] = {}
        for i, m in enumerate(snap.sorted_matrices()):
            self.letters[m.uuid] = LETTERS[i] if i < len(LETTERS) else MANY
        self.held: dict[tuple[int, int], str] = {}
        for m in snap.matrices.values():
            for apqn in m.apqns:
                self.held[apqn] = m.uuid
        for a in snap.adapters.values():
            for d, owner in a.owners.items():
                self.held.setdefault((a.id, d), owner)
        rows = set(snap.adapters)
        cols = {d for a in snap.adapters.values() for d in a.domains}
        for m in snap.matrices.values():
            rows |= m.adapters
            cols |= m.domains
        if proposal is not None:
            rows |= proposal.adapters
            cols |= proposal.domains
            for apqn in proposal.clashes:
                rows.add(apqn[0])
                cols.add(apqn[1])
        self.rows = sorted(rows)
        self.cols = sorted(cols)

    def owner(self, a: int, d: int) -> str:
        if (a, d) in self.held:
            return self.held[(a, d)]
        if self.proposal is not None and (a, d) in self.proposal.clashes:
            return self.proposal.clashes[(a, d)]
        ad = self.snap.adapters.get(a)
        if ad is None or d not in ad.domains:
            return "absent"
        host = self.snap.host
        if a in host.host_adapters and d in host.host_domains:
            return "host"
        return "free"

    def symbol(self, a: int, d: int) -> str:
        owner = self.owner(a, d)
        sym = {"host": HOST, "free": FREE, "absent": ABSENT}.get(owner) or self.letters.get(
            owner, MANY
        )
        p = self.proposal
        if p is None:
            return sym
        if (a, d) in p.clashes:
            return sym + CLASH
        if a in p.adapters and d in p.domains:
            return sym + (KEPT if p.matrix and owner == p.matrix else GRANT)
        return sym + " "

    def lines(self, width: int = WIDTH) -> list[str]:
        host = self.snap.host
        if not self.rows:
            return [f"Host ({host.layout}): no adapters"]
        n_a, n_d = len(self.snap.adapters), len({d for r in self.rows for d in self._present(r)})
        out = [
            f"Host ({host.layout}): {n_a} adapter{'s' * (n_a != 1)}, "
            f"{n_d} domain{'s' * (n_d != 1)}; adapters down, domains across",
            "",
        ]
        out += grid(self.rows, self.cols, self.symbol, width, corner="")
        out.append("")
        used = {self.symbol(a, d)[0] for a in self.rows for d in self.cols}
        marks = {self.symbol(a, d)[1:] for a in self.rows for d in self.cols}
        for m in self.snap.sorted_matrices():
            letter = self.letters[m.uuid]
            out.append(f"  {letter}  {m.name or '(no name)'}  {m.uuid}  {m.state}")
        legend = [
            f"{HOST} host pool" if HOST in used else "",
            f"{FREE} free (reserved, no matrix)" if FREE in used else "",
            f"{ABSENT} absent" if ABSENT in used else "",
            f"{CLASH} clash" if CLASH in marks else "",
            f"{GRANT} proposed, free to take" if GRANT in marks else "",
            f"{KEPT} proposed, already its own" if KEPT in marks else "",
        ]
        out += pack([x for x in legend if x], width)
        return out

    def _present(self, a: int) -> frozenset[int]:
        ad = self.snap.adapters.get(a)
        return ad.domains if ad is not None else frozenset()

    def json(self) -> dict[str, Any]:
        return {
            "view": "host",
            "adapters": self.rows,
            "domains": self.cols,
            "cells": [
                {"apqn": [a, d], "owner": self.owner(a, d)} for a in self.rows for d in self.cols
            ],
            "letters": dict(sorted(self.letters.items())),
        }


# -- one guest's picture ------------------------------------------------------------------------
class GuestPicture:
    """What the matrix was assigned against what its guest really gets (GuestApqns)."""

    def __init__(self, snap: Snapshot, m: MatrixInfo) -> None:
        self.snap = snap
        self.m = m
        self.rows = sorted(m.adapters | {a for a, _ in m.guest_apqns})
        self.cols = sorted(m.domains | {d for _, d in m.guest_apqns})

    def present(self, a: int, d: int) -> bool:
        ad = self.snap.adapters.get(a)
        return ad is not None and d in ad.domains

    def symbol(self, a: int, d: int) -> str:
        if (a, d) in self.m.guest_apqns:
            return GUEST
        if not self.present(a, d):
            return ABSENT
        return NOT_GIVEN

    def lines(self, width: int = WIDTH) -> list[str]:
        m = self.m
        n, g = len(m.apqns), len(m.guest_apqns)
        out = [
            f"Matrix {m.label}: {m.state}" + (", in use by a running guest" if m.in_use else ""),
            f"  assigned {len(m.adapters)} adapter{'s' * (len(m.adapters) != 1)} x "
            f"{len(m.domains)} domain{'s' * (len(m.domains) != 1)} = {n} APQN{'s' * (n != 1)}; "
            f"the guest gets {g}",
        ]
        if m.sysfs_path:  # a defined matrix's device exists once it is started
            later = " (once started: the matrix is only defined)" if m.state == "defined" else ""
            out.append(f"  sysfsdev={m.sysfs_path}{later}")
        out.append("")
        if not self.rows or not self.cols:
            out.append("(no APQNs assigned)")
        else:
            out += grid(self.rows, self.cols, self.symbol, width)
            out.append("")
            used = {self.symbol(a, d) for a in self.rows for d in self.cols}
            legend = [
                f"{GUEST} the guest gets it" if GUEST in used else "",
                f"{ABSENT} assigned, absent on the host" if ABSENT in used else "",
                (
                    f"{NOT_GIVEN} assigned, not given ("
                    + ("matrix not live" if m.state == "defined" else "why: below")
                    + ")"
                )
                if NOT_GIVEN in used
                else "",
            ]
            out += pack([x for x in legend if x], width)
            if m.lost:
                out.append("  not given to the guest:")
                out += [f"    {a:02x}.{d:04x}  {why}" for a, d, why in m.lost[:16]]
                if len(m.lost) > 16:
                    out.append(f"    ... and {len(m.lost) - 16} more (show --json lists them)")
        cud = " (every usage domain is one too)" if m.control_usage_domains else ""
        out.append(f"  control domains: {format_ids(m.control_domains)}{cud}")
        return out

    def json(self) -> dict[str, Any]:
        return {
            "view": "guest",
            "matrix": self.m.json(),
            "cells": [
                {
                    "apqn": [a, d],
                    "assigned": (a, d) in self.m.apqns,
                    "present": self.present(a, d),
                    "guest": (a, d) in self.m.guest_apqns,
                }
                for a in self.rows
                for d in self.cols
            ],
        }
