"""Every apmatrixctl command against a real apmatrixd on a private bus (tests/bus's rig)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

from busrig import Daemon
from ctlrig import CTL, ctl, ctl_exe, ok

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
U3 = "33333333-3333-4333-8333-333333333333"

MATRIX_KEYS = {
    "uuid", "name", "state", "adapters", "domains", "control_domains", "apqns",
    "guest_apqns", "autostart", "adopted", "manager", "sysfs_path", "in_use", "lost",
    "control_usage_domains", "path",
}  # fmt: skip
HOST_KEYS = {
    "version", "layout", "max_adapter_id", "max_domain_id", "host_adapters", "host_domains",
    "settling", "kernel_generation", "kernel_features", "boot_host_pool",
}  # fmt: skip
ADAPTER_KEYS = {
    "id", "type", "mode", "online", "configured", "domains", "guest_domains", "owners", "path",
    "checkstopped", "driver_overrides",
}  # fmt: skip


def two_guests(a: str) -> None:
    """The design document's example: reserve, then guest1 = 05,06 x 04, guest2 = 05,06 x 47."""
    ok(a, "reserve", "--adapters", "5,6", "--domains", "4,0x47")
    ok(a, "create", "guest1", "--uuid", U1, "-a", "05,06", "-d", "4")
    ok(a, "create", "guest2", "--uuid", U2, "-a", "5-6", "-d", "47")


def test_design_example_two_guests_and_the_refused_third(daemon: Daemon) -> None:
    a = daemon.address
    # Before anything is reserved: the host's drivers own every queue.
    r = ok(a, "picture")
    assert r.lines[2:5] == ["    04  47  ab  ff", "05   #   #   #   #", "06   #   #   #   #"]
    # A guest may not have queues the host still owns; the refusal is drawn.
    r = ctl(a, "create", "guest1", "-a", "5,6", "-d", "4")
    assert r.rc == 1
    err = r.err.splitlines()
    assert err[0] == (
        "apmatrixctl: HostOwned: APQNs still belong to the host: "
        "05.0004 owned by host; 06.0004 owned by host"
    )
    assert "05  #!  #   #   #" in err and "06  #!  #   #   #" in err
    two_guests(a)
    r = ok(a, "picture")
    assert r.lines == [
        "Host (upstream): 2 adapters, 4 domains; adapters down, domains across",
        "",
        "    04  47  ab  ff",
        "05   A   B   .   .",
        "06   A   B   .   .",
        "",
        f"  A  guest1  {U1}  active",
        f"  B  guest2  {U2}  active",
        "  . free (reserved, no matrix)",
    ]
    # The third guest overlaps guest2 on 06.0047: refused, named, drawn; nothing changed.
    r = ctl(a, "create", "guest3", "--uuid", U3, "-a", "6", "-d", "47,ab")
    assert r.rc == 1
    err = r.err.splitlines()
    assert err[0] == (
        f"apmatrixctl: Conflict: APQNs already in use: 06.0047 owned by guest2 ({U2})"
    )
    assert err[3:6] == ["    04  47  ab  ff", "05  A   B   .   .", "06  A   B!  .+  ."]
    assert "! clash" in r.err and "+ proposed, free to take" in r.err
    assert [m["name"] for m in ok(a, "--json", "list").json()["matrices"]] == ["guest1", "guest2"]
    # Asking first gives the same answer as a dry run, exit 1.
    r = ctl(a, "check", "-a", "6", "-d", "47,ab")
    assert r.rc == 1
    assert r.lines[:2] == [
        "Refused: adapters 06 x domains 47,ab (2 APQNs) for a new matrix: 1 APQN clash",
        f"  06.0047  owned by guest2 ({U2})",
    ]
    assert "06  A   B!  .+  ." in r.lines
    j = ctl(a, "--json", "check", "-a", "6", "-d", "47,ab")
    assert j.rc == 1
    assert j.json() == {
        "ok": False,
        "matrix": None,
        "adapters": [6],
        "domains": [0x47, 0xAB],
        "clashes": [{"apqn": [6, 0x47], "owner": U2, "owner_name": "guest2"}],
    }
    r = ok(a, "check", "-a", "6", "-d", "ab")
    assert r.lines[0].startswith("OK: adapters 06 x domains ab (1 APQN) for a new matrix")
    # The guest's own view: what it was assigned and what it gets.
    r = ok(a, "picture", "guest1")
    assert r.lines[:7] == [
        f"Matrix guest1 ({U1}): active",
        "  assigned 2 adapters x 1 domain = 2 APQNs; the guest gets 2",
        f"  sysfsdev=/sys/devices/vfio_ap/matrix/{U1}",
        "",
        "    04",
        "05   G",
        "06   G",
    ]
    ok(a, "stop", "guest1")
    r = ok(a, "picture", "guest1")
    assert "05   o" in r.lines and "o assigned, not given (matrix not live)" in r.out
    g = ok(a, "--json", "picture", "guest1").json()
    assert g["view"] == "guest" and g["matrix"]["state"] == "defined"
    assert g["cells"][0] == {"apqn": [5, 4], "assigned": True, "present": True, "guest": False}
    h = ok(a, "picture", "--json").json()
    assert h["view"] == "host" and h["letters"] == {U1: "A", U2: "B"}
    assert {"apqn": [6, 0x47], "owner": U2} in h["cells"]
    assert {"apqn": [6, 0xAB], "owner": "free"} in h["cells"]


