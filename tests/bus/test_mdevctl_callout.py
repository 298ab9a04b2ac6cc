"""Debian's real mdevctl (1.2) with apmatrixd-callout in its callout directory, against the
daemon in real-host mode on the FUSE emulator (``rigs.NsRig``: the emulated tree on /sys and a
scratch directory on /etc/mdevctl.d, in a private mount namespace).

- a definition clashing with one of ours is vetoed before mdevctl writes anything, with one
  line naming each APQN and its owner;
- one that fits is held by apmatrixd as mdevctl's (Manager "mdevctl"): a CreateMatrix on its
  APQNs gets Conflict naming it; apmatrixd never changes it (NotManaged);
- mdevctl start/modify/undefine are followed; a live modify beyond the rules is vetoed;
- apmatrixd not running: the callout defers (exit 2), so s390-tools' ap-check, the next
  callout, still guards; the definition made meanwhile is held once apmatrixd starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, arun, busctl
from rigs import NsRig, need_fuse, need_netns, need_tool
from s390rig import built

from apmatrixd import callout
from apmatrixd.bus import names

G1 = "11111111-1111-4111-8111-111111111111"  # ours
G2 = "22222222-2222-4222-8222-222222222222"  # mdevctl's
G3 = "33333333-3333-4333-8333-333333333333"
G4 = "44444444-4444-4444-8444-444444444444"
G5 = "55555555-5555-4555-8555-555555555555"

CALLOUT = f"""#!/bin/sh
exec {sys.executable} -m apmatrixd.callout "$@"
"""


@pytest.fixture
def nsrig() -> Iterator[NsRig]:
    need_fuse()
    need_netns()
    need_tool("mdevctl", "mdevctl")
    rig = NsRig.start("default", prefix="apmatrixd-mdevctl-")
    try:
        yield rig
    finally:
        rig.close()


class Mdevctl:
    """mdevctl in the rig's namespace, its callouts told where the system bus is."""

    def __init__(self, rig: NsRig, scratch: Path, bus: str) -> None:
        self.rig, self.scratch, self.bus = rig, scratch, bus
        self.callouts = scratch / "scripts.d" / "callouts"
        for sub in ("callouts", "notifiers"):
            (scratch / "scripts.d" / sub).mkdir(parents=True, exist_ok=True)

    def run(
        self, *args: str, jsonfile: dict[str, object] | None = None
    ) -> subprocess.CompletedProcess[str]:
        extra: list[str] = []
        if jsonfile is not None:
            f = self.rig.top / f"def-{time.monotonic_ns()}.json"
            f.write_text(json.dumps(jsonfile))
            extra = ["--jsonfile", str(f)]
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus)
        return subprocess.run(
            self.rig.argv("mdevctl", *args, *extra, mdevctl_scratch=self.scratch),
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip

    def define(self, uuid: str, start: str, **sets: list[int]) -> subprocess.CompletedProcess[str]:
        return self.run("define", "-u", uuid, "-p", "matrix", jsonfile=definition(start, **sets))

    def file(self, uuid: str) -> Path:
        return self.scratch / "matrix" / uuid


def definition(start: str, adapters: list[int], domains: list[int]) -> dict[str, object]:
    attrs = [{"assign_adapter": f"{a:#x}"} for a in adapters]
    attrs += [{"assign_domain": f"{d:#x}"} for d in domains]
    return {"mdev_type": "vfio_ap-passthrough", "start": start, "attrs": attrs}


def props(bus: str, uuid: str) -> dict[str, object] | None:
    async def go() -> dict[str, object] | None:
        c = await Client.connect(bus)
        try:
            path = names.matrix_path(uuid)
            reply = await c.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [MATRIX])
            if reply.error_name:
                return None
            return {k: v.value for k, v in reply.body[0].items()}
        finally:
            c.bus.disconnect()

    result: dict[str, object] | None = arun(go())
    return result


