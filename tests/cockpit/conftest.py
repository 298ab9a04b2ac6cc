"""Fixtures of the Cockpit rig (cockpitrig.py): a fresh bus, daemon, cockpit-ws and browser per
test, all stopped afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from cockpitrig import Stack, StackFactory, missing, start_stack
from rigs import unavailable


@pytest.fixture
def cockpit_stack() -> Iterator[StackFactory]:
    """start(*daemon_args, uid=0, ready_timeout=15) -> Stack: bus, daemon, cockpit-ws (as
    uid), browser tab; all stopped after."""
    if reason := missing():
        unavailable(reason, installable=os.geteuid() == 0)
    cleanups: list[Callable[[], None]] = []

    def start(*daemon_args: str, uid: int = 0, ready_timeout: float = 15) -> Stack:
        return start_stack(cleanups, *daemon_args, uid=uid, ready_timeout=ready_timeout)

    yield start
    errors = []
    for undo in reversed(cleanups):
        try:
            undo()
        except Exception as err:  # every part must be stopped
            errors.append(err)
    if errors:
        raise errors[0]