def test_list_json_is_the_documented_shape(daemon: Daemon) -> None:
    a = daemon.address
    assert ok(a, "--json", "list").json() == {"matrices": []}
    assert "no matrices" in ok(a, "list").out
    two_guests(a)
    doc = ok(a, "list", "--json").json()
    assert set(doc) == {"matrices"}
    m1, m2 = doc["matrices"]
    assert set(m1) == MATRIX_KEYS
    assert m1 == {
        "uuid": U1,
        "name": "guest1",
        "state": "active",
        "adapters": [5, 6],
        "domains": [4],
        "control_domains": [4],
        "apqns": [[5, 4], [6, 4]],
        "guest_apqns": [[5, 4], [6, 4]],
        "autostart": False,
        "adopted": False,
        "manager": "apmatrixd",
        "sysfs_path": f"/sys/devices/vfio_ap/matrix/{U1}",
        "in_use": False,
        "lost": [],
        "control_usage_domains": True,
        "path": f"/org/apmatrix/Apmatrix1/matrices/{U1.replace('-', '_')}",
    }
    assert m2["uuid"] == U2 and m2["domains"] == [0x47]
    r = ok(a, "list")
    assert r.lines[0].split() == [
        "NAME", "UUID", "STATE", "MANAGER", "ADAPTERS", "DOMAINS", "CONTROL", "APQNS", "GUEST",
    ]  # fmt: skip
    assert r.lines[1].split() == [
        "guest1",
        U1,
        "active",
        "apmatrixd",
        "05,06",
        "04",
        "04",
        "2",
        "2",
    ]
    assert r.lines[2].split() == [
        "guest2",
        U2,
        "active",
        "apmatrixd",
        "05,06",
        "47",
        "47",
        "2",
        "2",
    ]


def test_show_by_name_uuid_and_prefix(daemon: Daemon) -> None:
    a = daemon.address
    two_guests(a)
    for ref in ("guest1", U1, U1.upper(), "1111", "11111111-1"):
        assert ok(a, "--json", "show", ref).json()["uuid"] == U1
    r = ok(a, "show", "guest2")
    assert "APQNs:           05.0047 06.0047" in r.lines
    assert r.lines[0] == "Name:            guest2"
    ok(a, "create", "--uuid", "11112222-0000-4000-8000-000000000000", "--no-start")
    r = ctl(a, "show", "1111")
    assert r.rc == 1 and "ambiguous" in r.err
    r = ctl(a, "show", "nosuch")
    assert r.rc == 1
    assert r.err.startswith("apmatrixctl: NotFound: no matrix named 'nosuch'")


