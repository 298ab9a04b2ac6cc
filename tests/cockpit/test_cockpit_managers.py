"""The Cockpit page with matrices apmatrixd does not manage and chzdev's boot masks: an
mdevctl definition (Manager "mdevctl") and an mdev made with a shell in the FUSE-mounted
emulator (Manager "external") are shown as theirs, every change of them disabled with the
reason, and Take over asks first, then makes one ours; chzdev's persistent masks and where
apmatrixd's reservations disagree with them (Manager.BootHostPool); the drift counts and last
rescan (Manager.Statistics)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from busrig import ROOT, busctl
from cockpitrig import REPO, StackFactory, disabled_reason
from test_chzdev import RULE  # chzdev -t ap apmask=-5,-6 aqmask=-4,-0x47 -p

pytestmark = pytest.mark.e2e

MANAGER = ("org.apmatrix.Apmatrix1", ROOT, "org.apmatrix.Apmatrix1.Manager")
OURS = "11111111-1111-4111-8111-111111111111"
MDEVCTL = "22222222-2222-4222-8222-222222222222"
SHELL = "33333333-3333-4333-8333-333333333333"


def row(uuid: str) -> str:
    return f'#matrices tr[data-uuid="{uuid}"]'


def test_matrices_of_other_managers_and_the_boot_host_pool(
    cockpit_stack: StackFactory, tmp_path: Path
) -> None:
    mount = Path(f"/tmp/apm-sim-{os.getpid()}-{time.monotonic_ns()}")
    mount.mkdir()
    rules, etc = tmp_path / "rules.d", tmp_path / "mdevctl.d"
    rules.mkdir()
    (etc / "matrix").mkdir(parents=True)
    (rules / "41-ap.rules").write_text(RULE)
    try:
        stack = cockpit_stack(
            "--simulate", "--sim-mount", str(mount), "--mdevctl-dir", str(etc),
            "--udev-rules-dir", str(rules), "--rescan-interval", "0.5",
        )  # fmt: skip
        # apmatrixd reserves domain ab beyond chzdev's masks, and makes one matrix of its own.
        for call in (
            ("Reserve", "auau", "2", "5", "6", "3", "4", "0x47", "0xab"),
            ("CreateMatrix", "sa{sv}", OURS, "3", "name", "s", "ours",
             "adapters", "au", "2", "5", "6", "domains", "au", "1", "4"),
        ):  # fmt: skip
            r = busctl(stack.bus, "call", *MANAGER, *call)
            assert r.returncode == 0, r.stderr
        # mdevctl defines one (mdevctl define: its file, then its callout's reload) ...
        attrs = [{"assign_adapter": "0x5"}, {"assign_adapter": "0x6"}, {"assign_domain": "0x47"}]
        definition = {"mdev_type": "vfio_ap-passthrough", "start": "manual", "attrs": attrs}
        (etc / "matrix" / MDEVCTL).write_text(json.dumps(definition, indent=2))
        r = busctl(stack.bus, "call", *MANAGER, "ReloadMdevctl")
        assert r.returncode == 0, r.stderr
        # ... and an admin makes an mdev with a shell, as KubeVirt or a DRA driver would.
        matrix = mount / "devices" / "vfio_ap" / "matrix"
        (matrix / "mdev_supported_types" / "vfio_ap-passthrough" / "create").write_text(SHELL)
        (matrix / SHELL / "assign_adapter").write_text("6\n")
        (matrix / SHELL / "assign_domain").write_text("0xab\n")

        page = stack.open()
        page.wait(f"!!document.querySelector('{row(SHELL)}')", what="the shell's mdev adopted")
        page.until(lambda: page.text('#grid td[data-apqn="06.00ab"]') != "", what="06.00ab held")
        managers = page.eval(
            "Object.fromEntries([...document.querySelectorAll('#matrices tr[data-uuid]')]"
            ".map(tr => [tr.dataset.uuid, tr.querySelector('td.manager').textContent]))"
        )
        assert managers == {OURS: "apmatrixd", MDEVCTL: "mdevctl", SHELL: "external"}

        # Only apmatrixd's own matrix offers changes; the others say why, and offer Take over.
        for sel in (f"{row(OURS)} button.stop", f"{row(OURS)} button.remove"):
            assert disabled_reason(stack, sel) is None, sel
        assert not page.eval(f"!!document.querySelector('{row(OURS)} button.takeover')")
        why = disabled_reason(stack, f"{row(MDEVCTL)} button.start")
        assert why and why.startswith("Managed by mdevctl: apmatrixd changes only its own"), why
        assert "change it with mdevctl, or Take over" in why
        assert disabled_reason(stack, f"{row(MDEVCTL)} button.remove") == why
        why = disabled_reason(stack, f"{row(SHELL)} button.stop")
        assert why and why.startswith("Managed by another tool"), why
        for uuid in (MDEVCTL, SHELL):
            assert disabled_reason(stack, f"{row(uuid)} button.takeover") is None

        # The grid tells them apart by shape, the legend and the tooltips say whose they are.
        cell = '#grid td[data-apqn="05.0047"]'
        assert page.eval(f"document.querySelector('{cell}').classList.contains('by-mdevctl')")
        assert page.eval(f"document.querySelector('{cell}').title").endswith(", managed by mdevctl")
        assert page.eval(
            "document.querySelector('#grid td[data-apqn=\"06.00ab\"]').classList"
            ".contains('by-external')"
        )
        ours = "document.querySelector('#grid td[data-apqn=\"05.0004\"]').className"
        assert "by-" not in page.eval(ours)  # apmatrixd's own: no mark
        assert "managed by mdevctl" in page.text("#legend-mdevctl")
        assert "made outside apmatrixd" in page.text("#legend-external")

        # The details of mdevctl's: who manages it, and no way to change it here.
        page.click(f"{row(MDEVCTL)} button.details")
        page.wait("!!document.getElementById('detail-not-managed')", what="details")
        assert "/etc/mdevctl.d" in page.text("#detail-not-managed")
        assert page.eval("document.getElementById('configure-autostart').disabled")
        assert (disabled_reason(stack, "#assign-submit") or "").startswith("Managed by mdevctl")
        assert (disabled_reason(stack, "#configure-rename") or "").startswith("Managed by mdevctl")
        page.click("#matrix-detail button[aria-label='Close details']")

        # chzdev's boot masks, and where apmatrixd's reservations disagree with them.
        assert page.text("#boot-pool-adapters") == "05 06"
        assert page.text("#boot-pool-domains") == "04 47"
        assert page.eval("document.getElementById('boot-pool').dataset.file") == str(
            rules / "41-ap.rules"
        )
        drift = page.text("#boot-pool-drift-text")
        assert drift == "domains ab reserved by apmatrixd, the host's at boot.", drift

        page.screenshot(stack.dir / "managers.png")
        if os.environ.get("APMATRIXD_SCREENSHOT"):
            page.screenshot(REPO / "docs" / "cockpit-managers.png")

        # The shell's mdev was a drift ("created"): counted, with the last rescan, on demand.
        page.wait("Number(document.getElementById('statistics')?.dataset.drifts) > 0")
        page.click("#statistics")
        page.wait("!!document.getElementById('statistics-detail')", what="the statistics popover")
        assert "an mdev created outside" in page.text('#statistics-detail li[data-kind="created"]')
        assert page.text("#statistics-rescan") != "not yet"
        page.click("#statistics")  # closes it

        # Take over the shell's mdev: asked first, saying what it means; then it is ours.
        page.click(f"{row(SHELL)} button.takeover")
        page.wait("!!document.getElementById('confirm-dialog')", what="the Take over dialog")
        text = page.text("#confirm-dialog")
        assert "Take over 33333333 from another tool?" in text, text
        assert "that tool no longer decides about it" in text, text
        page.click("#confirm-submit")
        page.wait(
            f"document.querySelector('{row(SHELL)} td.manager').textContent === 'apmatrixd'",
            what="the mdev apmatrixd's",
        )
        assert disabled_reason(stack, f"{row(SHELL)} button.stop") is None
        assert not page.eval(f"!!document.querySelector('{row(SHELL)} button.takeover')")
        page.click(f"{row(SHELL)} button.stop")
        page.wait(f"document.querySelector('{row(SHELL)} td.state').dataset.state === 'defined'")
        r = busctl(stack.bus, "get-property", MANAGER[0],
                   f"{ROOT}/matrices/{SHELL.replace('-', '_')}", "org.apmatrix.Apmatrix1.Matrix",
                   "Manager")  # fmt: skip
        assert r.stdout.strip() == 's "apmatrixd"', r.stdout
        assert page.console() == [], page.console()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        mount.rmdir()
