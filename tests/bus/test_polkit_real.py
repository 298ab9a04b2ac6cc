"""Authorisation against the real polkitd (Debian's), not a mock.

One run of tests/bus/polkit_ns.py (in a mount namespace of its own: test users, our actions,
a rules file) answers every test here; see that file for the set-up. python-dbusmock's polkit
stays where the real one cannot show a thing: which action and flags a call was asked with
(tests/bus/test_bus.py), and that every mutating method asks (tests/reliability).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busrig import HERE
from rigs import need_tool, unavailable

from apmatrixd.bus import names

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


@pytest.fixture(scope="module")
def steps() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        unavailable(
            "needs root (mount namespace, polkitd drops to its own user)", installable=False
        )
    need_tool("/usr/lib/polkit-1/polkitd", "polkitd")
    need_tool("unshare", "util-linux")
    work = Path(tempfile.mkdtemp(prefix="apm-polkit-", dir="/tmp"))
    work.chmod(0o755)  # the test users reach the bus socket in it
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable,
             str(HERE / "polkit_ns.py"), str(work)],
            capture_output=True, text=True, timeout=120, cwd=HERE,
        )  # fmt: skip
        logs = {f.name: f.read_text() for f in work.glob("*.log")}
        assert r.returncode == 0, (r.stderr, logs)
        yield json.loads(r.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def errors(outs: list[dict[str, Any]]) -> list[str | None]:
    return [o["error"] for o in outs]


def test_without_a_rule_the_default_asks_for_an_admin_and_no_agent_answers(
    steps: dict[str, Any],
) -> None:
    """auth_admin_keep, no agent: InteractiveAuthorizationRequired when the caller did not
    allow interaction, AccessDenied when it did (polkitd found nobody to ask)."""
    assert errors(steps["default"]) == [INTERACTIVE, DENIED], steps["default"]


def test_a_rule_for_group_apmatrix_lets_a_member_reserve_and_create(steps: dict[str, Any]) -> None:
    reserve, create, export, export_interactive = steps["member"]
    assert (reserve["error"], create["error"]) == (None, None), steps["member"]
    assert create["body"] == [f"{names.MATRICES_PATH}/11111111_1111_4111_8111_111111111111"]
    # the rule grants manage and reserve only: export keeps its auth_admin, asked every time
    assert errors([export, export_interactive]) == [INTERACTIVE, DENIED]
    assert "org.apmatrix.apmatrix1.export-mdevctl" in export["body"][0]


def test_a_non_member_is_refused_and_still_reads(steps: dict[str, Any]) -> None:
    reserve, create, check = steps["other"]
    assert errors([reserve, create]) == [DENIED, DENIED]
    assert "org.apmatrix.apmatrix1.reserve" in reserve["body"][0]
    assert "org.apmatrix.apmatrix1.manage" in create["body"][0]
    assert check == {"error": None, "body": [[[5, 4, "11111111-1111-4111-8111-111111111111"]]]}


def test_polkitd_stopped_fails_closed_and_recovers(steps: dict[str, Any]) -> None:
    reserve, check = steps["polkitd_stopped"]
    assert reserve["error"] == DENIED and "polkit unreachable" in reserve["body"][0], reserve
    assert check["error"] is None  # reads never ask
    # the refused Reserve changed nothing (7 stays the host's); root needs no polkit
    host = set(steps["state_without_polkitd"][0]["body"][0]["HostAdapters"]["$v"][1])
    assert {6, 7} <= host and 5 not in host
    assert errors(steps["root_without_polkitd"]) == [None]  # reserves 6
    # polkitd back: the member's Release of 6 goes through (nothing was kept as refused)
    assert errors(steps["polkitd_back"]) == [None]
    host = set(steps["state"][0]["body"][0]["HostAdapters"]["$v"][1])
    assert {6, 7} <= host and 5 not in host
