"""apmatrixd on a real (private) system bus: the daemon process, our shipped policy, polkit mock,
busctl and dbus-fast clients. Fresh daemon per test on the in-process emulator."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from busrig import (
    ACCESS_DENIED,
    ADAPTER,
    ERR,
    MANAGER,
    MATRIX,
    NAME,
    NOBODY,
    ROOT,
    XML,
    Client,
    Daemon,
    DaemonFactory,
    PolkitMock,
    arun,
    busctl,
    busctl_json,
    call_as,
    dump_tree,
    path_of,
    run_client,
    spec,
    start_daemon,
    unvariant,
    v,
)
from dbus_fast import Variant
from rigs import need_tool

GUEST1 = "11111111-1111-4111-8111-111111111111"
PROPS = "org.freedesktop.DBus.Properties"
GUEST2 = "22222222-2222-4222-8222-222222222222"


def mgr(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return busctl(daemon.address, "call", NAME, ROOT, MANAGER, *args)


def opts(**kw: Any) -> dict[str, Variant]:
    sigs = {"name": "s", "autostart": "b", "start": "b", "control_usage_domains": "b"}
    return {k: Variant(sigs.get(k, "au"), val) for k, val in kw.items()}


async def reserve_and_two_guests(c: Client) -> None:
    await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
    await c.ok(
        ROOT,
        MANAGER,
        "CreateMatrix",
        "sa{sv}",
        [GUEST1, opts(name="guest1", adapters=[5, 6], domains=[4])],
    )
    await c.ok(
        ROOT,
        MANAGER,
        "CreateMatrix",
        "sa{sv}",
        [GUEST2, opts(name="guest2", adapters=[5, 6], domains=[0x47])],
    )


# -- start-up and sd_notify ------------------------------------------------------------------------
def test_ready_only_when_serving_then_watchdog(start: DaemonFactory) -> None:
    d = start("--simulate", watchdog_usec=200_000)
    pid, msg = d.wait_for("READY=1") or (0, "")
    assert pid == d.proc.pid  # NotifyAccess=main would accept it
    assert "STATUS=serving 0 matrices (upstream layout)" in msg.split("\n")
    # READY means the name is owned and the objects are there
    assert (
        busctl_json(d.address, "get-property", NAME, ROOT, MANAGER, "Layout")["data"] == "upstream"
    )
    t0 = time.monotonic()
    time.sleep(0.55)
    d.wait_for("never", 0.01)
    pings = [m for p, m in d.msgs if m == "WATCHDOG=1" and p == d.proc.pid]
    assert len(pings) >= 3, (time.monotonic() - t0, d.msgs)


def test_status_follows_matrices(daemon: Daemon) -> None:
    async def go() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", {}])
        c.close()

    arun(go())
    assert daemon.wait_for("STATUS=serving 1 matrix (upstream layout)", 5)


def test_name_taken_is_one_clear_line(daemon: Daemon) -> None:
    second = start_daemon(daemon.address, ("--simulate",), wait=False)
    rc = second.proc.wait(timeout=15)
    err = second.stderr()
    assert rc == 1
    assert "org.apmatrix.Apmatrix1 is already owned" in err
    assert "Traceback" not in err
    assert second.wait_for("READY=1", 0.05) is None
    second.close()


def test_unreachable_bus_and_bad_scenario_are_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY")}
    for args in (
        ["--simulate", "--bus-address", "unix:path=/nonexistent/bus"],
        ["--simulate", "no-such-scenario", "--bus-address", "unix:path=/nonexistent/bus"],
        ["--simulate", "--session"],  # a shell with no session bus
    ):
        r = subprocess.run(
            [*__import__("busrig").apmatrixd_argv(), *args],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        if "--session" in args:
            assert "dbus-run-session" in r.stderr, r.stderr


# -- the README walkthrough, with plain busctl -----------------------------------------------------
def test_readme_walkthrough_with_busctl(daemon: Daemon) -> None:
    r = mgr(daemon, "Reserve", "auau", "2", "5", "6", "2", "4", "0x47")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    r = mgr(
        daemon,
        "CreateMatrix",
        "sa{sv}",
        GUEST1,
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
    )
    assert r.stdout.strip() == f'o "{path_of(GUEST1)}"', r.stderr
    r = mgr(
        daemon,
        "CreateMatrix",
        "sa{sv}",
        GUEST2,
        "3",
        "name",
        "s",
        "guest2",
        "adapters",
        "au",
        "2",
        "5",
        "6",
        "domains",
        "au",
        "1",
        "0x47",
    )
    assert r.stdout.strip() == f'o "{path_of(GUEST2)}"', r.stderr
    r = mgr(
        daemon,
        "CreateMatrix",
        "sa{sv}",
        "",
        "3",
        "name",
        "s",
        "guest3",
        "adapters",
        "au",
        "1",
        "6",
        "domains",
        "au",
        "1",
        "0x47",
    )
    assert r.returncode == 1
    assert "06.0047 owned by guest2 (22222222-2222-4222-8222-222222222222)" in r.stderr

    async def go() -> None:
        c = await Client.connect(daemon.address)
        name, text = await c.error(
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            ["", opts(name="guest3", adapters=[6], domains=[0x47])],
        )
        assert name == ERR + "Conflict"
        assert "06.0047" in text and GUEST2 in text
        g1 = await c.props(path_of(GUEST1), MATRIX)
        assert g1["State"] == "active" and g1["Name"] == "guest1"
        assert g1["Apqns"] == [[5, 4], [6, 4]] and g1["GuestApqns"] == [[5, 4], [6, 4]]
        assert g1["ControlDomains"] == [4]
        assert g1["SysfsPath"].endswith(f"devices/vfio_ap/matrix/{GUEST1}")
        a6 = await c.props(f"{ROOT}/adapters/06", ADAPTER)
        assert a6["Owners"] == [[4, GUEST1], [0x47, GUEST2]]
        (clashes,) = await c.ok(ROOT, MANAGER, "Check", "auaus", [[6, 7], [4, 0x47, 0xAB], ""])
        assert [list(x) for x in clashes] == [[6, 4, GUEST1], [6, 0x47, GUEST2], [7, 0xAB, "host"]]
        c.close()

    arun(go())
    # Check as busctl prints it
    out = busctl_json(
        daemon.address, "call", NAME, ROOT, MANAGER, "Check", "auaus", "1", "6", "1", "0x47", GUEST2
    )
    assert out["data"] == [[]]


def test_start_stop_and_defined_matrices(daemon: Daemon) -> None:
    async def go() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5], [4]])
        (p,) = await c.ok(
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            [GUEST1, opts(adapters=[5], domains=[4], start=False, control_usage_domains=False)],
        )
        m = await c.props(p, MATRIX)
        assert (m["State"], m["GuestApqns"], m["ControlDomains"], m["Adopted"]) == (
            "defined",
            [],
            [],
            False,
        )
        await c.ok(p, MATRIX, "Start")
        assert (await c.props(p, MATRIX))["State"] == "active"
        # a defined-only matrix still holds its APQNs, and a live one too
        name, _ = await c.error(
            ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", opts(adapters=[5], domains=[4])]
        )
        assert name == ERR + "Conflict"
        await c.ok(p, MATRIX, "AssignControlDomain", "u", [0x47])
        await c.ok(p, MATRIX, "Stop")
        m = await c.props(p, MATRIX)
        assert (m["State"], m["ControlDomains"]) == ("defined", [0x47])
        await c.ok(p, MATRIX, "Update", "auauau", [[5], [4], []])
        await c.ok(p, MATRIX, "Remove")
        (objs,) = await c.ok(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        assert p not in objs
        c.close()

    arun(go())


# -- errors ----------------------------------------------------------------------------------------
def test_every_error_name_is_reachable_and_changes_nothing(daemon: Daemon) -> None:
    async def go() -> None:
        c = await Client.connect(daemon.address)
        # HostOwned before anything is reserved
        name, text = await c.error(
            ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", opts(adapters=[5], domains=[4])]
        )
        assert name == ERR + "HostOwned" and "05.0004" in text
        await reserve_and_two_guests(c)
        before = await c.snapshot()
        p1 = path_of(GUEST1)
        cases: list[tuple[str, str, str, str, list[Any], str]] = [
            (
                "InvalidArgument",
                ROOT,
                "CreateMatrix",
                "sa{sv}",
                ["", {"colour": Variant("s", "red")}],
                "colour",
            ),
            (
                "InvalidArgument",
                ROOT,
                "CreateMatrix",
                "sa{sv}",
                ["", {"adapters": Variant("as", ["5"])}],
                "adapters",
            ),
            (
                "InvalidArgument",
                ROOT,
                "CreateMatrix",
                "sa{sv}",
                ["", {"name": Variant("u", 1)}],
                "name",
            ),
            ("InvalidArgument", ROOT, "CreateMatrix", "sa{sv}", ["not-a-uuid", {}], "not-a-uuid"),
            ("InvalidArgument", ROOT, "CreateMatrix", "sa{sv}", ["", opts(adapters=[300])], "300"),
            ("InvalidArgument", ROOT, "Reserve", "auau", [[4294967295], []], "4294967295"),
            ("AlreadyExists", ROOT, "CreateMatrix", "sa{sv}", [GUEST1, {}], GUEST1),
            ("AlreadyExists", ROOT, "CreateMatrix", "sa{sv}", ["", opts(name="guest1")], "guest1"),
            (
                "Conflict",
                ROOT,
                "CreateMatrix",
                "sa{sv}",
                ["", opts(adapters=[6], domains=[0x47])],
                "06.0047",
            ),
            ("Conflict", p1, "AssignDomain", "u", [0x47], "guest2"),
            (
                "HostOwned",
                ROOT,
                "CreateMatrix",
                "sa{sv}",
                ["", opts(adapters=[7], domains=[0xAB])],
                "07.00ab",
            ),
            ("Busy", ROOT, "Release", "auau", [[], [4]], "guest1"),
            ("NotFound", ROOT, "Check", "auaus", [[5], [4], str(uuidlib.uuid4())], "no matrix"),
        ]
        for err, path, member, sig, body, needle in cases:
            iface = MANAGER if path == ROOT else MATRIX
            name, text = await c.error(path, iface, member, sig, body)
            assert (name, needle in text) == (ERR + err, True), (member, body, name, text)
        assert await c.snapshot() == before
        # wrong D-Bus signature never reaches us: the library answers
        name, _ = await c.error(ROOT, MANAGER, "Reserve", "ai", [[5]])
        assert name == "org.freedesktop.DBus.Error.UnknownMethod"
        # each refusal of ours was counted by its name (the first HostOwned too), no other
        stats = (await c.props(ROOT, MANAGER))["Statistics"]
        want = collections.Counter(ERR + err for err, *_ in cases)
        want[ERR + "HostOwned"] += 1
        assert stats["refused"] == dict(want)
        c.close()

    arun(go())


def test_kernel_refusal_is_error_kernel_and_changes_nothing(
    system_bus: str, polkit: PolkitMock, tmp_path: Path
) -> None:
    from apmatrixd.sim.model import Host

    host = Host.from_name("default")
    dump_tree(host, tmp_path)
    create = tmp_path / host.mdev_type_dir / "create"
    create.unlink()
    create.mkdir()  # writing it now fails with EISDIR, as a refusing kernel would
    d = start_daemon(system_bus, ("--sysfs-root", str(tmp_path)))
    try:

        async def go() -> None:
            c = await Client.connect(d.address)
            before = await c.snapshot()
            name, text = await c.error(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [GUEST1, {}])
            assert name == ERR + "Kernel"
            assert "create" in text and "Errno" in text
            assert await c.snapshot() == before
            c.close()

        arun(go())
    finally:
        assert d.terminate() == 0
        assert "Traceback" not in d.stderr()
        d.close()


def test_unexpected_exception_is_a_named_error_without_traceback() -> None:
    from apmatrixd.bus.base import to_dbus_error

    err = to_dbus_error(ZeroDivisionError("secret /path"), "X.Y")
    assert err.type == "org.apmatrix.Apmatrix1.Error.Failed"
    assert "secret" not in err.text and "ZeroDivisionError" in err.text


# -- authorisation ---------------------------------------------------------------------------------
def nobody(
    daemon: Daemon,
    path: str,
    iface: str | None,
    member: str,
    sig: str = "",
    body: list[Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    return call_as(NOBODY, daemon.address, path, iface, member, sig, body or [], **kw)


def test_nobody_reads_but_changes_nothing(daemon: Daemon, polkit: PolkitMock) -> None:
    earlier = len(polkit.checks())  # the mock (and its log) is shared by a worker's tests
    arun(_setup_two_guests(daemon))
    before = arun(_snapshot(daemon))
    p1 = path_of(GUEST1)
    changes: list[tuple[str, str | None, str, str, list[Any]]] = [
        (ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", {"adapters": v("au", [5])}]),
        (ROOT, MANAGER, "Reserve", "auau", [[7], [8]]),
        (ROOT, MANAGER, "Release", "auau", [[5], []]),
        (p1, MATRIX, "AssignAdapter", "u", [7]),
        (p1, MATRIX, "Update", "auauau", [[], [], []]),
        (p1, MATRIX, "Stop", "", []),
        (p1, MATRIX, "Remove", "", []),
        (ROOT, "org.freedesktop.DBus.Properties", "Set", "ssv", [MANAGER, "Version", v("s", "x")]),
        (p1, None, "Remove", "", []),  # no interface header: the bus policy matches nothing
    ]
    reads: list[tuple[str, str | None, str, str, list[Any]]] = [
        (ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER]),
        (p1, "org.freedesktop.DBus.Properties", "Get", "ss", [MATRIX, "State"]),
        (ROOT, "org.freedesktop.DBus.Introspectable", "Introspect", "", []),
        (ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", []),
        (ROOT, MANAGER, "Check", "auaus", [[6], [0x47], ""]),
    ]
    outs = run_client(NOBODY, [spec(daemon.address, *call) for call in changes + reads])
    for call, out in zip(changes, outs[: len(changes)], strict=True):
        assert out["error"] == ACCESS_DENIED, (call, out)
    for call, out in zip(reads, outs[len(changes) :], strict=True):
        assert out["error"] is None, (call, out)  # reading is open to all
    assert outs[-1]["body"] == [[[6, 0x47, GUEST2]]]
    r = busctl(daemon.address, "get-property", NAME, p1, MATRIX, "State", uid=NOBODY)
    assert r.stdout.strip() == 's "active"', r.stderr
    r = busctl(daemon.address, "call", NAME, p1, MATRIX, "Remove", uid=NOBODY)
    assert (r.returncode, r.stderr.strip()) == (1, "Call failed: Access denied")
    assert arun(_snapshot(daemon)) == before
    # the daemon asked polkit (mutating calls only), root never
    checks = polkit.checks()[earlier:]
    assert len(checks) == 8 and all("org.apmatrix.apmatrix1." in ln for ln in checks), checks


def test_polkit_allowing_the_action_lets_nobody_through(daemon: Daemon, polkit: PolkitMock) -> None:
    arun(_setup_two_guests(daemon))
    polkit.allow("org.apmatrix.apmatrix1.manage")
    out = nobody(daemon, path_of(GUEST1), MATRIX, "Stop")
    assert out["error"] is None, out
    out = nobody(daemon, ROOT, MANAGER, "Reserve", "auau", [[7], []])
    assert out["error"] == ACCESS_DENIED  # that needs .reserve
    polkit.allow("org.apmatrix.apmatrix1.manage", "org.apmatrix.apmatrix1.reserve")
    out = nobody(daemon, ROOT, MANAGER, "Reserve", "auau", [[7], []], interactive=True)
    assert out["error"] is None, out
    assert polkit.checks()[-1].endswith('"org.apmatrix.apmatrix1.reserve" {} 1 ""')  # interactive
    state = arun(_props(daemon, path_of(GUEST1), MATRIX))["State"]
    assert state == "defined"
    # Root reading or writing files for a caller: an action of its own each way.
    out = nobody(daemon, ROOT, MANAGER, "ExportMdevctl", "s", [""])
    assert out["error"] == ACCESS_DENIED, out
    assert polkit.checks()[-1].endswith('"org.apmatrix.apmatrix1.export-mdevctl" {} 0 ""')
    out = nobody(daemon, ROOT, MANAGER, "ImportMdevctl", "s", [""])
    assert out["error"] == ACCESS_DENIED, out
    assert polkit.checks()[-1].endswith('"org.apmatrix.apmatrix1.import-mdevctl" {} 0 ""')


# -- signals ---------------------------------------------------------------------------------------
def test_signals_one_per_object_per_change(daemon: Daemon) -> None:
    async def go() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        listener = await Client.connect(daemon.address)
        await listener.listen()
        p1 = path_of(GUEST1)
        await c.ok(
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            [GUEST1, opts(name="guest1", adapters=[5], domains=[4])],
        )
        await listener.settle()
        added = [m for m in listener.signals if m.member == "InterfacesAdded"]
        assert [(m.path, m.body[0]) for m in added] == [(ROOT, p1)]
        assert added[0].body[1][MATRIX]["State"].value == "active"
        got_all = await c.props(p1, MATRIX)  # every property, as GetAll has them
        assert {k: unvariant(v.value) for k, v in added[0].body[1][MATRIX].items()} == got_all
        first = [
            (m.path, set(m.body[1])) for m in listener.signals if m.member == "PropertiesChanged"
        ]
        assert first == [(f"{ROOT}/adapters/05", {"Owners"})], first
        listener.signals.clear()

        await c.ok(p1, MATRIX, "AssignAdapter", "u", [6])
        await listener.settle()
        changed = {m.path: m.body[1] for m in listener.signals if m.member == "PropertiesChanged"}
        paths = [str(m.path) for m in listener.signals]
        assert sorted(paths) == sorted(set(paths)), paths  # one signal per object per batch
        assert set(changed[p1]) == {"Adapters", "Apqns", "GuestApqns"}
        assert changed[p1]["Adapters"].value == [5, 6]
        assert set(changed) == {p1, f"{ROOT}/adapters/06"}
        listener.signals.clear()

        await c.ok(p1, MATRIX, "Remove")
        await listener.settle()
        removed = [(m.path, m.body) for m in listener.signals if m.member == "InterfacesRemoved"]
        assert removed == [(ROOT, [p1, [MATRIX]])]
        listener.signals.clear()

        await c.ok(ROOT, MANAGER, "Release", "auau", [[6], []])
        await listener.settle()
        changed = {m.path: m.body[1] for m in listener.signals if m.member == "PropertiesChanged"}
        assert changed[ROOT]["HostAdapters"].value[:7] == [0, 1, 2, 3, 4, 6, 7]
        assert set(changed[ROOT]) == {"HostAdapters"}
        c.close()
        listener.close()

    arun(go())


# -- introspection equals the shipped XML ----------------------------------------------------------
def members(xml: str, wanted: set[str], arg_names: bool = True) -> dict[str, Any]:
    """Methods (their args in order: name, type, direction), properties (type, access) and
    signals (args) of the ``wanted`` interfaces; ``arg_names=False`` keeps types only."""

    def args(el: ET.Element, default: str | None) -> list[tuple[str | None, ...]]:
        """(name, type, direction); a signal's args have no direction (None)."""
        return [
            (
                a.get("name") if arg_names else None,
                a.get("type"),
                a.get("direction", default) if default else None,
            )
            for a in el.iter("arg")
        ]

    out: dict[str, Any] = {}
    for iface in ET.fromstring(xml).iter("interface"):
        name = iface.get("name", "")
        if name not in wanted:
            continue
        out[name] = {
            "methods": {m.get("name"): args(m, "in") for m in iface.iter("method")},
            "properties": {
                p.get("name"): (p.get("type"), p.get("access")) for p in iface.iter("property")
            },
            "signals": {s.get("name"): args(s, None) for s in iface.iter("signal")},
        }
    return out


