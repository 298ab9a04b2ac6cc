"""Manager.Apply and ``apmatrixctl apply`` against a real daemon on the private bus: busctl's
view of the answer, the CLI's plan, --check, --json, stdin, a refusal as one line, and who may
call it (polkit's org.apmatrix.apmatrix1.apply, a check too)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from busrig import (
    ACCESS_DENIED,
    MANAGER,
    NAME,
    NOBODY,
    ROOT,
    Daemon,
    PolkitMock,
    busctl,
    busctl_json,
    call_as,
    v,
)
from ctlrig import CTL, ctl, ok

DOC = """\
reserve: {adapters: ["05", "06"], domains: ["04", "47"]}
matrices:
  - name: guest1
    adapters: ["05", "06"]
    domains: ["04"]
    autostart: true
  - name: guest2
    adapters: ["05", "06"]
    domains: ["0x47"]
    state: defined
"""


def test_apply_prints_the_plan_and_then_nothing(daemon: Daemon, tmp_path: Path) -> None:
    a = daemon.address
    f = tmp_path / "host.yml"
    f.write_text(DOC)
    r = ok(a, "apply", str(f), "--check")
    assert r.lines[0] == "would change:"
    assert r.lines[1:] == [
        "  reserve adapters 05,06, domains 04,47 for guests (from the host's drivers)",
        "  create guest1: adapters 05,06 x domains 04, control domains 04; live",
        "  create guest2: adapters 05,06 x domains 47, control domains 47; defined",
    ]
    assert ok(a, "--json", "list").json() == {"matrices": []}  # a check changes nothing
    r = ok(a, "apply", str(f))
    assert r.lines[0] == "changed:" and len(r.lines) == 4
    ms = {m["name"]: m for m in ok(a, "--json", "list").json()["matrices"]}
    assert (ms["guest1"]["state"], ms["guest2"]["state"]) == ("active", "defined")
    assert ok(a, "apply", str(f)).lines == ["nothing to change: the host is as declared"]
    doc = ok(a, "apply", str(f), "--json").json()
    assert doc == {"changed": False, "plan": []}


def test_apply_json_from_stdin_and_the_steps_typed_detail(daemon: Daemon) -> None:
    p = subprocess.run(
        [str(CTL), "--address", daemon.address, "apply", "-", "--json"],
        input=DOC, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["changed"] is True
    reserve, g1, g2 = doc["plan"]
    assert reserve == {
        "action": "reserve", "target": "host pool", "adapters": [5, 6], "domains": [4, 0x47],
        "text": "reserve adapters 05,06, domains 04,47 for guests (from the host's drivers)",
    }  # fmt: skip
    assert (g1["action"], g1["target"], g1["adapters"], g1["domains"], g1["control_domains"]) == (
        "create", "guest1", [5, 6], [4], [4],
    )  # fmt: skip
    listed = {m["name"]: m["uuid"] for m in ok(daemon.address, "--json", "list").json()["matrices"]}
    assert listed == {"guest1": g1["uuid"], "guest2": g2["uuid"]}


def test_a_refusal_is_one_line_and_changes_nothing(daemon: Daemon, tmp_path: Path) -> None:
    a = daemon.address
    f = tmp_path / "host.yml"
    f.write_text(DOC)
    ok(a, "apply", str(f))
    before = ok(a, "--json", "list").json()
    f.write_text(DOC + '  - {name: guest3, adapters: ["06"], domains: ["04"]}\n'
                 '  - {name: guest4, adapters: ["07"], domains: ["ff"]}\n')  # fmt: skip
    r = ctl(a, "apply", str(f))
    assert r.rc == 1 and r.out == ""
    (line,) = r.err.splitlines()
    assert line.startswith("apmatrixctl: HostOwned: 2 problems: matrix guest3: APQNs already in")
    assert "06.0004 owned by guest1" in line and "07.00ff owned by host" in line
    r = ctl(a, "--json", "apply", str(f))
    assert r.rc == 1 and r.json()["error"]["name"] == "org.apmatrix.Apmatrix1.Error.HostOwned"
    f.write_text("matrices: [{name: g, adapters: ['zz'], colour: red}]")
    r = ctl(a, "apply", str(f))
    assert r.rc == 1
    assert r.err.startswith("apmatrixctl: InvalidArgument: document: matrices[0] (g): unknown key")
    assert "not a hex id: 'zz'" in r.err
    r = ctl(a, "apply", str(tmp_path / "missing.yml"))
    missing = f"apmatrixctl: cannot read {tmp_path}/missing.yml: No such file or directory"
    assert (r.rc, r.err.strip()) == (1, missing)
    big = tmp_path / "big.yml"
    big.write_text("#" * (1 << 20) + "\n")
    r = ctl(a, "apply", str(big))
    assert r.rc == 1 and "larger than 1048576 bytes" in r.err
    assert ok(a, "--json", "list").json() == before


def test_busctl_sees_changed_and_the_plan(daemon: Daemon) -> None:
    a = daemon.address
    call = ("call", NAME, ROOT, MANAGER, "Apply", "sa{sv}", DOC)
    out = busctl_json(a, *call, "1", "check", "b", "true")
    (result,) = out["data"]
    assert result["changed"]["data"] is True
    plan = result["plan"]["data"]
    assert [s["action"]["data"] for s in plan] == ["reserve", "create", "create"]
    r = busctl(a, *call, "1", "force", "b", "true")
    assert r.returncode == 1 and "unknown option 'force' (known: check, prune)" in r.stderr


def test_apply_needs_its_own_polkit_action(daemon: Daemon, polkit: PolkitMock) -> None:
    a = daemon.address
    check = [DOC, {"check": v("b", True)}]
    out = call_as(NOBODY, a, ROOT, MANAGER, "Apply", "sa{sv}", check)
    assert out["error"] == ACCESS_DENIED, out
    assert polkit.checks()[-1].endswith('"org.apmatrix.apmatrix1.apply" {} 0 ""')
    # manage and reserve together are not apply: one action, granted on its own
    polkit.allow("org.apmatrix.apmatrix1.manage", "org.apmatrix.apmatrix1.reserve")
    out = call_as(NOBODY, a, ROOT, MANAGER, "Apply", "sa{sv}", [DOC, {}])
    assert out["error"] == ACCESS_DENIED, out
    polkit.allow("org.apmatrix.apmatrix1.apply")
    out = call_as(NOBODY, a, ROOT, MANAGER, "Apply", "sa{sv}", [DOC, {}])
    assert out["error"] is None, out
    assert [m["name"] for m in ok(a, "--json", "list").json()["matrices"]] == ["guest1", "guest2"]
