"""Manager.BootHostPool and its Drift, end to end: the real chzdev (s390-tools, built from the
third-party tarball) keeps its persistent masks for the emulated host the daemon runs on
(``--sim-mount``), the daemon reads them (``--udev-rules-dir``, the simulated host's
/etc/udev/rules.d) at start-up and at each rescan, busctl reads the property, and a Drift on
the Manager's path names the ids where chzdev's and apmatrixd's reservations disagree."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from busrig import MANAGER, NAME, ROOT, Client, DaemonFactory, arun, busctl_json
from rigs import need_fuse
from s390rig import run_zdev

from apmatrixd.ctl.main import main as ctl_main

pytestmark = pytest.mark.e2e


def boot_pool(address: str) -> dict[str, Any]:
    """BootHostPool as busctl --json gives it ({key: value})."""
    data = busctl_json(address, "get-property", NAME, ROOT, MANAGER, "BootHostPool")["data"]
    return {k: v["data"] for k, v in data.items()}


def until(what: str, check: Callable[[], bool], t: float = 10) -> None:
    deadline = time.monotonic() + t
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def drifts(c: Client) -> list[str]:
    """The Drift texts sent on the Manager's path about chzdev's masks."""
    return [
        str(m.body[1])
        for m in c.signals
        if m.member == "Drift" and m.body[0] == ROOT and "chzdev" in str(m.body[1])
    ]


def adapters_text(address: str) -> list[str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert ctl_main(["--address", address, "adapters"]) == 0, err.getvalue()
    return out.getvalue().splitlines()


def test_boot_host_pool_follows_chzdev_and_drift_names_the_ids(
    start: DaemonFactory, tmp_path: Path
) -> None:
    need_fuse()
    sysfs, etc, state = tmp_path / "sys", tmp_path / "etc", tmp_path / "state"
    sysfs.mkdir()
    rules = etc / "udev" / "rules.d"
    rule = rules / "41-ap.rules"
    args = ("--simulate", "--state-dir", str(state), "--udev-rules-dir", str(rules))
    d = start(*args, "--sim-mount", str(sysfs), "--rescan-interval", "0.2")
    a = d.address
    assert boot_pool(a) == {}  # no rule yet

    def chzdev(*settings: str) -> None:
        r = run_zdev("chzdev", sysfs, etc, "-t", "ap", *settings, "-p")
        assert r.returncode == 0, r.stdout + r.stderr

    async def go() -> None:
        c = await Client.connect(a)
        await c.listen()
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4]])
        chzdev("apmask=-5,-6", "aqmask=-4,-0x47")
        written = rule.read_bytes(), rule.stat().st_mtime_ns
        await asyncio.to_thread(until, "the rescan reads the rule", lambda: "file" in boot_pool(a))
        pool = boot_pool(a)
        assert pool["file"] == str(rule)
        assert pool["reserved_adapters"] == [5, 6] and pool["reserved_domains"] == [4, 0x47]
        assert pool["apmask"] == "0xf9" + "f" * 62 and pool["aqmask"].startswith("0xf7ff")
        assert "drift" not in pool and drifts(c) == []  # ours are a part of chzdev's

        # apmatrixd reserves what chzdev gives the host at boot: a Drift right away
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[7], []])
        await asyncio.to_thread(until, "a Drift", lambda: bool(drifts(c)))
        text = (
            f"chzdev's persistent AP masks ({rule}) disagree with apmatrixd's: "
            "adapters 07 reserved by apmatrixd, the host's at boot"
        )
        assert drifts(c) == [text]
        assert boot_pool(a)["drift"] == "adapters 07 reserved by apmatrixd, the host's at boot"
        lines = await asyncio.to_thread(adapters_text, a)
        at = lines.index(f"At boot (chzdev, {rule}):")
        assert lines[at + 1 : at + 4] == [
            "  for guests: adapters 05,06",
            "              domains  04,47",
            "  differs from apmatrixd: adapters 07 reserved by apmatrixd, the host's at boot",
        ]

        # chzdev follows; at the next rescan the two agree again, with no further Drift
        chzdev("apmask=-7")
        written = rule.read_bytes(), rule.stat().st_mtime_ns
        await asyncio.to_thread(until, "re-read", lambda: "drift" not in boot_pool(a))
        assert boot_pool(a)["reserved_adapters"] == [5, 6, 7]

        # apmatrixd gives back to the host what chzdev reserves: said at once (the masks
        # change) or, if they do not, at the next rescan
        await c.ok(ROOT, MANAGER, "Release", "auau", [[], [4]])
        await asyncio.to_thread(until, "a second Drift", lambda: len(drifts(c)) == 2)
        assert drifts(c)[1].endswith(": domains 04 released by apmatrixd, reserved at boot")
        await asyncio.sleep(0.5)  # rescans meanwhile: the same disagreement, no new Drift
        assert len(drifts(c)) == 2
        c.close()
        assert (rule.read_bytes(), rule.stat().st_mtime_ns) == written  # never written back

    arun(go())

    # a daemon starting with the disagreement says so once it serves
    d.terminate()

    async def again() -> list[str]:
        c = await Client.connect(a)
        await c.listen(f"type='signal',interface='{MANAGER}',member='Drift'", settle=False)
        d2 = start(*args)
        await asyncio.to_thread(until, "the start-up Drift", lambda: bool(drifts(c)))
        await c.settle()
        c.close()
        d2.terminate()
        return drifts(c)

    (text,) = arun(again())
    assert text.endswith(": domains 04 released by apmatrixd, reserved at boot")

    # a link planted in its place is not followed: the pool says why, and holds no mask
    rule.unlink()
    rule.symlink_to(tmp_path / "elsewhere")
    start(*args)
    assert boot_pool(a) == {"file": str(rule), "error": "is a symbolic link (not followed)"}