def wait_for(bus: str, uuid: str, key: str, want: object, t: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + t
    while True:
        p = props(bus, uuid)
        if p is not None and p.get(key) == want:
            return p
        assert time.monotonic() < deadline, (uuid, key, want, p)
        time.sleep(0.05)


def call(bus: str, *args: str) -> subprocess.CompletedProcess[str]:
    return busctl(bus, "call", names.BUS_NAME, ROOT, MANAGER, *args)


ARGS = ["-e", "pre", "-a", "define", "-s", "none", "-u", G2, "-p", "matrix"]


def test_the_callout_leaves_other_devices_and_a_stopped_apmatrixd_to_the_next_one(
    tmp_path: Path,
) -> None:
    """Exit 2 ("not mine") for another mdev type, and when the bus or apmatrixd is not there."""
    assert callout.main(["-t", "i915-GVTg_V5_4", *ARGS]) == callout.DEFER
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/none")
    r = subprocess.run(
        [sys.executable, "-m", "apmatrixd.callout", "-t", "vfio_ap-passthrough", *ARGS],
        input=json.dumps(definition("auto", [5], [4])), capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (2, ""), r.stderr


def test_the_callout_tells_mdevctl_13_what_it_supports() -> None:
    """mdevctl 1.3 sends what it provides; the answer is the subset this callout handles."""
    provides = {"provides": {"version": 2, "actions": ["start", "stop", "define", "undefine",
                "modify", "attributes", "capabilities"], "events": ["pre", "post", "notify",
                "get", "live"]}}  # fmt: skip
    got = json.loads(callout._capabilities(json.dumps(provides).encode()))["supports"]
    assert got["version"] == 2
    assert set(got["actions"]) == set(provides["provides"]["actions"])  # type: ignore[index]
    assert got["events"] == ["pre", "post", "get", "live"]  # not notify: that is for notifiers
    older = {"provides": {"version": 1, "actions": ["define"], "events": ["pre", "post"]}}
    got = json.loads(callout._capabilities(json.dumps(older).encode()))["supports"]
    assert (got["actions"], got["events"]) == (["define"], ["pre", "post"])


@pytest.mark.e2e
def test_mdevctl_asks_apmatrixd_through_its_callout(nsrig: NsRig, system_bus: str) -> None:
    scratch = nsrig.top / "mdevctl.d"
    md = Mdevctl(nsrig, scratch, system_bus)
    (md.callouts / "00-apmatrixd-callout").write_text(CALLOUT)
    (md.callouts / "00-apmatrixd-callout").chmod(0o755)
    daemon, _ = nsrig.daemon(system_bus, nsrig.top / "state", "--mdevctl-dir", str(scratch))
    try:
        assert call(system_bus, "Reserve", "auau", "2", "5", "6", "2", "4", "0x47").returncode == 0
        r = call(system_bus, "CreateMatrix", "sa{sv}", G1, "3", "name", "s", "guest1",
                 "adapters", "au", "1", "5", "domains", "au", "2", "4", "0x47")  # fmt: skip
        assert r.returncode == 0, r.stderr

        # a clash with ours: vetoed, nothing written, the APQNs and their owner named
        r = md.define(G2, "auto", adapters=[5, 6], domains=[0x47])
        assert r.returncode != 0
        assert "Conflict" in r.stderr and "05.0047 owned by guest1" in r.stderr, r.stderr
        assert "06.0047" not in r.stderr.split("Conflict", 1)[1]
        assert not md.file(G2).exists()
        # and one that is not reserved: HostOwned, named
        r = md.define(G2, "auto", adapters=[7], domains=[1])
        assert r.returncode != 0 and "HostOwned" in r.stderr, r.stderr
        assert "07.0001 owned by host" in r.stderr and not md.file(G2).exists()

        # one that fits: held as mdevctl's, and every decision counts it
        r = md.define(G2, "auto", adapters=[6], domains=[0x47])
        assert r.returncode == 0, r.stderr
        p = wait_for(system_bus, G2, "Manager", "mdevctl")
        assert (p["State"], p["Autostart"], p["Adapters"]) == ("defined", True, [6])
        r = call(system_bus, "CreateMatrix", "sa{sv}", G3, "2",
                 "adapters", "au", "1", "6", "domains", "au", "1", "0x47")  # fmt: skip
        assert r.returncode != 0 and f"06.0047 owned by mdevctl's definition {G2}" in r.stderr
        r = busctl(system_bus, "call", names.BUS_NAME, names.matrix_path(G2), MATRIX, "Start")
        assert r.returncode != 0 and "mdevctl manages matrix" in r.stderr, r.stderr

        # mdevctl starts it; a live change that would clash is vetoed before sysfs
        r = md.run("start", "-u", G2)
        assert r.returncode == 0, r.stderr
        wait_for(system_bus, G2, "State", "active")
        r = md.run("modify", "-u", G2, "--addattr=assign_adapter", "--value=5")
        assert r.returncode != 0 and "05.0047 owned by guest1" in r.stderr, r.stderr
        assert "0x5" not in md.file(G2).read_text() and 'assign_adapter": "5' not in (
            md.file(G2).read_text()
        )
        r = md.run("stop", "-u", G2)
        assert r.returncode == 0, r.stderr
        wait_for(system_bus, G2, "State", "defined")
        r = md.run("undefine", "-u", G2)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while props(system_bus, G2) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        daemon.terminate()
        daemon.close()

    # apmatrixd not running: the callout defers to ap-check, which still guards
    ap_check = built(("libutil",), ("ap_tools", "ap-check")) / "ap_tools" / "ap-check"
    # mdevctl 1.2 asks in directory (readdir) order, not name order: pick a name for ap-check
    # that this directory lists after ours (1.3 sorts by name: "00-" comes first there)
    for i in range(64):
        link = md.callouts / f"ap-check{i or ''}"
        link.symlink_to(ap_check)
        if os.listdir(md.callouts).index("00-apmatrixd-callout") == 0:
            break
        link.unlink()
    else:
        raise AssertionError(f"no name lists after ours: {os.listdir(md.callouts)}")
    r = md.define(G4, "auto", adapters=[6], domains=[4])
    assert r.returncode == 0, r.stderr
    r = md.define(G5, "auto", adapters=[6], domains=[4])
    assert r.returncode != 0 and f"ap-check: APQN 6.4 is defined for autostart by {G4}" in r.stderr
    assert not md.file(G5).exists()

    # started again, apmatrixd holds what mdevctl defined meanwhile
    daemon, _ = nsrig.daemon(system_bus, nsrig.top / "state", "--mdevctl-dir", str(scratch))
    try:
        p = wait_for(system_bus, G4, "Manager", "mdevctl")
        assert (p["Adapters"], p["Domains"]) == ([6], [4])
        assert props(system_bus, G1) is not None and props(system_bus, G5) is None
    finally:
        daemon.terminate()
        daemon.close()