def test_create_options_start_stop_remove(daemon: Daemon) -> None:
    a = daemon.address
    ok(a, "reserve", "-a", "5", "-d", "4")
    m = ok(a, "--json", "create", "g", "-a", "5", "-d", "4", "--no-start", "--autostart").json()
    assert set(m) == MATRIX_KEYS
    assert (m["state"], m["autostart"], m["guest_apqns"]) == ("defined", True, [])
    r = ok(a, "start", "g")
    assert r.out == f"g ({m['uuid']}): active\n"
    assert ok(a, "--json", "stop", "g").json()["state"] == "defined"
    r = ok(a, "--json", "remove", m["uuid"][:8])
    assert r.json()["removed"]["uuid"] == m["uuid"]
    assert ok(a, "--json", "list").json() == {"matrices": []}
    m = ok(a, "--json", "create", "-a", "5", "-d", "4", "--no-control-usage-domains").json()
    assert (m["name"], m["control_domains"], m["state"]) == ("", [], "active")
    assert ok(a, "remove", m["uuid"]).out == f"removed {m['uuid']}\n"
    r = ctl(a, "create", "x", "--uuid", "not-a-uuid")
    assert r.rc == 1 and r.err.startswith("apmatrixctl: InvalidArgument: ")
    assert len(r.err.splitlines()) == 1


def test_assign_unassign_update_several_at_once(daemon: Daemon) -> None:
    a = daemon.address
    ok(a, "reserve", "-a", "5,6", "-d", "4-7,47")
    ok(a, "create", "guest1", "-a", "5", "-d", "4")
    m = ok(a, "--json", "assign", "guest1", "--adapters", "6", "--domains", "5-7").json()
    assert (m["adapters"], m["domains"], m["control_domains"]) == (
        [5, 6],
        [4, 5, 6, 7],
        [4, 5, 6, 7],
    )
    # 05..07 are no queues of this host: assigned, but the guest does not get them.
    assert m["guest_apqns"] == [[5, 4], [6, 4]]
    r = ok(a, "picture", "guest1")
    assert "05   G   -   -   -" in r.lines and "- assigned, absent on the host" in r.out
    m = ok(a, "--json", "assign", "guest1", "-c", "0x20").json()
    assert m["control_domains"] == [4, 5, 6, 7, 0x20]
    m = ok(a, "--json", "unassign", "guest1", "-a", "6", "-d", "5,6").json()
    assert (m["adapters"], m["domains"], m["control_domains"]) == ([5], [4, 7], [4, 7, 0x20])
    r = ok(a, "update", "guest1", "-d", "47", "-c", "none")
    assert "Domains:         47" in r.lines
    assert "Control domains: 47 (every usage domain is one too)" in r.lines
    assert r.lines[-1].startswith("note: control domains 47 stay: they are usage domains"), r.out
    # usage domains replaced: the control domains that were theirs go with them
    m = ok(a, "--json", "update", "guest1", "-a", "none", "-d", "none").json()
    assert (m["adapters"], m["domains"], m["control_domains"]) == ([], [], [])
    ok(a, "update", "guest1", "-a", "5", "-d", "47", "-c", "none")  # as it was
    # renamed and autostarted over D-Bus (Configure); a name that reads as a UUID is refused
    m = ok(a, "--json", "configure", "guest1", "--name", "g-one", "--autostart", "yes").json()
    assert (m["name"], m["autostart"]) == ("g-one", True)
    r = ctl(a, "configure", "g-one", "--name", "abc1")
    assert r.rc == 1 and "reads as a UUID prefix" in r.err, r.err
    ok(a, "configure", "g-one", "--name", "guest1", "--autostart", "no")
    # All or nothing: a refused assign changes nothing and draws the proposal.
    ok(a, "create", "guest2", "-a", "6", "-d", "4")
    r = ctl(a, "assign", "guest1", "-a", "6", "-d", "4")
    assert r.rc == 1
    assert r.err.splitlines()[0].startswith("apmatrixctl: Conflict: APQNs already in use: 06.0004")
    # 05.0047 is guest1's already: '=' (not '+', which reads as something to take)
    assert "05  .+  A=  .   ." in r.err and "06  B!  .+  .   ." in r.err, r.err
    assert "= proposed, already its own" in r.err
    assert ok(a, "--json", "show", "guest1").json()["adapters"] == [5]
    r = ctl(a, "check", "guest1", "-a", "6", "-d", "4")
    assert r.rc == 1 and "06.0004  owned by guest2" in r.out
    r = ctl(a, "assign", "guest1")
    assert r.rc == 2 and "give at least one of" in r.err


