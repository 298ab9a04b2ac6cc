"""The daemon process and its state directory: kill -9, restart, a fresh simulated host each time.

Every ``--simulate`` start is a fresh boot: the masks are back at their boot values and no
mdev exists, so whatever comes back comes from the state directory.

The kill-anywhere test here uses real process kills: the daemon is started with
``APMATRIXD_TEST_KILL_AT=N`` and SIGKILLs itself at the Nth store step (open, half a write,
the rest, fsync, rename, fsync of the directory, unlink) while a client streams changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from busrig import (
    MANAGER,
    MATRIX,
    NAME,
    ROOT,
    SYSTEM_PYTHON,
    Client,
    Daemon,
    DaemonFactory,
    arun,
    path_of,
    spec,
    start_daemon,
    world_readable_client,
)
from dbus_fast import Message, MessageFlag, Variant

from apmatrixd.journal import Journal
from apmatrixd.store import KILL_ENV, Contents, Reservations, Store, StoredMatrix

UUIDS = [
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "33333333-3333-4333-8333-333333333333",
    "44444444-4444-4444-8444-444444444444",
]
GONE = {
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Disconnected",
}
REAL_KILLS = 60 if os.environ.get("APMATRIXD_LONG") else 6


def opts(**kw: Any) -> dict[str, Variant]:
    sigs = {"name": "s", "autostart": "b", "start": "b"}
    return {k: Variant(sigs.get(k, "au"), val) for k, val in kw.items()}


def kill9(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(5) == -signal.SIGKILL


def test_three_autostart_matrices_come_back_after_kill_9(
    start: DaemonFactory, tmp_path: Path
) -> None:
    state = str(tmp_path / "state")
    d = start("--simulate", "--state-dir", state)

    async def setup() -> None:
        c = await Client.connect(d.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47, 0xAB, 0xFF]])
        for uuid, dom in zip(UUIDS[:3], (4, 0x47, 0xAB), strict=True):
            await c.ok(
                ROOT,
                MANAGER,
                "CreateMatrix",
                "sa{sv}",
                [uuid, opts(adapters=[5, 6], domains=[dom], autostart=True, name=f"g{dom}")],
            )
        await c.ok(
            ROOT,
            MANAGER,
            "CreateMatrix",
            "sa{sv}",
            [UUIDS[3], opts(adapters=[5, 6], domains=[0xFF], name="manual")],
        )
        c.close()

    arun(setup())
    kill9(d)
    d2 = start("--simulate", "--state-dir", state)  # a fresh host: a reboot

    async def check() -> None:
        c = await Client.connect(d2.address)
        host = await c.props(ROOT, MANAGER)
        assert 5 not in host["HostAdapters"] and 6 not in host["HostAdapters"]
        assert not {4, 0x47, 0xAB, 0xFF} & set(host["HostDomains"])
        for uuid, dom in zip(UUIDS[:3], (4, 0x47, 0xAB), strict=True):
            p = await c.props(path_of(uuid), MATRIX)
            assert p["State"] == "active" and p["Autostart"] and not p["Adopted"]
            assert p["Name"] == f"g{dom}" and p["GuestApqns"] == [[5, dom], [6, dom]]
        p = await c.props(path_of(UUIDS[3]), MATRIX)
        assert p["State"] == "defined" and p["Apqns"] == [[5, 0xFF], [6, 0xFF]]
        c.close()

    arun(check())
    assert d2.wait_for("STATUS=serving 4 matrices (upstream layout)", 1)


def test_a_damaged_state_file_is_set_aside_and_logged(start: DaemonFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = start("--simulate", "--state-dir", str(state))

    async def setup() -> None:
        c = await Client.connect(d.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5], [4, 0x47]])
        for uuid, dom in ((UUIDS[0], 4), (UUIDS[1], 0x47)):
            await c.ok(
                ROOT, MANAGER, "CreateMatrix", "sa{sv}", [uuid, opts(adapters=[5], domains=[dom])]
            )
        c.close()

    arun(setup())
    # The last change's file is written just after its answer (its commit is in the
    # journal): wait for it, so the file truncated below is the one start-up reads.
    deadline = time.monotonic() + 10
    while Journal(state).read() != [] and time.monotonic() < deadline:
        time.sleep(0.01)
    kill9(d)
    bad = state / "matrices" / f"{UUIDS[1]}.json"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    d2 = start("--simulate", "--state-dir", str(state))
    log = d2.stderr()
    lines = [ln for ln in log.splitlines() if "damaged" in ln]
    assert len(lines) == 1, log
    assert str(bad) in lines[0] and "not valid JSON" in lines[0] and "set aside as" in lines[0]
    assert d2.wait_for("STATUS=serving 1 matrix (upstream layout)", 1)
    assert [n for n in os.listdir(state / "matrices") if ".broken-" in n]


def _definition(*attrs: dict[str, str]) -> str:
    return json.dumps({"mdev_type": "vfio_ap-passthrough", "start": "auto", "attrs": list(attrs)})


def test_mdevctl_import_and_export_over_dbus(start: DaemonFactory, tmp_path: Path) -> None:
    """By path only the daemon's own mdevctl directory; any other is passed open, as a
    descriptor the caller opened, and worked on through it."""
    own = tmp_path / "etc"
    (own / "matrix").mkdir(parents=True)
    d = start("--simulate", "--state-dir", str(tmp_path / "state"), "--mdevctl-dir", str(own))
    for uuid, attrs in (
        (UUIDS[0], [{"assign_adapter": "5"}, {"assign_domain": "0x47"}]),
        (UUIDS[1], [{"assign_adapter": "5"}, {"assign_domain": "71"}]),  # the same APQN
    ):
        (own / "matrix" / uuid).write_text(_definition(*attrs))
    other = tmp_path / "other"
    (other / "matrix").mkdir(parents=True)
    (other / "matrix" / UUIDS[2]).write_text(
        _definition({"assign_adapter": "6"}, {"assign_domain": "4"})
    )
    out = tmp_path / "out"
    out.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("")

    async def go() -> None:
        c = await Client.connect(d.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        name, text = await c.error(ROOT, MANAGER, "ImportMdevctl", "s", [""])
        assert name == "org.apmatrix.Apmatrix1.Error.Conflict", text
        assert UUIDS[1] in text and "05.0047" in text
        (own / "matrix" / UUIDS[1]).unlink()
        (paths,) = await c.ok(ROOT, MANAGER, "ImportMdevctl", "s", [str(own)])
        assert paths == [path_of(UUIDS[0])]
        p = await c.props(paths[0], MATRIX)
        assert (p["State"], p["Autostart"], p["Apqns"]) == ("defined", True, [[5, 0x47]])
        # any other path is refused before anything is read: pass it open instead
        for where in (str(other), "relative/dir", "/"):
            for member in ("ImportMdevctl", "ExportMdevctl"):
                name, text = await c.error(ROOT, MANAGER, member, "s", [where])
                assert name == "org.apmatrix.Apmatrix1.Error.InvalidArgument", text
                assert "descriptor" in text, text
        fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (paths,) = await c.ok(ROOT, MANAGER, "ImportMdevctlFd", "h", [0], [fd])
        finally:
            os.close(fd)
        assert paths == [path_of(UUIDS[2])]
        fd = os.open(out, os.O_PATH | os.O_DIRECTORY)  # an O_PATH descriptor is enough
        try:
            await c.ok(ROOT, MANAGER, "ExportMdevctlFd", "h", [0], [fd])
        finally:
            os.close(fd)
        fd = os.open(a_file, os.O_RDONLY)
        try:
            for member in ("ImportMdevctlFd", "ExportMdevctlFd"):
                name, text = await c.error(ROOT, MANAGER, member, "h", [0], [fd])
                assert name == "org.apmatrix.Apmatrix1.Error.InvalidArgument", (member, text)
                assert "not a directory" in text, text
        finally:
            os.close(fd)
        await c.ok(ROOT, MANAGER, "ExportMdevctl", "s", [""])
        # descriptors sent along with calls that take none are closed too: dropped reads,
        # dbus-fast's own methods, unknown members, our methods with another signature
        fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for path, iface, member, sig, body in (
                (ROOT, MANAGER, "Check", "auaus", [[5], [4], ""]),
                (ROOT, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER, "Version"]),
                (ROOT, MANAGER, "NoSuchMethod", "", []),
                (ROOT, MANAGER, "ImportMdevctl", "h", [0]),
            ):
                await c.call(path, iface, member, sig, body, [fd])
            await c.bus.send(
                Message(
                    destination=NAME, path=ROOT, interface=MANAGER, member="Check",
                    signature="auaus", body=[[5], [4], ""], unix_fds=[fd],
                    flags=MessageFlag.NO_REPLY_EXPECTED,
                )
            )  # fmt: skip
            await c.ok(ROOT, "org.freedesktop.DBus.Peer", "Ping")
        finally:
            os.close(fd)
        c.close()

    arun(go())
    for where in (out, own):
        exported = json.loads((where / "matrix" / UUIDS[0]).read_text())
        assert exported == {
            "mdev_type": "vfio_ap-passthrough",
            "start": "auto",
            "attrs": [
                {"assign_adapter": "0x05"},
                {"assign_domain": "0x0047"},
            ],  # control domains exactly as imported: the file had none
        }
    assert sorted(os.listdir(out / "matrix")) == sorted(UUIDS[:1] + UUIDS[2:3])
    # the daemon kept no descriptor of ours
    fd_dir = f"/proc/{d.proc.pid}/fd"
    fds = {os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)}
    kept = {str(out), str(other), str(a_file)} & fds
    assert not kept, kept


# -- kill -9 anywhere, for real -------------------------------------------------------------------
async def stream(c: Client, rng: random.Random, acked: dict[str, Any]) -> None:
    """Changes until the daemon dies; ``acked`` records each one the daemon returned."""
    for _ in range(5000):
        u = rng.choice(UUIDS)
        kind = rng.choice(["reserve", "create", "create", "update", "remove", "release"])
        if kind in ("reserve", "release"):
            a, d = sorted(rng.sample([5, 6], 1)), sorted(rng.sample([4, 0x47, 0xAB, 0xFF], 2))
            reply = await c.call(ROOT, MANAGER, kind.title(), "auau", [a, d])
            if reply.error_name is None:
                key = "reserved" if kind == "reserve" else "released"
                other = "released" if kind == "reserve" else "reserved"
                for which, ids in (("a", a), ("d", d)):
                    acked[f"{key}_{which}"] |= set(ids)
                    acked[f"{other}_{which}"] -= set(ids)
        elif kind == "create":
            a, d = sorted(rng.sample([5, 6], 1)), sorted(rng.sample([4, 0x47, 0xAB, 0xFF], 1))
            auto = rng.random() < 0.5
            reply = await c.call(
                ROOT,
                MANAGER,
                "CreateMatrix",
                "sa{sv}",
                [u, opts(adapters=a, domains=d, autostart=auto)],
            )
            if reply.error_name is None:
                acked["matrices"][u] = (a, d, auto)
        elif kind == "update":
            a, d = sorted(rng.sample([5, 6], 2)), sorted(rng.sample([4, 0x47, 0xAB, 0xFF], 1))
            reply = await c.call(path_of(u), MATRIX, "Update", "auauau", [a, d, []])
            if reply.error_name is None:
                acked["matrices"][u] = (a, d, acked["matrices"][u][2])
        else:
            reply = await c.call(path_of(u), MATRIX, "Remove")
            if reply.error_name is None:
                del acked["matrices"][u]
        if reply.error_name in GONE:
            return  # NoReply / Disconnected: the daemon is gone
    raise AssertionError("the daemon never reached its kill point")


def ready_or_killed(d: Any, timeout: float = 15) -> bool:
    """True once the daemon sent READY=1; False if it died before (a kill in start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.wait_for("READY=1", 0.1) is not None:
            return True
        if d.proc.poll() is not None:
            return d.wait_for("READY=1", 0) is not None
    raise AssertionError(f"neither READY=1 nor dead: {d.stderr()}")


def loaded(state: Path) -> Contents:
    """The state directory as start-up loads it: acknowledged changes whose files a kill
    cut (committed intents) with their files as start-up writes them from the journal."""
    left = Journal(state).read()
    contents = Store(state).load()
    for intent in left[:1]:
        if not intent.committed:
            continue
        for u, item in intent.matrices.items():
            if item.get("stored"):
                after = item["stored_after"]
                contents.matrices.pop(u, None)
                if after is not None:
                    contents.matrices[u] = StoredMatrix.from_json(after)
        res = intent.reservations
        if res is not None:
            contents.reservations = Reservations.from_json(res["after"])
    return contents


def test_kill_anywhere_real_process(system_bus: str, polkit: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rng = random.Random("real-kills")
    acked: dict[str, Any] = {"matrices": {}} | {
        f"{k}_{w}": set() for k in ("reserved", "released") for w in "ad"
    }
    points: list[int] = []
    for _ in range(REAL_KILLS):
        n = rng.randint(1, 60)
        points.append(n)
        os.environ[KILL_ENV] = str(n)
        try:
            d = start_daemon(system_bus, ("--simulate", "--state-dir", str(state)), wait=False)
        finally:
            del os.environ[KILL_ENV]
        try:

            async def run() -> None:
                c = await Client.connect(system_bus)
                try:
                    await stream(c, rng, acked)
                finally:
                    c.close()

            # Start-up writes too (the stored reservations, autostart, each with its
            # intent): a kill point may fall there, before READY=1. That is a crash as good
            # as any other; the checks below hold all the same.
            if ready_or_killed(d):
                arun(run())
            assert d.proc.wait(10) == -signal.SIGKILL, d.stderr()
            assert "Traceback" not in d.stderr()
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            d.close()
        # Every acknowledged change is on disk, and the store parses. The one change in flight
        # may or may not be there: take what the store says as the new truth for it.
        contents = loaded(state)
        assert contents.set_aside == []
        got = {
            u: (sorted(m.adapters), sorted(m.domains), m.autostart)
            for u, m in contents.matrices.items()
        }
        diff = {
            u for u in set(got) | set(acked["matrices"]) if got.get(u) != acked["matrices"].get(u)
        }
        r = contents.reservations
        res = {
            "reserved_a": set(r.reserved_adapters),
            "reserved_d": set(r.reserved_domains),
            "released_a": set(r.released_adapters),
            "released_d": set(r.released_domains),
        }
        res_diff = any(acked[k] != v for k, v in res.items())
        assert len(diff) + res_diff <= 1, (diff, got, acked)  # only the change in flight
        acked["matrices"] = got
        acked.update(res)
    # A last, unkilled start on a fresh host: no APQN has two owners, every autostart is up.
    d = start_daemon(system_bus, ("--simulate", "--state-dir", str(state)))
    try:

        async def check() -> None:
            c = await Client.connect(system_bus)
            owners: dict[tuple[int, int], str] = {}
            for u, (_a, _d, auto) in acked["matrices"].items():
                p = await c.props(path_of(u), MATRIX)
                assert p["State"] == ("active" if auto else "defined"), (u, p)
                for apqn in p["Apqns"]:
                    assert tuple(apqn) not in owners
                    owners[tuple(apqn)] = u
            c.close()

        try:
            arun(check())
        except AssertionError:
            print(d.stderr())
            raise
    finally:
        d.terminate()
        d.close()
    assert len(points) == REAL_KILLS


def test_export_writes_where_the_caller_sees_its_directory(
    start: DaemonFactory, tmp_path: Path
) -> None:
    """The descriptor names the caller's directory even where the daemon's namespace has
    another at that path (PrivateTmp=, a container): a client in a mount namespace of its own
    exports into a tmpfs the daemon cannot see by path, and the files land there."""
    d = start("--simulate", "--state-dir", str(tmp_path / "state"))

    async def setup() -> None:
        c = await Client.connect(d.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5], [4]])
        opts = {"adapters": Variant("au", [5]), "domains": Variant("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [UUIDS[0], opts])
        c.close()

    arun(setup())
    seen = tmp_path / "seen"
    seen.mkdir()
    script, site = world_readable_client()
    call = spec(d.address, ROOT, MANAGER, "ExportMdevctlFd", "h", [0], dirs=[str(seen)])
    inner = (
        f'mount -t tmpfs apm-test "{seen}" && "{SYSTEM_PYTHON}" "{script}" "$1" && '
        f'ls "{seen}/matrix"'
    )
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, "sh",
         json.dumps(call)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=site), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    reply, listed = r.stdout.splitlines()[0], r.stdout.splitlines()[1:]
    assert json.loads(reply)["error"] is None, reply
    assert listed == [UUIDS[0]]
    assert list(seen.iterdir()) == []  # nothing where the daemon would have resolved the path
