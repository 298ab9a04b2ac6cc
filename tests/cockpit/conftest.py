"""Fixtures of the Cockpit rig (cockpitrig.py): a fresh bus, daemon, cockpit-ws and browser per
test, all stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cockpitrig import Stack, StackFactory, missing, start_stack


@pytest.fixture
def cockpit_stack() -> Iterator[StackFactory]:
    """start(*daemon_args) -> Stack: bus, daemon, cockpit-ws, browser tab; all stopped after."""
    if reason := missing():
        pytest.skip(reason)
    cleanups: list[Callable[[], None]] = []

    def start(*daemon_args: str) -> Stack:
        return start_stack(cleanups, *daemon_args)

    yield start
    errors = []
    for undo in reversed(cleanups):
        try:
            undo()
        except Exception as err:  # every part must be stopped
            errors.append(err)
    if errors:
        raise errors[0]
