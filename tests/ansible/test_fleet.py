"""The Ansible collection over a fleet: 20 simulated hosts (20 daemons on 20 private buses),
ansible-core from PyPI running our module with each host's bus from the inventory.

A check run (with --diff) changes nothing and reports changed everywhere; the first real run
changes every host, the second none; a document that conflicts on exactly five hosts (a matrix
of apmatrixd's holding the APQNs it wants) fails on exactly those, with the daemon's message,
and changes nothing there while the other fifteen take it. Plus ansible-doc reading the
module's documentation."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from fleetrig import BIN, COLLECTIONS, ctl, fleet, playbook
from rigs import unavailable

N = 20
CLASH = 5  # hosts where the third document conflicts

LAYOUT: dict[str, Any] = {
    "reserve": {"adapters": ["05", "06"], "domains": ["04", "47", "ab"]},
    "matrices": [
        {"name": "guest1", "adapters": ["05", "06"], "domains": ["04"], "autostart": True},
        {"name": "guest2", "adapters": ["05", "06"], "domains": ["47"], "autostart": True},
    ],
}
GUEST3 = {"name": "guest3", "adapters": ["05"], "domains": ["ab"]}
MORE = {**LAYOUT, "matrices": [*LAYOUT["matrices"], GUEST3]}


def need_ansible() -> None:
    if not (BIN / "ansible-playbook").exists():
        unavailable("ansible-core is not installed (pip install '.[test]')")


def listed(host: Any) -> list[tuple[str, str, list[int], list[int]]]:
    r = ctl(host, "--json", "list")
    assert r.returncode == 0, r.stderr
    ms = json.loads(r.stdout)["matrices"]
    return sorted((m["name"], m["state"], m["adapters"], m["domains"]) for m in ms)


@pytest.mark.e2e
@pytest.mark.timeout(600)  # four playbook runs over 20 hosts on a loaded 2-CPU machine
def test_a_fleet_of_20_hosts(system_bus: str) -> None:
    need_ansible()
    with fleet(N) as (hosts, work):
        names = {h.name for h in hosts}
        dry = playbook(work, LAYOUT, "--check", "--diff")
        assert dry.rc == 0, dry.output
        assert dry.hosts("changed") == names
        assert all(listed(h) == [] for h in hosts)  # check mode changed nothing
        one = dry.results["lpar01"]
        assert [s["action"] for s in one["plan"]] == ["reserve", "create", "create"]
        # --diff: the plan, as Ansible prints the module's prepared diff
        assert dry.output.count("+ create guest1: adapters 05,06 x domains 04") == N

        first = playbook(work, LAYOUT)
        assert first.rc == 0, first.output
        assert first.hosts("changed") == names and not first.hosts("failed")
        want = [("guest1", "active", [5, 6], [4]), ("guest2", "active", [5, 6], [0x47])]
        assert all(listed(h) == want for h in hosts)

        second = playbook(work, LAYOUT)
        assert second.rc == 0, second.output
        assert second.hosts("changed") == set() and second.hosts("ok") == names
        assert all(r["plan"] == [] for r in second.results.values())

        # On five hosts an admin made a matrix holding 05.00ab, which guest3 wants.
        clashing = {h.name for h in hosts[:CLASH]}
        for h in hosts[:CLASH]:
            r = ctl(h, "create", "intruder", "-a", "5", "-d", "ab")
            assert r.returncode == 0, r.stderr
        before = {h.name: listed(h) for h in hosts}
        third = playbook(work, MORE)
        assert third.rc != 0
        assert third.hosts("failed") == clashing, third.stats
        assert third.hosts("changed") == names - clashing
        for name in clashing:
            res = third.results[name]
            assert res["error"] == "org.apmatrix.Apmatrix1.Error.Conflict", res
            said = "Conflict: matrix guest3: APQNs already in use: 05.00ab owned by intruder"
            assert res["msg"].startswith(said), res["msg"]
        for h in hosts:
            now = listed(h)
            if h.name in clashing:
                assert now == before[h.name]  # nothing changed where it failed
            else:
                assert now == [*want[:1], *want[1:], ("guest3", "active", [5], [0xAB])]
        print(
            f"fleet of {N}: check {dry.seconds:.1f} s, first {first.seconds:.1f} s, "
            f"second {second.seconds:.1f} s, conflicting {third.seconds:.1f} s"
        )


def test_ansible_doc_reads_the_module() -> None:
    need_ansible()
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS))
    r = subprocess.run(
        [str(BIN / "ansible-doc"), "--json", "apmatrix.apmatrix.apmatrix_apply"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["apmatrix.apmatrix.apmatrix_apply"]
    assert set(doc["doc"]["options"]) == {"layout", "src", "prune", "bus_address", "apmatrixctl"}
    assert doc["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert doc["examples"] and set(doc["return"]) == {"changed", "plan", "error"}
