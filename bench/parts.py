"""Single rows of the suites, run alone (``--only startup``, ``--only idle``, ``--only
hotplug-card``): the same code as in their suite, with the state they start from made here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from busrig import PrivateBus

from bench import busbench, hotbench, idlebench
from bench.common import Row
from bench.hosts import big_state


def startup(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """The bus suite's start-up row: 1,000 autostart matrices on --simulate big."""
    bus = PrivateBus.start()
    try:
        state = busbench.make_states(work, [1000], autostart=True)[1000]
        return busbench.startup(bus.address, quick, work, state, 1000)
    finally:
        bus.stop()


def idle(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """The hotplug suite's idle-cost row: 1,000 live matrices in real-host mode."""
    return idlebench.idle(quick, work, big_state(work / "state-idle-src", 1000))


def hotplug_card(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """The hotplug suite's card rows: an adapter with 85 queues back, idle and loaded."""
    return hotbench.hotplug(quick, work)
