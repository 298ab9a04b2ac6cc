"""The Cockpit page's rows: measured in the browser by tests/cockpit/test_big_host.py (headless
Chromium over cockpit-ws, 1,000 live matrices on the 256 x 256 emulated host), which writes
bench/cockpit.json under ``APMATRIXD_BENCH_COCKPIT=1``; the report reads that file, so its
rows carry the date and commit of that test run, not of the bench's."""

from __future__ import annotations

import json
import statistics
from typing import Any

from bench.common import BENCH, Row

JSON = BENCH / "cockpit.json"
FIRST_GOAL_MS = 1000.0  # an admin waits at most a second once the objects are in
UPDATE_GOAL_MS = 100.0  # a change another admin made shows "at once"


def load() -> dict[str, Any] | None:
    return json.loads(JSON.read_text()) if JSON.exists() else None


def _ms(xs: list[float]) -> str:
    return (
        f"median {statistics.median(xs):.0f} ms (min {min(xs):.0f}, max {max(xs):.0f}, n={len(xs)})"
    )


def rows(doc: dict[str, Any]) -> list[Row]:
    first = [f["painted"] for f in doc["first"]]
    first_dom = [f["dom"] for f in doc["first"]]
    loaded = [f["loaded"] for f in doc["first"]]
    updates = [u["painted"] for u in doc["updates"]]
    update_dom = [u["dom"] for u in doc["updates"]]
    floor = [f["painted"] for f in doc["floor"]]
    floor_dom = [f["dom"] for f in doc["floor"]]
    where = (
        f"browser test {doc['measured']}, commit {doc['commit']}, Chromium {doc['chromium']}, "
        f"load {doc['loadavg']}"
    )
    size = f"{doc['matrices']:,} matrices, {doc['adapters']} x {doc['domains']} host"
    return [
        Row(
            figure=f"Cockpit page, first render ({size}): objects in -> painted",
            ours=f"{_ms(first)}; DOM {statistics.median(first_dom):.0f} ms",
            floor=f"the same DOM from HTML, no framework: {_ms(floor)}; DOM "
            f"{statistics.median(floor_dom):.0f} ms",
            ratio=statistics.median(first) / statistics.median(floor),
            goal=f"<= {FIRST_GOAL_MS:.0f} ms",
            met=statistics.median(first) <= FIRST_GOAL_MS,
            note=f"the bridge's objects took {_ms(loaded)} from navigation; {where}",
        ),
        Row(
            figure=f"Cockpit page, update ({size}): one matrix's PropertiesChanged -> painted",
            ours=f"{_ms(updates)}; DOM {statistics.median(update_dom):.0f} ms",
            floor=f"the same DOM rebuilt whole from HTML: {_ms(floor)}",
            ratio=statistics.median(updates) / statistics.median(floor),
            goal=f"<= {UPDATE_GOAL_MS:.0f} ms",
            met=statistics.median(updates) <= UPDATE_GOAL_MS,
            note=f"{doc['cells_shown']} grid cells and 20 matrix rows on screen; {where}",
        ),
    ]
