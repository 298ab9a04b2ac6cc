"""apmatrixctl's tests reuse the D-Bus rig of tests/bus: the same private bus with the shipped
policy, the polkit mock, and apmatrixd started as systemd starts it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BUS_TESTS = Path(__file__).resolve().parent.parent / "bus"
if str(BUS_TESTS) not in sys.path:
    sys.path.insert(0, str(BUS_TESTS))

_spec = importlib.util.spec_from_file_location("_bus_fixtures", BUS_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_bus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bus)

system_bus = _bus.system_bus
polkit_mock = _bus.polkit_mock
polkit = _bus.polkit
start = _bus.start
daemon = _bus.daemon
