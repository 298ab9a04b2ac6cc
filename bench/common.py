"""Statistics, timing and the rows of the report."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The test rigs (private dbus-daemon, namespaces, FUSE) are reused, not copied.
for extra in (REPO / "tests" / "bus", REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

now = time.perf_counter


@dataclass
class Stats:
    n: int
    min: float
    median: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Stats:
        if not xs:
            raise ValueError("no samples")
        s = sorted(xs)
        rank = max(0, math.ceil(0.99 * len(s)) - 1)  # nearest rank
        return cls(len(s), s[0], statistics.median(s), s[rank], s[-1], statistics.fmean(s))

    def text(self, unit: str = "ms", scale: float = 1e3) -> str:
        return (
            f"min {self.min * scale:.3f} / median {self.median * scale:.3f} / "
            f"p99 {self.p99 * scale:.3f} {unit} (n={self.n})"
        )


@dataclass
class Row:
    """One line of RESULTS.md."""

    figure: str
    ours: str
    floor: str
    ratio: float | None
    goal: str
    met: bool | None
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def say(text: str) -> None:
    print(text, flush=True)


def show(name: str, st: Stats, unit: str = "ms", scale: float = 1e3) -> None:
    say(f"  {name:<44} {st.text(unit, scale)}")


def ms(x: float) -> str:
    return f"{x * 1e3:.3f} ms"


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpus() -> int:
    return os.cpu_count() or 1
