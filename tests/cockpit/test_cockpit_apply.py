"""The Cockpit page's "Apply a layout" (Manager.Apply, the declared state) in a real browser: a
layout pasted or uploaded, a dry run showing the daemon's plan (the same as busctl's check)
with nothing changed, Apply only for the plan shown, the result on the page, a second dry run
with nothing to do, and a refusal named in the dialog."""

from __future__ import annotations

import json
import os

import pytest
from busrig import ROOT, busctl
from cockpitrig import REPO, Stack, StackFactory, disabled_reason

pytestmark = pytest.mark.e2e

MANAGER = ("org.apmatrix.Apmatrix1", ROOT, "org.apmatrix.Apmatrix1.Manager")
G1 = "11111111-1111-4111-8111-111111111111"
# guest1 exists (05 x 04, made with busctl): the layout grows it and adds guest2, defined only.
LAYOUT = """reserve: {adapters: ["05", "06"], domains: ["04", "0x47"]}
matrices:
  - {name: guest1, adapters: ["05", "06"], domains: ["04"]}
  - name: guest2
    adapters: "06"
    domains: "47"
    control_domains: ["ff"]
    state: defined
"""


def matrix_paths(stack: Stack) -> list[str]:
    r = busctl(stack.bus, "tree", "--list", MANAGER[0])
    assert r.returncode == 0, r.stderr
    return [p for p in r.stdout.split() if "/matrices/" in p]


def plan_shown(stack: Stack) -> list[list[str]]:
    out: list[list[str]] = stack.page.eval(
        "[...document.querySelectorAll('#apply-plan tbody tr')].map(tr =>"
        " ['action', 'target', 'text'].map(c => tr.querySelector('td.' + c).textContent))"
    )
    return out


def test_apply_a_layout_with_a_dry_run_first(cockpit_stack: StackFactory) -> None:
    stack = cockpit_stack()
    for call in (
        ("Reserve", "auau", "1", "5", "1", "4"),
        ("CreateMatrix", "sa{sv}", G1, "3", "name", "s", "guest1",
         "adapters", "au", "1", "5", "domains", "au", "1", "4"),
    ):  # fmt: skip
        r = busctl(stack.bus, "call", *MANAGER, *call)
        assert r.returncode == 0, r.stderr
    page = stack.open()
    page.click("#apply-open")
    page.wait("!!document.getElementById('apply-dialog')", what="the Apply dialog")
    assert disabled_reason(stack, "#apply-submit") == "paste or upload a layout first"

    # Uploaded from a file (the browser's file picker, given the file as a user would).
    f = stack.dir / "layout.yaml"
    f.write_text(LAYOUT)
    root = page.send("DOM.getDocument")["root"]["nodeId"]
    node = page.send(
        "DOM.querySelector", {"nodeId": root, "selector": "#apply-dialog input[type=file]"}
    )
    page.send("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(f)]})
    page.wait(
        f"document.getElementById('apply-document').value === {json.dumps(LAYOUT)}",
        what="the file read into the layout",
    )
    assert (disabled_reason(stack, "#apply-submit") or "").startswith("do a dry run first")

    # The dry run: the daemon's plan, as busctl gets it, and nothing changed.
    page.click("#apply-check")
    page.wait("!!document.getElementById('apply-plan')", what="the plan")
    r = busctl(stack.bus, "call", *MANAGER, "Apply", "sa{sv}", LAYOUT, "2",
               "check", "b", "true", "prune", "b", "false", "--json=short")  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = [[s["action"]["data"], s["target"]["data"], s["text"]["data"]]
            for s in json.loads(r.stdout)["data"][0]["plan"]["data"]]  # fmt: skip
    assert plan_shown(stack) == want
    assert [(a, t) for a, t, _ in want] == [
        ("reserve", "host pool"), ("update", "guest1"), ("create", "guest2")
    ], want  # fmt: skip
    assert len(matrix_paths(stack)) == 1
    assert page.text(f'#matrices tr[data-uuid="{G1}"] td.adapters') == "05"
    page.screenshot(stack.dir / "apply.png")
    if os.environ.get("APMATRIXD_SCREENSHOT"):
        page.screenshot(REPO / "docs" / "cockpit-apply.png")
    # A plan is for one document and one prune choice: changing either asks for a new one.
    page.click("#apply-prune")
    page.wait("!document.getElementById('apply-plan')", what="the plan withdrawn")
    assert (disabled_reason(stack, "#apply-submit") or "").startswith("do a dry run first")
    page.click("#apply-prune")
    page.wait("!!document.getElementById('apply-plan')", what="the plan back")
    assert disabled_reason(stack, "#apply-submit") is None

    page.click("#apply-submit")
    page.wait("!document.getElementById('apply-dialog')", what="the dialog closed")
    assert "Applied the layout" in page.text("#alerts")
    page.wait(
        "[...document.querySelectorAll('#matrices tr[data-uuid] td.name')]"
        ".map(td => td.textContent).join(' ') === 'Aguest1 Bguest2'",
        what="guest1 and guest2 listed",
    )
    shown = page.eval(
        "[...document.querySelectorAll('#matrices tr[data-uuid]')].map(tr =>"
        " ['state', 'adapters', 'domains', 'control'].map(c => tr.querySelector('td.' + c)"
        ".dataset.state ?? tr.querySelector('td.' + c).textContent))"
    )
    assert shown == [["active", "05 06", "04", "04"], ["defined", "06", "47", "47 ff"]], shown
    assert len(matrix_paths(stack)) == 2

    # The same layout again: nothing to do.
    page.click("#apply-open")
    page.fill("#apply-document", LAYOUT)
    page.click("#apply-check")
    page.wait("!!document.getElementById('apply-nothing')", what="nothing to change")
    assert disabled_reason(stack, "#apply-submit") == "nothing to change"

    # A layout the daemon refuses: its error, named, in the dialog; nothing changed.
    page.fill("#apply-document", LAYOUT.replace('domains: "47"', 'domians: "47"'))
    page.click("#apply-check")
    sel = "#apply-error[data-error-name='org.apmatrix.Apmatrix1.Error.InvalidArgument']"
    page.wait(f"!!document.querySelector({json.dumps(sel)})", what="InvalidArgument")
    assert "domians" in page.text("#apply-error")
    assert not page.eval("!!document.getElementById('apply-plan')")
    page.click("#apply-cancel")
    assert len(matrix_paths(stack)) == 2
    assert page.console() == [], page.console()