def test_adapters_reserve_release(daemon: Daemon) -> None:
    a = daemon.address
    r = ok(a, "adapters")
    assert r.lines[0] == "Kernel: vfio_ap 6.19+"  # the features wrap: 80 columns
    assert r.lines[1].startswith("  features: guest_matrix, hotplug, ap_config")
    assert max(map(len, r.lines)) <= 80, r.out
    lines = r.lines[r.lines.index("Host pool: adapters 00-ff") :]
    assert lines[2] == "           (apmask/aqmask: ids of absent adapters and domains included)"
    assert lines[4].split() == [
        "CARD", "TYPE", "MODE", "STATUS", "CONFIG", "DOMAINS", "VFIO", "HELD", "BY",
    ]  # fmt: skip
    assert lines[5].split() == [
        "05",
        "CEX5C",
        "CCA-Coproc",
        "online",
        "yes",
        "04,47,ab,ff",
        "-",
        "-",
    ]
    r = ok(a, "reserve", "-a", "5", "-d", "4,47")
    assert r.lines[:2] == [
        "Host pool: adapters 00-04,06-ff",
        "           domains  00-03,05-46,48-ff",
    ]
    ok(a, "create", "guest1", "-a", "5", "-d", "4")
    doc = ok(a, "--json", "adapters").json()
    assert set(doc) == {"host", "adapters"} and set(doc["host"]) == HOST_KEYS
    a5 = doc["adapters"][0]
    assert set(a5) == ADAPTER_KEYS
    assert (a5["id"], a5["type"], a5["owners"]) == (
        5,
        "CEX5C",
        [[4, ok(a, "--json", "show", "guest1").json()["uuid"]]],
    )
    (row5,) = [ln for ln in ok(a, "adapters").lines if ln.startswith("05 ")]
    assert row5.rstrip().endswith("  guest1"), row5  # the name: show gives the UUID
    r = ctl(a, "release", "-a", "5")
    assert r.rc == 1 and r.err.startswith("apmatrixctl: Busy: ")
    ok(a, "remove", "guest1")
    assert ok(a, "--json", "release", "-a", "5", "-d", "4,47").json()["host"][
        "host_adapters"
    ] == list(range(256))
    assert ctl(a, "reserve").rc == 2