def declared_xml(cls: Any, iface: str) -> str:
    """What a class of ours declares for ``iface`` (methods, properties, signals), as
    introspection XML without argument names."""
    from dbus_fast.signature import get_signature_tree

    from apmatrixd.bus.base import methods_of

    def args(parent: ET.Element, signature: str, direction: str | None) -> None:
        for t in get_signature_tree(signature).types:
            a = ET.SubElement(parent, "arg", type=t.signature)
            if direction:
                a.set("direction", direction)

    node = ET.Element("node")
    el = ET.SubElement(node, "interface", name=iface)
    for m in methods_of(cls).values():
        method = ET.SubElement(el, "method", name=m.member)
        args(method, m.in_signature, "in")
        args(method, m.out_signature, "out")
    for name, (signature, _read) in cls.declared.items():
        ET.SubElement(el, "property", name=name, type=signature, access="read")
    for member, signature in cls.signals.items():
        args(ET.SubElement(el, "signal", name=member), signature, None)
    return ET.tostring(node, encoding="unicode")


def test_every_property_survives_busctl_json(daemon: Daemon) -> None:
    """busctl --json is how scripts read a D-Bus service: every property of every interface,
    GetAll and GetManagedObjects must come out of it, equal to what dbus-fast reads (systemd
    252's busctl cannot write a dict with integer keys: systemd#32904)."""
    arun(_setup_two_guests(daemon))
    objects = {ROOT: MANAGER, path_of(GUEST1): MATRIX, f"{ROOT}/adapters/06": ADAPTER}

    async def read() -> dict[str, dict[str, Any]]:
        c = await Client.connect(daemon.address)
        out = {path: await c.props(path, iface) for path, iface in objects.items()}
        c.close()
        return out

    def data(v: Any) -> Any:  # busctl writes a variant (in Statistics' a{sv}) as type + data
        if isinstance(v, dict):
            if v.keys() == {"type", "data"}:
                return data(v["data"])
            # A resync after the setup's uevents may stamp the last rescan between two reads.
            return {k: data(x) for k, x in v.items() if k != "last_rescan"}
        return [data(x) for x in v] if isinstance(v, list) else v

    want = data(arun(read()))
    assert want[ROOT]["Statistics"]["refused"] == {}
    for path, iface in objects.items():
        for prop, value in want[path].items():
            got = busctl_json(daemon.address, "get-property", NAME, path, iface, prop)
            assert data(got) == value, (path, prop, got, value)
        got_all = busctl_json(daemon.address, "call", NAME, path, PROPS, "GetAll", "s", iface)[
            "data"
        ][0]
        assert data(got_all) == want[path]
    managed = busctl_json(
        daemon.address, "call", NAME, ROOT, "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
    )["data"][0]  # fmt: skip
    assert managed[f"{ROOT}/adapters/06"][ADAPTER]["Owners"]["data"] == [
        [4, GUEST1],
        [0x47, GUEST2],
    ]


