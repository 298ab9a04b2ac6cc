"""The fleet figure: one Ansible run of apmatrix.apmatrix.apmatrix_apply over N simulated
hosts (N daemons on N private buses, tests/ansible/fleetrig.py), against the same N applies
made without Ansible (N ``apmatrixctl apply -`` at once) and Ansible running a module that
does nothing (``ansible.builtin.ping``) over the same inventory: what our module adds is the
difference between those two."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, Row, Stats, say

sys.path.insert(0, str(REPO / "tests" / "ansible"))

LAYOUT: dict[str, Any] = {
    "reserve": {"adapters": ["05", "06"], "domains": ["04", "47"]},
    "matrices": [
        {"name": "guest1", "adapters": ["05", "06"], "domains": ["04"], "autostart": True},
        {"name": "guest2", "adapters": ["05", "06"], "domains": ["47"], "autostart": True},
    ],
}
PING = """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
"""


def run(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import json

    from fleetrig import BIN, applies_in_parallel, fleet, playbook

    n, rounds = 20, (2 if quick else 5)
    if not (BIN / "ansible-playbook").exists():
        say("== ansible-core is not installed (pip install '.[test]'): row skipped")
        return [Row(f"Ansible apply, {n} hosts", "-", "ansible missing", None, "", None)], {}
    say(f"== Ansible over a fleet of {n} simulated hosts ({rounds} rounds)")
    first: list[float] = []
    again: list[float] = []
    plain: list[float] = []
    ping: list[float] = []
    for _ in range(rounds):
        with fleet(n) as (hosts, fwork):
            r = playbook(fwork, LAYOUT)
            assert r.rc == 0 and len(r.hosts("changed")) == n, r.output
            first.append(r.seconds)
            r = playbook(fwork, LAYOUT)
            assert r.rc == 0 and not r.hosts("changed"), r.output
            again.append(r.seconds)
            plain.append(applies_in_parallel(hosts, json.dumps(LAYOUT)))
            site = (fwork / "site.yml").read_text()
            (fwork / "site.yml").write_text(PING)
            ping.append(playbook(fwork, LAYOUT).seconds)
            (fwork / "site.yml").write_text(site)
    sf, sa, sp, sg = (Stats.of(x) for x in (first, again, plain, ping))
    for name, st in (
        ("first run (changes every host)", sf),
        ("second run (no change)", sa),
        (f"{n} apmatrixctl apply at once", sp),
        ("Ansible ping, same inventory", sg),
    ):
        say(f"  {name:<44} {st.text('s', 1)}")
    ratio = sa.median / sg.median
    rows = [
        Row(
            f"Ansible apply over {n} hosts (apmatrix_apply, forks {n})",
            f"{sf.median:.2f} s first run, {sa.median:.2f} s second (no change): "
            f"{sa.median / n * 1e3:.0f} ms per host",
            f"Ansible's own ping module: {sg.median:.2f} s; the same {n} applies without "
            f"Ansible: {sp.median:.2f} s",
            ratio,
            "within 2x of Ansible's no-op module",
            ratio <= 2,
            raw={
                "first": sf.__dict__,
                "again": sa.__dict__,
                "plain": sp.__dict__,
                "ping": sg.__dict__,
            },  # fmt: skip
        )
    ]
    return rows, {"first": first, "again": again, "plain": plain, "ping": ping}