def test_monitor_follows_signals_until_ctrl_c(daemon: Daemon) -> None:
    a = daemon.address
    for as_json in (False, True):
        argv = [str(CTL), "--address", a, *(["--json"] if as_json else []), "monitor"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stderr is not None
            ready, _, _ = select.select([p.stderr], [], [], 15)
            assert ready and "Ctrl-C stops" in p.stderr.readline()
            name = f"m{int(as_json)}"
            ok(a, "reserve", "-a", "5", "-d", "4")
            ok(a, "create", name, "-a", "5", "-d", "4")
            ok(a, "stop", name)
            ok(a, "remove", name)
            ok(a, "release", "-a", "5", "-d", "4")
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        assert "Traceback" not in err
        lines = out.splitlines()
        if as_json:
            import json

            docs = [json.loads(x) for x in lines]
            kinds = [d["signal"] for d in docs]
            assert {"InterfacesAdded", "InterfacesRemoved", "PropertiesChanged"} <= set(kinds)
            assert all({"time", "signal", "path"} <= set(d) for d in docs)
        else:
            text = "\n".join(lines)
            assert " host HostAdapters=00-04,06-ff" in text
            assert f"InterfacesAdded     matrix {name} (" in text
            assert "Owners=04:m0" in text
            assert " State=defined" in text
            assert "InterfacesRemoved   matrix m0 (" in text


def test_mdevctl_export_then_import(start: object, tmp_path: Path) -> None:
    d = start("--simulate", "--state-dir", str(tmp_path / "state"))  # type: ignore[operator]
    a = d.address
    probe = ctl(a, "export-mdevctl", str(tmp_path / "missing"))
    assert "UnknownMethod" not in probe.err, probe.err  # the daemon has ExportMdevctl
    two_guests(a)
    out = tmp_path / "mdevctl.d"
    out.mkdir()
    r = ok(a, "export-mdevctl", str(out))
    assert r.out == f"exported to {out}\n"
    assert sorted(p.name for p in (out / "matrix").iterdir()) == [U1, U2]
    ok(a, "remove", "guest1")
    ok(a, "remove", "guest2")
    doc = ok(a, "--json", "import-mdevctl", str(out)).json()
    assert [m["uuid"] for m in doc["imported"]] == [U1, U2]
    assert {m["state"] for m in doc["imported"]} == {"defined"}
    r = ctl(a, "import-mdevctl", str(out))
    assert r.rc == 1 and len(r.err.splitlines()) == 1


def test_daemon_not_running_is_one_line(system_bus: str) -> None:
    r = ctl_exe("--address", system_bus, "list")
    assert r.rc == 1 and r.out == ""
    assert r.err.splitlines() == [
        "apmatrixctl: apmatrixd is not running (org.apmatrix.Apmatrix1 has no owner on the bus "
        f"at {system_bus}): start it with 'systemctl start apmatrixd' (or try it out: "
        "'sudo tools/demo', then --address unix:path=/run/apmatrixd-demo/bus)"
    ]
    r = ctl_exe("--address", "unix:path=/nonexistent/bus", "picture")
    assert r.rc == 1 and len(r.err.splitlines()) == 1 and "systemctl start apmatrixd" in r.err
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/bus")
    r = ctl_exe("adapters", env=env)
    assert r.rc == 1 and "cannot reach the system bus" in r.err
    r = ctl_exe("--address", "nonsense", "list")
    assert r.rc == 2 and r.err.startswith("apmatrixctl: bad bus address")


def test_usage_errors_exit_2(system_bus: str) -> None:
    for argv in (
        ["frobnicate"],
        [],
        ["assign"],
        ["create", "-a", "100"],
        ["create", "-a", "7-4"],
        ["check", "-a", "5", "-d", "x"],
        ["update", "g", "-a", ""],
        ["list", "--bogus"],
    ):
        r = ctl_exe("--address", system_bus, *argv)
        assert r.rc == 2, (argv, r)
        assert r.err.splitlines()[-1].startswith("apmatrixctl: "), (argv, r)
    r = ctl_exe("--help")
    assert r.rc == 0 and "a bare 47 is 0x47" in r.out and '{"matrices": [Matrix]}' in r.out


def test_big_host_fits_in_80_columns(start: object) -> None:
    d = start("--simulate", "big")  # type: ignore[operator]
    a = d.address
    r = ok(a, "picture")
    assert r.lines[2:4] == ["       00-ff", "00-ff      #"]
    ok(a, "reserve", "-a", "10-1f", "-d", "0-3f")
    ok(a, "create", "wide", "-a", "10-1f", "-d", "0-3f")
    ok(a, "reserve", "-a", "0x20", "-d", "0x40")
    ok(a, "create", "odd", "-a", "20", "-d", "0x40")
    r = ok(a, "picture")
    assert max(map(len, r.lines)) <= 80
    assert len(r.lines) < 40
    assert "10-1f" in r.out and "A" in r.out and "B" in r.out
    r = ok(a, "picture", "wide")
    assert max(map(len, r.lines)) <= 80


def test_picture_of_a_degraded_matrix_says_why(start: object, tmp_path: Path) -> None:
    """A live matrix whose card is deconfigured: the lost APQN is 'not given', with the
    daemon's reason, not 'matrix not live'."""
    mount = tmp_path / "sys"
    mount.mkdir()
    d = start("--simulate", "--sim-mount", str(mount))  # type: ignore[operator]
    try:
        a = d.address
        ok(a, "reserve", "-a", "5,6", "-d", "4")
        ok(a, "create", "guest1", "-a", "5,6", "-d", "4")
        (mount / "devices" / "ap" / "card05" / "config").write_text("0\n")
        deadline = time.monotonic() + 10
        while ok(a, "--json", "show", "guest1").json()["state"] != "degraded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = ok(a, "picture", "guest1")
        assert "05   o" in r.lines and "06   G" in r.lines, r.out
        assert "o assigned, not given (why: below)" in r.out and "matrix not live" not in r.out
        assert "    05.0004  adapter 05 is deconfigured" in r.lines, r.out
    finally:
        d.terminate()  # type: ignore[attr-defined]
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def test_rough_edges_a_new_user_found(daemon: Daemon) -> None:
    a = daemon.address
    two_guests(a)
    # --json: a refusal is JSON on stdout too (and the line on stderr)
    r = ctl(a, "--json", "create", "guest3", "-a", "6", "-d", "47")
    assert r.rc == 1 and r.err.startswith("apmatrixctl: Conflict: ")
    doc = r.json()
    assert doc["error"]["name"] == "org.apmatrix.Apmatrix1.Error.Conflict"
    assert doc["error"]["exit"] == 1 and "06.0047" in doc["error"]["message"]
    r = ctl(a, "--json", "show", "nosuch")
    assert r.rc == 1 and r.json()["error"]["name"] == "org.apmatrix.Apmatrix1.Error.NotFound"
    # a negative id is named as such
    r = ctl_exe("--address", a, "assign", "guest1", "-a", "-1")
    assert r.rc == 2 and "ids are never negative" in r.err, r.err
    # a defined matrix's sysfsdev does not exist yet: said so
    ok(a, "stop", "guest1")
    assert "(once started: the matrix is only defined)" in ok(a, "picture", "guest1").out
    # several matrices at once
    r = ok(a, "start", "guest1", "guest2")
    assert r.lines == [f"guest1 ({U1}): active", f"guest2 ({U2}): active"]
    doc = ok(a, "--json", "remove", "guest1", "guest2").json()
    assert [m["uuid"] for m in doc["removed"]] == [U1, U2]
    assert ok(a, "--json", "list").json() == {"matrices": []}


def test_the_host_pool_line_says_what_it_counts_on_each_layout(start: object) -> None:
    """Upstream shows the masks (absent ids included), the 2017 layout the bound queues: the
    same line said different things."""
    for scenario, note in (
        ("default", "(apmask/aqmask: ids of absent adapters and domains included)"),
        ("rfc2017", "(queues bound to the host's drivers: present ones only)"),
    ):
        d = start("--simulate", scenario)  # type: ignore[operator]
        r = ok(d.address, "reserve", "-a", "5,6", "-d", "4,47,ab,ff")
        assert r.lines[2].strip() == note, (scenario, r.out)
        if scenario == "rfc2017":
            assert r.lines[0] == "Host pool: adapters -", r.out
        ok(d.address, "create", "g", "-a", "5", "-d", "4")
        d.terminate()  # type: ignore[attr-defined]
