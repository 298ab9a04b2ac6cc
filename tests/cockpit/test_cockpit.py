"""The Cockpit page in a real browser: headless Chromium on cockpit-ws, the bridge on a private
system bus, apmatrixd on a simulated host (the 2017 design document's: adapters 05 CEX5C and 06
CEX5A, usage domains 04 47 ab ff, everything in the host pool).

Everything a test does, it does as an admin would: typing and clicking with real input events;
what it checks is what the page shows. Waits are on conditions in the page, never sleeps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from busrig import ROOT, busctl
from cockpitrig import REPO, Stack, StackFactory

from apmatrixd.ctl.main import main as ctl_main

pytestmark = pytest.mark.e2e

SCREENSHOT = REPO / "docs" / "cockpit.png"
MANAGER = ("org.apmatrix.Apmatrix1", ROOT, "org.apmatrix.Apmatrix1.Manager")
MATRIX = "org.apmatrix.Apmatrix1.Matrix"
G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
ERR = "org.apmatrix.Apmatrix1.Error."
GUEST2 = ("3", "name", "s", "guest2", "adapters", "au", "2", "5", "6", "domains", "au", "1", "0x47")


def cells(stack: Stack) -> dict[str, str]:
    """APQN -> owner ('host', 'free', 'absent' or a matrix UUID) as the grid shows it."""
    out: dict[str, str] = json.loads(
        stack.page.eval(
            "JSON.stringify(Object.fromEntries([...document.querySelectorAll('#grid td.cell')]"
            ".map(td => [td.dataset.apqn, td.dataset.owner])))"
        )
    )
    return out


def wait_cells(stack: Stack, want: dict[str, str], what: str) -> None:
    stack.page.until(lambda: all(cells(stack).get(k) == v for k, v in want.items()), what=what)


def clashes(stack: Stack) -> list[str]:
    """APQNs the grid marks as clashing with the Check being previewed."""
    out: list[str] = stack.page.eval(
        "[...document.querySelectorAll('#grid td[data-clash=true]')].map(td => td.dataset.apqn)"
    )
    return sorted(out)


def wait_check(stack: Stack, n: int) -> None:
    stack.page.wait(
        f"document.getElementById('create-check').dataset.clashes === '{n}'",
        what=f"the form's Check to find {n} clashes",
    )


def row(uuid: str) -> str:
    return f'#matrices tr[data-uuid="{uuid}"]'


def state_of(stack: Stack, uuid: str) -> str:
    js = f"document.querySelector('{row(uuid)} td.state')?.dataset.state ?? ''"
    return str(stack.page.eval(js))


def alert_named(stack: Stack, name: str) -> str:
    """Wait for an alert carrying the D-Bus error ``name``; its text."""
    sel = f'#alerts .alert[data-error-name="{name}"]'
    stack.page.wait(f"!!document.querySelector('{sel}')", what=f"an alert for {name}")
    return stack.page.text(sel)


def test_page_shows_the_host_and_manages_matrices(cockpit_stack: StackFactory) -> None:
    stack = cockpit_stack()
    page = stack.open()

    # The host as the daemon reports it: two adapters, eight APQNs, all in the host pool.
    assert "upstream layout" in page.text("#host-info")
    adapters = page.eval(
        "[...document.querySelectorAll('#adapters tr[data-adapter]')].map(tr => "
        "['id', 'type', 'mode', 'online', 'configured'].map(c => tr.querySelector('td.' + c)"
        ".textContent))"
    )
    assert adapters == [
        ["05", "CEX5C", "CCA-Coproc", "yes", "yes"],
        ["06", "CEX5A", "Accelerator", "yes", "yes"],
    ]
    apqns = [f"{a:02x}.{d:04x}" for a in (5, 6) for d in (0x04, 0x47, 0xAB, 0xFF)]
    assert cells(stack) == dict.fromkeys(apqns, "host")
    assert page.text("#kernel-generation").startswith("vfio_ap ")  # told from sysfs

    # Reserve adapter 05 and domains 04 47 for guests (apmask/aqmask): an APQN stays with the
    # host only if both its adapter and its domain do, so only 06.00ab and 06.00ff remain.
    page.fill("#pool-adapters", "05")
    page.fill("#pool-domains", "04 47")
    page.click("#pool-reserve")
    want = dict.fromkeys(apqns, "free") | {"06.00ab": "host", "06.00ff": "host"}
    wait_cells(stack, want, "reserved APQNs shown free")
    assert page.text("#pool-adapters-now") == "00-04 06-ff"
    assert page.text("#pool-domains-now") == "00-03 05-46 48-ff"

    # Create guest1 = 05 06 x 04 from the form; the live Check says it is clash-free first.
    page.fill("#create-name", "guest1")
    page.fill("#create-uuid", G1)
    page.fill("#create-adapters", "05 06")
    page.fill("#create-domains", "04")
    wait_check(stack, 0)
    assert page.eval("document.querySelectorAll('#grid td.proposed').length") == 2
    page.click("#create-submit")
    page.wait(f"!!document.querySelector('{row(G1)}')", what="guest1's row")
    page.until(lambda: state_of(stack, G1) == "active", what="guest1 active")
    wait_cells(stack, {"05.0004": G1, "06.0004": G1}, "guest1 on the grid")
    assert page.eval("document.querySelectorAll('#grid td.proposed').length") == 0

    # Another admin creates guest2 = 05 06 x 47 with busctl: the page follows the signals.
    r = busctl(stack.bus, "call", *MANAGER, "CreateMatrix", "sa{sv}", G2, *GUEST2)
    assert r.returncode == 0, r.stderr
    wait_cells(stack, {"05.0047": G2, "06.0047": G2}, "guest2 on the grid without a reload")
    assert "guest2" in page.text(row(G2))

    # guest3 = 06 x 47: the live Check marks the clash on the grid before it is submitted ...
    page.fill("#create-name", "guest3")
    page.fill("#create-uuid", "")
    page.fill("#create-adapters", "06")
    page.fill("#create-domains", "47")
    wait_check(stack, 1)
    assert clashes(stack) == ["06.0047"]
    assert "06.0047 (guest2" in page.text("#create-check")
    # ... and submitting anyway is refused by the daemon, shown as a readable error.
    page.click("#create-submit")
    text = alert_named(stack, ERR + "Conflict")
    assert "already belong to another matrix" in text, text
    assert "06.0047" in text and "guest2" in text, text

    # 06 x 47 ab: one APQN held by guest2, one still the host's; refused as HostOwned.
    page.fill("#create-domains", "47 ab")
    wait_check(stack, 2)
    assert clashes(stack) == ["06.0047", "06.00ab"]
    assert "reserve first: 06.00ab" in page.text("#create-check")
    page.click("#create-submit")
    text = alert_named(stack, ERR + "HostOwned")
    assert "reserve them first" in text and "06.00ab" in text, text
    assert page.eval("document.querySelectorAll('#matrices tbody tr').length") == 2
    page.screenshot(stack.dir / "cockpit.png")
    if os.environ.get("APMATRIXD_SCREENSHOT"):  # refresh the README's picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(SCREENSHOT)
    page.click("#create-form button[type=reset]")
    page.wait("!document.querySelector('#grid td.proposed')", what="the preview cleared")
    assert page.eval("document.getElementById('create-adapters').value") == ""

    # guest1's details: assign domain 47; the live Check marks guest2's APQNs; refused.
    page.click(f"{row(G1)} button.details")
    page.wait(f"!!document.querySelector('#matrix-detail[data-uuid=\"{G1}\"]')", what="details")
    assert page.eval("document.getElementById('assign-kind').value") == "Domain"
    page.fill("#assign-id", "47")
    page.until(lambda: clashes(stack) == ["05.0047", "06.0047"], what="assign preview")
    assert "guest2" in page.text("#assign-check")
    page.click("#assign-submit")
    conflicts = f'#alerts .alert[data-error-name="{ERR}Conflict"]'
    page.wait(f"document.querySelectorAll('{conflicts}').length == 2", what="a 2nd Conflict")
    assert "Assign domain 47 on guest1" in page.text("#alerts .alert")
    # ... while adapter 05 is already guest1's: nothing new to check, and the grid can show
    # guest1 alone.
    page.fill("#assign-id", "")
    page.wait("!document.querySelector('#grid td.proposed')", what="the assign preview cleared")
    page.click("#grid-view-matrix")
    wait_cells(stack, {"05.0004": G1, "06.0004": G1}, "only guest1's APQNs")
    assert len(cells(stack)) == 2
    page.click("#grid-view-all")

    # The sysfsdev for QEMU goes to the clipboard from the matrix's row (the details show it).
    stack.browser.grant(stack.cockpit.base, "clipboardReadWrite", "clipboardSanitizedWrite")
    page.click(f"{row(G1)} button.copy")
    page.wait(f"document.querySelector('{row(G1)} button.copy').dataset.copied === 'true'")
    sysfs = page.text("#matrix-detail code.sysfs")
    assert sysfs == f"/sys/devices/vfio_ap/matrix/{G1}"
    assert page.eval("navigator.clipboard.readText()") == sysfs
    # ... and libvirt's <hostdev> and node device XML, as the daemon makes them (LibvirtXML).
    r = busctl(stack.bus, "call", MANAGER[0], f"{ROOT}/matrices/{G1.replace('-', '_')}", MATRIX,
               "LibvirtXML", "--json=short")  # fmt: skip
    assert r.returncode == 0, r.stderr
    hostdev, nodedev = json.loads(r.stdout)["data"]
    for button, text in (("copy-hostdev", hostdev), ("copy-nodedev", nodedev)):
        page.click(f"{row(G1)} button.{button}")
        page.wait(f"document.querySelector('{row(G1)} button.{button}').dataset.copied === 'true'")
        assert page.eval("navigator.clipboard.readText()") == text

    # Rename guest1 and turn autostart on from its details (Configure).
    page.fill("#configure-name", "guest1b")
    page.click("#configure-rename")
    page.wait(f"document.querySelector('{row(G1)} td.name').textContent.endsWith('guest1b')")
    page.click("#configure-autostart")
    page.wait(f"document.querySelector('{row(G1)} td.state').textContent.includes('autostart')")
    page.click("#matrix-detail button[aria-label='Close details']")
    page.wait("!document.getElementById('matrix-detail')", what="details closed")

    # Stop, start, remove guest2 with the buttons; Remove asks first.
    page.click(f"{row(G2)} button.stop")
    page.until(lambda: state_of(stack, G2) == "defined", what="guest2 stopped")
    page.click(f"{row(G2)} button.start")
    page.until(lambda: state_of(stack, G2) == "active", what="guest2 started")
    page.click(f"{row(G2)} button.remove")
    page.wait("!!document.getElementById('confirm-dialog')", what="the Remove dialog")
    assert "Remove guest2?" in page.text("#confirm-dialog")
    page.click("#confirm-submit")
    page.wait(f"!document.querySelector('{row(G2)}')", what="guest2 gone")
    wait_cells(stack, {"05.0047": "free", "06.0047": "free", "05.0004": G1}, "guest2's APQNs free")

    # What the page did is what the daemon holds.
    r = busctl(stack.bus, "tree", "--list", MANAGER[0])
    assert r.returncode == 0, r.stderr
    paths = [p for p in r.stdout.split() if "/matrices/" in p]
    assert paths == [f"{ROOT}/matrices/{G1.replace('-', '_')}"]

    # The daemon stops: the page says so and greys out; a new one starts: the page starts afresh.
    stack.daemon.terminate()
    page.wait("!!document.getElementById('daemon-alert')", what="'not running'")
    assert "apmatrixd is not running" in page.text("#daemon-alert")
    assert page.eval("document.getElementById('app').classList.contains('stale')")
    stack.start_daemon()  # no --state-dir: a freshly booted host, no matrices
    page.wait(
        "document.getElementById('app')?.dataset.ready === 'true'"
        " && !document.getElementById('daemon-alert')"
        " && document.querySelectorAll('#matrices tbody tr').length === 0",
        what="the page reloaded from the new daemon",
    )
    wait_cells(stack, dict.fromkeys(apqns, "host"), "the new daemon's host")
    assert page.console() == [], page.console()


def test_unplugged_adapter_marks_the_matrix_degraded(cockpit_stack: StackFactory) -> None:
    mount = Path(f"/tmp/apm-sim-{os.getpid()}-{time.monotonic_ns()}")
    mount.mkdir()
    try:
        stack = cockpit_stack("--simulate", "--sim-mount", str(mount))
        for call in (
            ("Reserve", "auau", "2", "5", "6", "2", "4", "0x47"),
            (
                "CreateMatrix",
                "sa{sv}",
                G2,
                "3",
                "name",
                "s",
                "alpha",
                "adapters",
                "au",
                "1",
                "5",
                "domains",
                "au",
                "1",
                "0x47",
            ),
            (
                "CreateMatrix",
                "sa{sv}",
                G1,
                "3",
                "name",
                "s",
                "guest1",
                "adapters",
                "au",
                "2",
                "5",
                "6",
                "domains",
                "au",
                "1",
                "4",
            ),
        ):
            r = busctl(stack.bus, "call", *MANAGER, *call)
            assert r.returncode == 0, r.stderr
        page = stack.open()
        page.until(lambda: state_of(stack, G1) == "active", what="guest1 active")
        # One letter per matrix, as apmatrixctl's picture gives it (listing order: alpha, then
        # guest1), whatever their UUIDs' order
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert ctl_main(["--address", stack.bus, "picture"]) == 0
        assert "05   B   A" in out.getvalue(), out.getvalue()
        page.wait("document.querySelector('#grid td[data-apqn=\"05.0004\"]').textContent == 'B'")
        assert page.text('#grid td[data-apqn="05.0047"]') == "A"

        # Unplug card 05 as the hypervisor would (SE/HMC deconfigure): the page follows.
        (mount / "devices" / "ap" / "card05" / "config").write_text("0\n")
        page.until(lambda: state_of(stack, G1) == "degraded", what="guest1 degraded", timeout=15)
        cell = '#grid td[data-apqn="05.0004"]'
        page.wait(f"document.querySelector('{cell}').classList.contains('missing')")
        assert "1 of 2" in page.text(f"{row(G1)} td.guest")
        page.wait(f"document.querySelector('{row(G1)} td.guest ul.lost') !== null")
        assert "05.0004: adapter 05 is deconfigured" in page.text(f"{row(G1)} td.guest ul.lost")
        item = f"document.querySelector('{row(G1)} td.guest ul.lost li')"
        assert page.eval(f"{item}.dataset.reason") == "deconfigured"  # LostReasons' word
        title = page.eval(f"document.querySelector('{cell}').title")
        assert title.endswith(": adapter 05 is deconfigured"), title  # the daemon's reason
        page.screenshot(stack.dir / "degraded.png")
        if os.environ.get("APMATRIXD_SCREENSHOT"):
            page.screenshot(SCREENSHOT.with_name("cockpit-degraded.png"))
        assert page.text('#adapters tr[data-adapter="05"] td.configured') == "no"
        assert page.eval("document.querySelector('#grid th.adapter.down')?.textContent") == (
            "05CEX5C (deconfigured)"
        )

        # Plugged back: active again, nothing missing.
        (mount / "devices" / "ap" / "card05" / "config").write_text("1\n")
        page.until(lambda: state_of(stack, G1) == "active", what="guest1 active again", timeout=15)
        page.wait("!document.querySelector('#grid td.missing')", what="nothing missing")

        # Assigned ahead of hardware the host lacks (the kernel allows it): degraded, but drawn
        # apart from a lost APQN, and said so in the legend.
        path = f"{ROOT}/matrices/{G1.replace('-', '_')}"
        r = busctl(stack.bus, "call", MANAGER[0], path, MATRIX, "AssignAdapter", "u", "10")
        assert r.returncode == 0, r.stderr
        page.until(lambda: state_of(stack, G1) == "degraded", what="guest1 degraded", timeout=15)
        ahead = '#grid td[data-apqn="0a.0004"]'
        page.wait(f"document.querySelector('{ahead}')?.classList.contains('ahead')")
        assert not page.eval("document.querySelector('#grid td.missing')")
        assert "assigned, not on this host" in page.text("#legend")
        assert page.console() == [], page.console()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        mount.rmdir()


NOBODY = 65534
GUEST1 = ("3", "name", "s", "guest1", "adapters", "au", "2", "5", "6", "domains", "au", "1", "4")


def two_guests(stack: Stack) -> None:
    """guest1 = 05 06 x 04 and guest2 = 05 06 x 47, created with busctl (as root)."""
    for call in (
        ("Reserve", "auau", "2", "5", "6", "2", "4", "0x47"),
        ("CreateMatrix", "sa{sv}", G1, *GUEST1),
        ("CreateMatrix", "sa{sv}", G2, *GUEST2),
    ):
        r = busctl(stack.bus, "call", *MANAGER, *call)
        assert r.returncode == 0, r.stderr


def test_without_administrative_access_changes_are_offered_disabled(
    cockpit_stack: StackFactory,
) -> None:
    # Cockpit's bridge as a user who cannot turn administrative access on: what a session
    # with it off is. Reading and Check are open to everyone; every change is shown disabled
    # with the reason, and never tried.
    stack = cockpit_stack(uid=NOBODY)
    two_guests(stack)
    page = stack.open()
    page.wait("!!document.getElementById('admin-alert')", what="the read-only notice")
    assert "administrative access is off" in page.text("#admin-alert").lower()
    page.until(lambda: state_of(stack, G1) == "active", what="guest1 shown")
    changes = [
        "#create-submit",
        "#pool-reserve",
        "#pool-release",
        "#apply-open",  # Apply needs administrative access even for its dry run
        f"{row(G1)} button.stop",
        f"{row(G1)} button.remove",
    ]
    for sel in changes:
        attrs = page.eval(
            f"(e => [e.getAttribute('aria-disabled'), e.getAttribute('aria-describedby')])"
            f"(document.querySelector({json.dumps(sel)}))"
        )
        assert attrs == ["true", "admin-reason"], (sel, attrs)
    # The reason, on the button itself (a tooltip on hover and focus).
    page.click("#pool-reserve")
    page.wait(
        "[...document.querySelectorAll('.pf-v6-c-tooltip')]"
        ".some(t => t.textContent.includes('Administrative access is off'))",
        what="the reason as the button's tooltip",
    )
    # Pressing them does nothing; the Check while typing still works and sees guest1.
    page.fill("#create-adapters", "06")
    page.fill("#create-domains", "04")
    page.click("#create-submit")
    page.click(f"{row(G1)} button.remove")
    page.fill("#create-domains", "04 47")
    wait_check(stack, 2)
    assert clashes(stack) == ["06.0004", "06.0047"]
    assert page.eval("document.querySelectorAll('#alerts .alert').length") == 0
    assert not page.eval("document.getElementById('confirm-dialog')")
    r = busctl(stack.bus, "tree", "--list", MANAGER[0])
    assert len([p for p in r.stdout.split() if "/matrices/" in p]) == 2
    # Details are read-only too: the autostart switch is disabled, assign has no way in.
    page.click(f"{row(G1)} button.details")
    page.wait("!!document.getElementById('matrix-detail')", what="details")
    assert page.eval("document.getElementById('configure-autostart').disabled")
    assert page.eval("document.getElementById('assign-submit').getAttribute('aria-disabled')")
    assert page.console() == [], page.console()


def test_the_page_follows_cockpits_theme_and_the_keyboard(cockpit_stack: StackFactory) -> None:
    stack = cockpit_stack()
    two_guests(stack)
    # "auto" (Cockpit's default) follows the browser's colour scheme.
    stack.page.send(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    page = stack.open()
    dark = "document.documentElement.classList.contains('pf-v6-theme-dark')"
    page.wait(dark, what="the dark theme")
    # PatternFly's dark tokens in use: a dark card on a darker page, light text.
    luminance = """(sel => {
        const [r, g, b] = getComputedStyle(document.querySelector(sel))[PROP]
            .match(/[0-9.]+/g).map(Number);
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
    })"""
    card = luminance.replace("PROP", "'backgroundColor'")
    text = luminance.replace("PROP", "'color'")
    assert page.eval(f"{card}('#matrices-card')") < 0.25
    assert page.eval(f"{text}('#matrices-title')") > 0.75
    # A preview with a clash, as in the light picture.
    page.fill("#create-name", "guest3")
    page.fill("#create-adapters", "06")
    page.fill("#create-domains", "47 ab")
    wait_check(stack, 1)
    page.screenshot(stack.dir / "dark.png")
    if os.environ.get("APMATRIXD_SCREENSHOT"):
        page.screenshot(SCREENSHOT.with_name("cockpit-dark.png"))
    # The shell's choice wins over the browser's: it tells its frames with "cockpit-style",
    # another window's change arrives as a "storage" event.
    page.eval(
        "localStorage.setItem('shell:style', 'light');"
        "window.dispatchEvent(new CustomEvent('cockpit-style', {detail: {style: 'light'}}))"
    )
    page.wait(f"!{dark}", what="the light theme")
    assert page.eval(f"{card}('#matrices-card')") > 0.9
    page.eval(
        "localStorage.setItem('shell:style', 'auto');"
        "window.dispatchEvent(new StorageEvent('storage', {key: 'shell:style'}))"
    )
    page.wait(dark, what="the dark theme again")

    # Keyboard and screen reader basics: every field has a label; the grid is one tab stop
    # and the arrow keys move in it; a cell says what it is.
    unlabelled = page.eval(
        "[...document.querySelectorAll('input:not([type=hidden]), select')]"
        ".filter(e => !e.labels?.length && !e.getAttribute('aria-label')"
        " && !e.getAttribute('aria-labelledby')).map(e => e.outerHTML)"
    )
    assert unlabelled == []
    assert page.eval("document.querySelectorAll('#grid td[tabindex=\"0\"]').length") == 1
    page.eval("document.querySelector('#grid td[tabindex=\"0\"]').focus()")
    for key, want in (("ArrowRight", "05.0047"), ("ArrowDown", "06.0047"), ("Home", "06.0004")):
        for kind in ("keyDown", "keyUp"):
            page.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key})
        page.wait(f"document.activeElement?.dataset.apqn === '{want}'", what=f"{key} to {want}")
    label = page.eval("document.activeElement.getAttribute('aria-label')")
    assert label == f"06.0004: guest1 ({G1})", label
    assert page.console() == [], page.console()