def test_live_introspection_equals_shipped_xml(daemon: Daemon) -> None:
    """What busctl and gdbus show is the shipped description, argument names included; and
    what the code implements (the classes' declarations, our dispatch table) has exactly its
    methods, signatures, properties and signals."""
    from apmatrixd.bus.base import methods_of
    from apmatrixd.bus.objects import Adapter, Manager, Matrix

    arun(_setup_two_guests(daemon))
    ours = {MANAGER, MATRIX, ADAPTER}
    live: dict[str, Any] = {}
    for path in (ROOT, path_of(GUEST1), f"{ROOT}/adapters/05"):
        r = busctl(
            daemon.address, "call", NAME, path, "org.freedesktop.DBus.Introspectable",
            "Introspect", "--json=short",
        )  # fmt: skip
        text = json.loads(r.stdout)["data"][0]
        live |= members(text, ours)
        if path == ROOT:
            assert {n.get("name") for n in ET.fromstring(text).findall("node")} == {
                "matrices",
                "adapters",
            }
            assert "org.freedesktop.DBus.ObjectManager" in text
    canonical = members(XML.read_text(), ours)
    assert set(canonical) == ours
    assert live == canonical
    for cls, iface in ((Manager, MANAGER), (Matrix, MATRIX), (Adapter, ADAPTER)):
        declared = declared_xml(cls, iface)
        assert members(declared, {iface}, arg_names=False) == members(
            XML.read_text(), {iface}, arg_names=False
        )
        table = {m.member: (m.in_signature, m.out_signature) for m in methods_of(cls).values()}
        assert table == {
            name: (
                "".join(t for _, t, d in margs if d == "in"),
                "".join(t for _, t, d in margs if d == "out"),
            )
            for name, margs in canonical[iface]["methods"].items()
        }
    for iface in canonical.values():  # every argument has a name
        for margs in (*iface["methods"].values(), *iface["signals"].values()):
            assert all(n for n, _, _ in margs), margs
    # gdbus, the other client everyone has, shows the names too
    if shutil.which("gdbus"):
        r = subprocess.run(
            ["gdbus", "introspect", "--address", daemon.address, "--dest", NAME,
             "--object-path", ROOT],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "out o matrix" in r.stdout and "Drift(o matrix," in r.stdout, r.stdout
    from dbus_fast.introspection import Node

    Node.parse(XML.read_text())  # valid for the library too


# -- the 2017 layout -------------------------------------------------------------------------------
def test_rfc2017_scenario(start: DaemonFactory) -> None:
    d = start("--simulate", "rfc2017")
    assert d.wait_for("STATUS=serving 0 matrices (rfc2017 layout)", 1)

    async def go() -> None:
        c = await Client.connect(d.address)
        assert (await c.props(ROOT, MANAGER))["Layout"] == "rfc2017"
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        await c.ok(
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            [GUEST1, opts(name="guest1", adapters=[5, 6], domains=[4])],
        )
        m = await c.props(path_of(GUEST1), MATRIX)
        assert m["State"] == "active" and "ap_matrix" in m["SysfsPath"]
        name, text = await c.error(
            ROOT, MANAGER, "CreateMatrix", "sa{sv}", ["", opts(adapters=[6], domains=[4])]
        )
        assert name == ERR + "Conflict" and "06.0004" in text
        c.close()

    arun(go())


# -- shipped unit ----------------------------------------------------------------------------------
@pytest.fixture
def unit(tmp_path: Path) -> Path:
    from busrig import UNIT, apmatrixd_argv

    need_tool("/usr/bin/systemd-analyze", "systemd")
    exe = apmatrixd_argv()[0]  # verify checks that ExecStart= exists; point it at ours
    out = tmp_path / "apmatrixd.service"
    out.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/apmatrixd", f"ExecStart={exe}"))
    return out


def test_unit_verifies_clean(unit: Path) -> None:
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_unit_exposure_at_most_2(unit: Path) -> None:
    r = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout
    score = float(r.stdout.split("Overall exposure level for apmatrixd.service:")[1].split()[0])
    assert score <= 2.0


# -- helpers ---------------------------------------------------------------------------------------
async def _setup_two_guests(daemon: Daemon) -> None:
    c = await Client.connect(daemon.address)
    await reserve_and_two_guests(c)
    c.close()


async def _snapshot(daemon: Daemon) -> dict[str, Any]:
    c = await Client.connect(daemon.address)
    try:
        return await c.snapshot()
    finally:
        c.close()


async def _props(daemon: Daemon, path: str, iface: str) -> dict[str, Any]:
    c = await Client.connect(daemon.address)
    try:
        return await c.props(path, iface)
    finally:
        c.close()


def test_options_methods_and_configure(daemon: Daemon) -> None:
    """The a{sv} forms: UpdateWithOptions changes only what it names, decided on the sets as
    they are; unknown options are refused by name; Configure renames and sets autostart."""
    arun(_setup_two_guests(daemon))
    p1 = path_of(GUEST1)

    async def go() -> None:
        c = await Client.connect(daemon.address)
        await c.ok(ROOT, MANAGER, "ReserveWithOptions", "auaua{sv}", [[7], [], {}])
        name, text = await c.error(
            ROOT, MANAGER, "ReleaseWithOptions", "auaua{sv}", [[7], [], {"x": Variant("b", True)}]
        )
        assert name == ERR + "InvalidArgument" and "unknown option 'x'" in text
        (rows,) = await c.ok(ROOT, MANAGER, "CheckWithOptions", "auausa{sv}", [[6], [4], "", {}])
        assert [list(r) for r in rows] == [[6, 4, GUEST1]]
        add = {"mode": Variant("s", "add"), "sets": Variant("as", ["adapters"])}
        await c.ok(p1, MATRIX, "UpdateWithOptions", "auauaua{sv}", [[7], [9], [9], add])
        m = await c.props(p1, MATRIX)
        assert (m["Adapters"], m["Domains"], m["ControlUsageDomains"]) == ([5, 6, 7], [4], True)
        name, text = await c.error(
            p1, MATRIX, "UpdateWithOptions", "auauaua{sv}",
            [[], [], [], {"mode": Variant("s", "merge")}],
        )  # fmt: skip
        assert name == ERR + "InvalidArgument" and "unknown mode 'merge'" in text
        opts = {"name": Variant("s", "web"), "autostart": Variant("b", True)}
        await c.ok(p1, MATRIX, "Configure", "a{sv}", [opts])
        m = await c.props(p1, MATRIX)
        assert (m["Name"], m["Autostart"]) == ("web", True)
        name, _ = await c.error(
            p1, MATRIX, "Configure", "a{sv}", [{"name": Variant("s", "guest2")}]
        )
        assert name == ERR + "AlreadyExists"
        c.close()

    arun(go())
