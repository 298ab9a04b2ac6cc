"""The state directory: format, crash-safe writes, damaged files set aside; the service on it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from apmatrixd.core import Apqn, Conflict
from apmatrixd.core.errors import NotManaged
from apmatrixd.journal import Intent, Journal
from apmatrixd.kernel import HostSnapshot, Kernel, KernelError, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.service.executor import Command
from apmatrixd.service.tx import Transaction
from apmatrixd.sim.model import Host
from apmatrixd.store import (
    Reservations,
    Store,
    StoredMatrix,
    StoreError,
    encode,
    replace_at,
)

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
G3 = "33333333-3333-4333-8333-333333333333"
SM = StoredMatrix(G1, "guest1", frozenset({5, 6}), frozenset({4}), frozenset({4, 1}), True, True)


class Boom(BaseException):
    """A crash in the middle of a store step (stands for kill -9)."""


def test_round_trip_and_the_documented_format(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_matrix(SM)
    s.write_reservations(Reservations().reserve([5, 6], [4, 0x47]).release([6], []))
    data = json.loads((tmp_path / "matrices" / f"{G1}.json").read_text())
    assert data == {
        "format": "apmatrixd-matrix",
        "version": 1,
        "uuid": G1,
        "name": "guest1",
        "adapters": [5, 6],
        "domains": [4],
        "control_domains": [1, 4],
        "autostart": True,
        "control_usage_domains": True,
    }
    host = json.loads((tmp_path / "host.json").read_text())
    assert host["reserved_adapters"] == [5] and host["released_adapters"] == [6]
    assert host["reserved_domains"] == [4, 71]
    assert (tmp_path / "matrices" / f"{G1}.json").stat().st_mode & 0o777 == 0o600
    got = Store(tmp_path).load()
    assert got.matrices == {G1: SM} and got.set_aside == []
    assert got.reservations == Reservations(
        frozenset({5}), frozenset({4, 71}), frozenset({6}), frozenset()
    )
    s.remove_matrix(G1)
    s.remove_matrix(G1)  # idempotent
    assert Store(tmp_path).load().matrices == {}


@pytest.mark.parametrize(
    "data",
    [
        SM.to_json(),
        StoredMatrix(
            G2, 'g\u00e9 "2"\t\\', frozenset(range(256)), frozenset(), frozenset()
        ).to_json(),
        Reservations().reserve([5, 6], [4, 0x47]).release([6], []).to_json(),
        {},
        {"b": None, "a": False, "c": 1.5, "d": [True, None, "x\u2028", -3, 0.25], "e": []},
        {"nested": {"a": [1]}, "n": 1},  # not what the store writes: json writes it
        {"nested": [[1], {"a": 2}]},
        {1: "x", 2: [3]},  # keys json turns into strings
    ],
)
def test_files_are_the_bytes_json_writes(data: dict[str, object]) -> None:
    """Stored files are written by our own line writer: byte for byte what json's indenting
    encoder writes (the documented format), escapes and empty lists included."""
    assert encode(data) == (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


@pytest.mark.parametrize("step", ["open", "write", "write-more", "fsync", "rename", "fsync-dir"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_file(tmp_path: Path, step: str) -> None:
    target = tmp_path / "f.json"
    target.write_text("old\n")

    def fault(at: str) -> None:
        if at == step:
            raise Boom(at)

    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Boom):
            replace_at(dirfd, target.name, b"new\n", fault)
    finally:
        os.close(dirfd)
    want = "new\n" if step == "fsync-dir" else "old\n"
    assert target.read_text() == want
    assert sorted(os.listdir(tmp_path)) == ["f.json"]  # the temp file went with the crash


def test_a_temp_file_left_by_a_real_kill_is_cleaned_on_load(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_matrix(SM)
    leftover = tmp_path / "matrices" / f".{G2}.json.tmp-4242"
    leftover.write_text('{"format": "apmatrixd-ma')  # a half-written temp file
    got = s.load()
    assert list(got.matrices) == [G1] and got.set_aside == []
    assert not leftover.exists()


def test_a_state_directory_removed_under_the_store_is_made_again(tmp_path: Path) -> None:
    """The directories are written through kept descriptors; one removed meanwhile (rm -rf
    by an admin) must not swallow the next write into a directory no path leads to."""
    import shutil

    root = tmp_path / "state"
    s = Store(root)
    s.load()
    s.write_matrix(SM)
    shutil.rmtree(root / "matrices")
    s.write_matrix(SM)
    assert json.loads((root / "matrices" / f"{G1}.json").read_text())["uuid"] == G1
    shutil.rmtree(root)
    s.write_reservations(Reservations(frozenset({5})))
    s.write_matrix(SM)
    assert Store(root).load().matrices == {G1: SM}
    assert Store(root).load().reservations.reserved_adapters == {5}
    s.remove_matrix(G1)
    assert os.listdir(root / "matrices") == []


def test_a_state_directory_moved_aside_and_replaced_is_written_anew(tmp_path: Path) -> None:
    """A directory moved aside and a fresh one made in its place (a backup restored): the
    next write goes where the path leads, not into the moved one the descriptor still
    names; a symlinked ``matrices`` is followed, as load() follows it."""
    root = tmp_path / "state"
    s = Store(root)
    s.load()
    s.write_matrix(SM)
    (root / "matrices").rename(root / "matrices.old")
    (root / "matrices").mkdir()
    s.write_matrix(SM)
    assert Store(root).load().matrices == {G1: SM}
    root.rename(tmp_path / "state.bak")
    s.write_boot("b1")
    s.write_reservations(Reservations(frozenset({5})))
    assert Store(root).load().reservations.reserved_adapters == {5}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(root / "matrices")
    (root / "matrices").symlink_to(elsewhere)
    s.write_matrix(SM)
    assert os.listdir(elsewhere) == [f"{G1}.json"]


def damage(path: Path, how: str) -> str:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return "not valid JSON"
    if how == "empty":
        path.write_bytes(b"")
        return "empty"
    if how == "invalid":
        path.write_bytes(b"\x00\xff garbage")
        return "not UTF-8"
    if how == "future":
        data = json.loads(good)
        data["version"] = 7
        path.write_text(json.dumps(data))
        return "version 7 is from a newer apmatrixd"
    if how == "fields":
        data = json.loads(good)
        key = "adapters" if "adapters" in data else "reserved_adapters"
        data[key] = ["5"]
        path.write_text(json.dumps(data))
        return f"{key!r} must be a list of ids"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "invalid", "future", "fields"])
def test_a_damaged_file_is_set_aside_and_logged_the_rest_loads(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(tmp_path)
    s.write_matrix(SM)
    s.write_matrix(StoredMatrix(G2, "guest2", frozenset({5}), frozenset({0x47})))
    s.write_reservations(Reservations().reserve([5], [4]))
    bad = tmp_path / "matrices" / f"{G2}.json"
    why = damage(bad, how)
    damage(tmp_path / "host.json", how)
    with caplog.at_level(logging.ERROR, logger="apmatrixd.store"):
        got = Store(tmp_path).load()
    assert list(got.matrices) == [G1]
    assert got.reservations == Reservations()
    assert len(got.set_aside) == 2
    assert not bad.exists()
    aside = [n for n in os.listdir(tmp_path / "matrices") if ".broken-" in n]
    assert len(aside) == 1 and aside[0].startswith(f"{G2}.json.broken-")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert str(bad) in lines[1] and why in lines[1] and "set aside as" in lines[1]
    assert "host.json" in lines[0]
    # Set aside once: the next load is clean and keeps what is there.
    caplog.clear()
    again = Store(tmp_path).load()
    assert list(again.matrices) == [G1] and again.set_aside == [] and not caplog.records


def test_a_file_named_for_another_uuid_is_set_aside(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.write_matrix(SM)
    os.rename(tmp_path / "matrices" / f"{G1}.json", tmp_path / "matrices" / f"{G2}.json")
    (tmp_path / "matrices" / "notes.txt").write_text("hello")
    got = Store(tmp_path).load()
    assert got.matrices == {} and len(got.set_aside) == 2


# -- the service on a store ----------------------------------------------------------------------
def service(host: Host, path: Path, **kw: object) -> Service:
    s = Service(Kernel(TreeSysfs(host)), store=Store(path, **kw))  # type: ignore[arg-type]
    s.load()
    return s


@pytest.fixture(params=["default", "rfc2017"])
def scenario(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_definitions_come_back_after_a_reboot(tmp_path: Path, scenario: str) -> None:
    svc = service(Host.from_name(scenario), tmp_path)
    svc.reserve([5, 6], [4, 0x47, 0xAB])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4], name="one", autostart=True)
    svc.create_matrix(G2, adapters=[5], domains=[0x47], name="two", autostart=False)
    svc.create_matrix(G3, adapters=[6], domains=[0xAB], autostart=True, start=False)
    before = {m.uuid: m for m in svc.matrices()}
    # A reboot: the kernel starts fresh, the store is all that is left.
    svc2 = service(Host.from_name(scenario), tmp_path)
    after = {m.uuid: m for m in svc2.matrices()}
    assert after[G1].state == after[G3].state == "active"
    assert after[G2].state == "defined"
    for u in (G1, G2, G3):
        assert not after[u].adopted
        assert (after[u].name, after[u].apqns, after[u].control_domains) == (
            before[u].name,
            before[u].apqns,
            before[u].control_domains,
        )
    assert svc2.kernel.read_mdev(G3).adapters == {6}
    assert set(svc2.host.host_adapters).isdisjoint({5, 6}) or scenario == "rfc2017"
    with pytest.raises(Conflict):  # a defined matrix still holds its APQNs
        svc2.create_matrix(adapters=[5], domains=[0x47])


def test_after_a_reboot_the_host_is_read_once_with_the_reservations_applied(
    tmp_path: Path, scenario: str
) -> None:
    svc = service(Host.from_name(scenario), tmp_path)
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4], autostart=True)
    rebooted = Service(Kernel(TreeSysfs(Host.from_name(scenario))), store=Store(tmp_path))
    reads: list[int] = []
    real = rebooted.kernel.read_host

    def counted() -> HostSnapshot:
        reads.append(1)
        return real()

    rebooted.kernel.read_host = counted  # type: ignore[method-assign]
    rebooted.load()
    # Upstream the masks are applied before the cards are read; the 2017 layout's pool is
    # the queues' drivers, read with the cards, so it reads them again after the moves.
    assert len(reads) == (1 if scenario == "default" else 2)
    # What clients see is the host after the reservations: queues with vfio, the guest's view.
    assert {4, 0x47} <= set(rebooted.adapter(5).guest_domains)
    assert {4, 0x47}.isdisjoint(rebooted.host.host_domains) or scenario == "rfc2017"
    m = rebooted.matrix(G1)
    assert m.state == "active" and set(m.guest_apqns) == {Apqn(5, 4), Apqn(6, 4)}


def test_autostart_creates_its_matrices_in_one_transaction(tmp_path: Path) -> None:
    svc = service(Host.from_name("default"), tmp_path)
    svc.reserve([5, 6], [4, 0x47, 0xAB])
    uuids = [G1, G2, G3]
    for u, d in zip(uuids, (4, 0x47, 0xAB), strict=True):
        svc.create_matrix(u, adapters=[5, 6], domains=[d], autostart=True)
    rebooted = Service(Kernel(TreeSysfs(Host.from_name("default"))), store=Store(tmp_path))
    whats: list[tuple[str, int]] = []
    real = rebooted.transact

    def counted(tx: Transaction) -> Command[None]:
        whats.append((tx.what, len(tx.matrices)))
        return real(tx)

    rebooted.transact = counted  # type: ignore[method-assign]
    rebooted.load()
    assert [n for what, n in whats if what.startswith("autostart")] == [3]
    assert all(rebooted.matrix(u).state == "active" for u in uuids)
    assert sorted(rebooted.kernel.list_mdevs()) == sorted(uuids)
    assert Journal(tmp_path).read() == []


def test_an_autostart_the_kernel_refuses_leaves_only_that_matrix_defined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(Host.from_name("default"), tmp_path)
    svc.reserve([5, 6], [4, 0x47, 0xAB])
    for u, d in zip((G1, G2, G3), (4, 0x47, 0xAB), strict=True):
        svc.create_matrix(u, adapters=[5, 6], domains=[d], autostart=True)
    caplog.set_level(logging.INFO, "apmatrixd.service.ops")
    host = Host.from_name("default")
    # G2's sets are refused, in the batch (G1 is created by then: undone) and alone.
    host.inject_fault(f"devices/vfio_ap/matrix/{G2}/ap_config", errno.EADDRINUSE, 2)
    rebooted = service(host, tmp_path)
    states = {u: rebooted.matrix(u).state for u in (G1, G2, G3)}
    assert states == {G1: "active", G2: "defined", G3: "active"}
    assert sorted(rebooted.kernel.list_mdevs()) == sorted([G1, G3])
    assert "autostart of 3 matrices failed" in caplog.text
    assert f"autostart of matrix {G2}" in caplog.text
    assert Journal(tmp_path).read() == [] and rebooted.registry.violations() == []


def test_the_first_autostart_alone_tells_the_generation(tmp_path: Path) -> None:
    """6.10 has ap_config but no features file: until an mdev exists the writes per id are
    all the daemon may plan; the first matrix alone teaches it, the rest take one write."""
    svc = service(Host.from_name("default@6.10"), tmp_path)
    svc.reserve([5, 6], [4, 0x47, 0xAB])
    for u, d in zip((G1, G2, G3), (4, 0x47, 0xAB), strict=True):
        svc.create_matrix(u, adapters=[5, 6], domains=[d], autostart=True)
    host = Host.from_name("default@6.10")
    written: list[str] = []
    real = host.write

    def seen(path: str, data: bytes) -> int:
        written.append(path.rsplit("/", 1)[-1])
        return real(path, data)

    host.write = seen  # type: ignore[method-assign]
    rebooted = service(host, tmp_path)
    assert all(rebooted.matrix(u).state == "active" for u in (G1, G2, G3))
    assert rebooted.kernel.features.ap_config
    made = [w for w in written if w in ("create", "ap_config") or w.startswith("assign_")]
    assert made.count("create") == 3 and made.count("ap_config") == 2  # G2, G3
    assert made[1:4] == ["assign_adapter", "assign_adapter", "assign_domain"]  # G1, per id


def test_a_restart_without_reboot_finds_its_matrices_live_not_adopted(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4], name="one")
    svc.create_matrix(G2, adapters=[5], domains=[0x47], start=False)
    svc2 = service(host, tmp_path)
    m1, m2 = svc2.matrix(G1), svc2.matrix(G2)
    assert (m1.state, m1.adopted, m1.name) == ("active", False, "one")
    assert (m2.state, m2.adopted) == ("defined", False)


class Crash(BaseException):
    """The daemon dies here (nothing catches it, as nothing runs after a SIGKILL)."""


def crashing(armed: list[str]) -> Callable[[str], None]:
    """A store fault hook: the daemon dies at the store step named in ``armed``."""

    def fault(step: str) -> None:
        if armed and step == armed[0]:
            raise Crash(step)

    return fault


def test_an_interrupted_update_is_taken_back_by_its_journal_entry(tmp_path: Path) -> None:
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    armed[:] = ["journal-commit"]  # the kernel got the update, the daemon died before its commit
    with pytest.raises(Crash):
        svc.update(G1, [5, 6], [4], [4])
    assert svc.kernel.read_mdev(G1).adapters == {5, 6}
    svc2 = service(host, tmp_path)
    assert svc2.matrix(G1).adapters == (5,)
    assert svc2.kernel.read_mdev(G1).adapters == {5}
    assert svc2.startup_drift == []  # our own change, undone: no drift
    assert Journal(tmp_path).read() == []


def test_an_admin_edit_while_stopped_is_drift_and_never_written_back(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4], autostart=True)
    svc.kernel.assign(G1, "domain", 0x47)  # the daemon is stopped: echo 0x47 > assign_domain
    svc2 = service(host, tmp_path)
    assert svc2.kernel.read_mdev(G1).domains == {4, 0x47}  # not written back
    assert svc2.matrix(G1).domains == (4, 0x47)
    ((uuid, what),) = svc2.startup_drift
    assert uuid == G1 and "domains: kernel 04,47 vs stored 04" in what
    stored = json.loads((tmp_path / "matrices" / f"{G1}.json").read_text())
    assert stored["domains"] == [4, 0x47]  # adopted: the next restart keeps it too
    svc3 = service(host, tmp_path)
    assert svc3.startup_drift == [] and svc3.kernel.read_mdev(G1).domains == {4, 0x47}


def test_a_create_cut_by_a_crash_can_be_retried(tmp_path: Path) -> None:
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5, 6], [4])
    armed[:] = ["journal-commit"]  # mdev created and assigned, then the daemon died
    with pytest.raises(Crash):
        svc.create_matrix(G1, adapters=[5, 6], domains=[4])
    assert svc.kernel.mdev_exists(G1)
    svc2 = service(host, tmp_path)
    assert not svc2.kernel.mdev_exists(G1)  # rolled back, not adopted as a foreign mdev
    assert svc2.matrices() == []
    assert svc2.create_matrix(G1, adapters=[5, 6], domains=[4]).state == "active"


def test_an_unknown_live_mdev_is_external_until_taken_over(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5], [4])
    svc.kernel.create_mdev(G2)
    svc.kernel.assign(G2, "adapter", 5)
    svc2 = service(host, tmp_path)
    assert (svc2.matrix(G2).adopted, svc2.matrix(G2).manager) == (True, "external")
    assert not (tmp_path / "matrices" / f"{G2}.json").exists()
    for change in (
        lambda: svc2.assign(G2, "domain", 4),
        lambda: svc2.configure(G2, name="mine"),
        lambda: svc2.stop(G2),
        lambda: svc2.remove(G2),
    ):
        with pytest.raises(NotManaged, match="made outside apmatrixd.*take it over"):
            change()
    assert svc2.kernel.mdev_exists(G2) and svc2.matrix(G2).adapters == (5,)
    svc2.take_over(G2)
    assert (svc2.matrix(G2).adopted, svc2.matrix(G2).manager) == (False, "apmatrixd")
    assert json.loads((tmp_path / "matrices" / f"{G2}.json").read_text())["adapters"] == [5]
    svc2.assign(G2, "domain", 4)
    assert json.loads((tmp_path / "matrices" / f"{G2}.json").read_text())["domains"] == [4]
    svc3 = service(host, tmp_path)  # a restart keeps it ours
    assert svc3.matrix(G2).manager == "apmatrixd" and svc3.matrix(G2).domains == (4,)


def test_a_store_failure_undoes_the_change(tmp_path: Path, scenario: str) -> None:
    host = Host.from_name(scenario)
    armed: list[str] = []

    def fault(step: str) -> None:
        if armed and step == armed[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    svc = service(host, tmp_path, fault=fault)
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])

    def snapshot() -> object:
        snap = svc.kernel.read_host()
        views = [(m.uuid, m.apqns, m.state, m.autostart) for m in svc.matrices()]
        return (
            snap.pool,
            dict(snap.mdevs),
            views,
            svc.host,
            sorted(os.listdir(tmp_path / "matrices")),
        )

    calls = {
        "create": lambda: svc.create_matrix(G2, adapters=[6], domains=[4]),
        "update": lambda: svc.update(G1, [5, 6], [4], []),
        "autostart": lambda: svc.set_autostart(G1, True),
        "reserve": lambda: svc.reserve([], [0x47]),
        "release": lambda: svc.release([6], []),
        "remove": lambda: svc.remove(G1),
    }
    for name, call in calls.items():
        commit = ("journal-commit", "journal-commit-sync")  # what acknowledges a change
        for step in ("unlink", "fsync-dir") if name == "remove" else commit:
            before = snapshot()
            armed[:] = [step]
            with pytest.raises(StoreError, match="No space left on device"):
                call()
            armed.clear()
            assert snapshot() == before, (name, step)
            assert svc.registry.violations() == []
    # What is on disk is what was acknowledged: a restart on the same host changes nothing.
    before = snapshot()
    svc = service(host, tmp_path)
    assert snapshot() == before


def test_autostart_waits_for_its_adapter_then_hot_plug_starts_it(tmp_path: Path) -> None:
    svc = service(Host.from_name("default"), tmp_path)
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4], autostart=True)
    host = Host.from_name("default")
    host.unplug_adapter(6)  # booted without adapter 06
    svc2 = service(host, tmp_path)
    assert svc2.matrix(G1).state == "defined"
    assert svc2.start_waiting() == []
    host.plug_adapter(6, "CEX5A")
    svc2.state.take_inventory(dict(svc2.kernel.read_host().adapters))  # as hot plug does first
    assert svc2.start_waiting() == [G1]
    assert svc2.matrix(G1).state == "active"
    assert set(svc2.matrix(G1).guest_apqns) == {Apqn(5, 4), Apqn(6, 4)}


def test_without_a_store_nothing_is_written(tmp_path: Path) -> None:
    svc = Service(Kernel(TreeSysfs(Host.from_name("default"))))
    svc.load()
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4], autostart=True)
    assert svc.matrix(G1).state == "active"
    assert list(tmp_path.iterdir()) == []


def test_a_remove_whose_lock_cannot_be_taken_changes_nothing(tmp_path: Path) -> None:
    """Remove writes the store first; any kernel failure after it (here the s390 lock is a
    planted symlink: ELOOP) puts the file back, and nothing is left for start-up."""
    host = Host.from_name("default")
    lock = tmp_path / "s390apconfig.lock"
    store = Store(tmp_path / "state")
    svc = Service(Kernel(TreeSysfs(host), lock_path=str(lock)), store=store)
    svc.load()
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4], name="g", autostart=True)
    before = (tmp_path / "state" / "matrices" / f"{G1}.json").read_bytes()
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KernelError) as refused:
        svc.remove(G1)
    assert refused.value.errno == errno.ELOOP and "lock" in str(refused.value)
    assert (tmp_path / "state" / "matrices" / f"{G1}.json").read_bytes() == before
    assert svc.matrix(G1).state == "active" and svc.kernel.mdev_exists(G1)
    assert store.journal.read() == []
    assert not (tmp_path / "elsewhere").exists()  # the link was not followed


def test_a_rollback_that_fails_keeps_the_intent_and_adopts_nothing(tmp_path: Path) -> None:
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    armed[:] = ["journal-commit"]  # the kernel got {5, 6}, the daemon died before its commit
    with pytest.raises(Crash):
        svc.update(G1, [5, 6], [4], [4])
    host.inject_fault(f"devices/vfio_ap/matrix/{G1}/ap_config", errno.EBUSY)
    svc2 = service(host, tmp_path)  # its rollback is refused by the kernel
    assert svc2.startup_drift == []  # our own half-done change is not an admin's drift
    stored = json.loads((tmp_path / "matrices" / f"{G1}.json").read_text())
    assert stored["adapters"] == [5]  # not adopted
    assert svc2.matrix(G1).adapters == (5, 6)  # the kernel's truth, counted in decisions
    assert Journal(tmp_path).read() != []
    svc3 = service(host, tmp_path)  # the next start rolls it back
    assert svc3.kernel.read_mdev(G1).adapters == {5} and svc3.matrix(G1).adapters == (5,)
    assert Journal(tmp_path).read() == []


G3 = "33333333-3333-4333-8333-333333333333"
TAKES_ADAPTER_05 = f"""
reserve: {{adapters: ["05", "06"], domains: ["04"]}}
matrices: [{{name: g1, uuid: {G1}, adapters: ["06"], domains: ["04"]}}]
"""


class CrashingSysfs(TreeSysfs):
    """The daemon dies at the first write to a path ending in ``at``."""

    def __init__(self, host: Host, at: str) -> None:
        super().__init__(host)
        self.at = at

    def write(self, path: str, data: str) -> None:
        if self.at and path.endswith(self.at):
            raise Crash(path)
        super().write(path, data)


def holding_05_elsewhere(tmp_path: Path, sysfs: TreeSysfs) -> Service:
    """Domain 04 reserved, G3 live on 05 x 04 while the host still has adapter 05: giving 05
    back once it is reserved is refused by 6.19 (in_use counts G3's domains), though taking
    it was not."""
    svc = Service(Kernel(sysfs), store=Store(tmp_path))
    svc.load()
    svc.reserve([], [4])
    svc.create_matrix(G3, adapters=[5], domains=[4])
    return svc


def test_a_cut_change_whose_pool_cannot_go_back_is_completed(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = holding_05_elsewhere(tmp_path, TreeSysfs(host))
    renames: list[bool] = []

    def second_rename(step: str) -> None:
        renames.append(step == "rename")
        if sum(renames) == 2 and renames[-1]:
            raise Crash(step)

    svc.store.fault = second_rename  # type: ignore[union-attr]
    with pytest.raises(Crash):  # g1's file is written, the reservations are not
        svc.apply(TAKES_ADAPTER_05)
    svc2 = service(host, tmp_path)
    assert svc2.matrix(G1).state == "active" and svc2.matrix(G3).state == "active"
    assert json.loads((tmp_path / "host.json").read_text())["reserved_adapters"] == [5, 6]
    assert {5, 6}.isdisjoint(svc2.kernel.read_pool().adapters)
    assert Journal(tmp_path).read() == [] and svc2.startup_drift == []
    assert svc2.registry.violations() == []
    rebooted = service(Host.from_name("default"), tmp_path)
    assert {5, 6}.isdisjoint(rebooted.kernel.read_pool().adapters)
    assert rebooted.matrix(G1).state == "defined" and rebooted.registry.violations() == []


def test_a_cut_change_whose_pool_cannot_go_back_keeps_the_pool(tmp_path: Path) -> None:
    host = Host.from_name("default")
    sysfs = CrashingSysfs(host, "")
    svc = holding_05_elsewhere(tmp_path, sysfs)
    sysfs.at = "/create"  # the masks are written, g1's mdev is not created
    with pytest.raises(Crash):
        svc.apply(TAKES_ADAPTER_05)
    svc2 = service(host, tmp_path)
    assert not svc2.kernel.mdev_exists(G1) and G1 not in svc2.registry.matrices
    assert {5, 6}.isdisjoint(svc2.kernel.read_pool().adapters)  # the kernel refuses them back
    # The stored reservations follow the pool that stays, so a reboot gives the same host.
    assert json.loads((tmp_path / "host.json").read_text())["reserved_adapters"] == [5, 6]
    assert Journal(tmp_path).read() == [] and svc2.startup_drift == []
    assert svc2.registry.violations() == [] and svc2.matrix(G3).state == "active"


def test_autostart_of_a_definition_the_kernel_clashes_with_can_be_turned(tmp_path: Path) -> None:
    """A flag breaks no rule: the registry and the file agree afterwards (the registry used to
    decide again after the file was written, and could refuse then)."""
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5, 6], [4, 0xAB])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4])
    svc.create_matrix(G2, adapters=[6], domains=[0xAB], start=False)
    svc.registry.set_truth(G1, {5, 6}, {4, 0xAB})  # G1's mdev holds 06.00ab (a drift)
    with pytest.raises(Conflict):
        svc.start(G2)
    svc.set_autostart(G2, True)
    assert json.loads((tmp_path / "matrices" / f"{G2}.json").read_text())["autostart"] is True
    assert svc.matrix(G2).autostart and svc.registry.violations() == []


def test_a_restart_in_the_same_boot_leaves_an_admins_mask_edit(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5, 6], [])
    host.write("bus/ap/apmask", b"+6")  # the daemon is stopped: the admin gives 06 back
    svc2 = service(host, tmp_path)  # same host: same boot
    assert 6 in svc2.host.host_adapters and 5 not in svc2.host.host_adapters
    assert svc2.kernel.read_pool().adapters == svc2.registry.pool.adapters
    rebooted = service(Host.from_name("default"), tmp_path)  # a reboot: the record applies
    assert 5 not in rebooted.host.host_adapters and 6 not in rebooted.host.host_adapters


def test_a_short_write_is_continued_not_stored_truncated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:3]))  # 3 at a time
    Store(tmp_path).write_matrix(StoredMatrix(G1, "one", frozenset({5}), frozenset({4})))
    monkeypatch.undo()
    contents = Store(tmp_path).load()
    assert contents.set_aside == [] and contents.matrices[G1].name == "one"


def test_the_kill_hook_is_refused_when_malformed_and_ignored_on_a_real_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apmatrixd import daemon

    monkeypatch.setenv("APMATRIXD_TEST_KILL_AT", "x")
    args = daemon.parse_args(["--simulate", "--state-dir", str(tmp_path)])
    with pytest.raises(daemon.StartupError, match="APMATRIXD_TEST_KILL_AT"):
        daemon.make_store(args)
    monkeypatch.setenv("APMATRIXD_TEST_KILL_AT", "1")
    real = daemon.parse_args(["--sysfs-root", str(tmp_path), "--state-dir", str(tmp_path)])
    store = daemon.make_store(real)
    assert store is not None
    store.write_matrix(StoredMatrix(G1))  # step 1 would have killed us: the hook is off


def test_a_torn_or_foreign_journal_reads_as_no_intent(tmp_path: Path) -> None:
    from apmatrixd.journal import Intent

    j = Journal(tmp_path)
    j.begin(Intent("Update x", matrices={G1: {"kernel_before": None, "kernel_after": None}}))
    assert [i.what for i in j.read()] == ["Update x"]
    raw = (tmp_path / "journal").read_bytes()
    (tmp_path / "journal").write_bytes(raw[: len(raw) - 30])  # torn before it was durable
    assert Journal(tmp_path).read() == []
    (tmp_path / "journal").write_bytes(b"not a journal at all\n")
    assert Journal(tmp_path).read() == []
    j.end()
    assert Journal(tmp_path).read() == []


def test_a_failed_read_back_after_a_commit_does_not_fail_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Host.from_name("default")
    svc = service(host, tmp_path)
    svc.reserve([5, 6], [4])
    asked: list[int] = []
    svc.on_resync = lambda: asked.append(1)

    def gone(uuid: str) -> object:
        raise KernelError(errno.ENOENT, f"devices/vfio_ap/matrix/{uuid}/guest_matrix", "reading")

    monkeypatch.setattr(svc.kernel, "read_guest", gone)
    view = svc.create_matrix(G1, adapters=[5, 6], domains=[4])  # committed all the same
    assert view.state == "degraded" and asked == [1]  # the guest view is re-read by a resync
    assert json.loads((tmp_path / "matrices" / f"{G1}.json").read_text())["adapters"] == [5, 6]


def test_a_remove_cut_before_its_mdev_went_is_undone_at_start(tmp_path: Path) -> None:
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4], name="g", autostart=True)
    armed[:] = ["fsync-dir"]  # the file went, the daemon died before the mdev's remove
    with pytest.raises(Crash):
        svc.remove(G1)
    assert not (tmp_path / "matrices" / f"{G1}.json").exists() and svc.kernel.mdev_exists(G1)
    svc2 = service(host, tmp_path)
    m = svc2.matrix(G1)  # back as it was: ours, named, autostart, live; nothing was written
    assert (m.name, m.autostart, m.adopted, m.state) == ("g", True, False, "active")
    assert (tmp_path / "matrices" / f"{G1}.json").exists() and svc2.startup_drift == []


def test_a_store_let_go_keeps_no_descriptor(tmp_path: Path) -> None:
    """The kept directory descriptors go with the Store: a process that makes many (the
    test suites, tools) does not run out of descriptors."""
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(50):
        s = Store(tmp_path)
        s.write_reservations(Reservations())
        s.journal.close()
        del s
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_change_is_answered_on_its_commit_and_its_files_follow(tmp_path: Path) -> None:
    """A lone change is acknowledged once its intent and commit record are durable; files
    that cannot be written then are written before the next change, or by start-up, and a
    next change that cannot write them is refused with nothing done."""
    host = Host.from_name("default")
    full = {"left": 0}

    def disk(step: str) -> None:
        if full["left"] and step in ("open", "rename"):
            full["left"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    svc = service(host, tmp_path, fault=disk)
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    path = tmp_path / "matrices" / f"{G1}.json"
    full["left"] = 1
    svc.assign(G1, "adapter", 6)  # acknowledged: the journal has it
    assert svc.matrix(G1).adapters == (5, 6) and svc.kernel.read_mdev(G1).adapters == {5, 6}
    assert json.loads(path.read_text())["adapters"] == [5]  # its file is not written yet
    [intent] = Journal(tmp_path).read()
    assert intent.committed
    # A restart now (a crash) completes it from the journal: the file, nothing undone.
    again = service(Host.from_name("default"), shutil.copytree(tmp_path, tmp_path / "copy"))
    assert again.matrix(G1).adapters == (5, 6)
    assert json.loads((tmp_path / "copy" / "matrices" / f"{G1}.json").read_text())["adapters"] == [
        5,
        6,
    ]
    assert Journal(tmp_path / "copy").read() == []
    # The next change cannot write it either: refused before it starts, nothing changes.
    full["left"] = 2
    with pytest.raises(StoreError, match="files of earlier changes.*No space left"):
        svc.assign(G1, "domain", 0x47)
    assert svc.matrix(G1).domains == (4,) and svc.kernel.read_mdev(G1).domains == {4}
    assert Journal(tmp_path).read() == [intent]
    # Once it can, the next change writes them first, then its own.
    svc.assign(G1, "domain", 0x47)
    assert json.loads(path.read_text())["adapters"] == [5, 6]
    assert json.loads(path.read_text())["domains"] == [4, 0x47]
    assert Journal(tmp_path).read() == []


def test_a_change_after_a_commit_syncs_its_intent_before_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A committed change's clear is not synced, so the disk may still show it committed;
    a later change that writes files without a commit of its own (a removal) makes its
    intent durable first, or a machine crash could have start-up complete the old change
    over the removal's files."""
    svc = service(Host.from_name("default"), tmp_path)
    svc.reserve([5], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    synced: list[str] = []
    real = os.fdatasync
    journal = svc.store.journal if svc.store is not None else None
    assert journal is not None and journal.stale_commit

    def fdatasync(fd: int) -> None:
        synced.append("journal" if fd == journal._fd else "other")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    svc.remove(G1)
    assert synced[:1] == ["journal"] and not journal.stale_commit
    assert not (tmp_path / "matrices" / f"{G1}.json").exists()


def test_a_file_cut_after_its_rename_is_written_again_from_the_journal(tmp_path: Path) -> None:
    """The files of a committed change are renamed before their fsync (one log commit): a
    machine crash between the two can leave one empty. Start-up writes it again from the
    committed intent instead of setting it aside as damaged."""
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5, 6], [4])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    armed[:] = ["fsync"]  # the file renamed, the machine died before its data was on disk
    with pytest.raises(Crash):
        svc.assign(G1, "adapter", 6)
    path = tmp_path / "matrices" / f"{G1}.json"
    path.write_bytes(b"")
    svc2 = service(host, tmp_path)
    assert svc2.matrix(G1).adapters == (5, 6) and not svc2.startup_drift
    assert json.loads(path.read_text())["adapters"] == [5, 6]
    assert sorted(os.listdir(tmp_path / "matrices")) == [f"{G1}.json"]  # nothing set aside
    assert Journal(tmp_path).read() == []


def test_a_commit_record_commits_only_the_records_it_follows(tmp_path: Path) -> None:
    """A commit record carries the CRC of the records before it: a later intent of the
    same length in the same place (a torn journal) is not read as committed."""
    journal = Journal(tmp_path)
    journal.stage(Intent("Assign 0x05", {G1: {"stored": True, "stored_after": None}}))
    journal.commit()
    [read] = journal.read()
    assert read.committed and read.what == "Assign 0x05"
    raw = (tmp_path / "journal").read_bytes()
    first = raw.index(b"APMJ1", 1)  # where the commit record starts
    Journal(tmp_path).stage(Intent("Assign 0x06", {G1: {"stored": True, "stored_after": None}}))
    newer = (tmp_path / "journal").read_bytes()
    assert newer.index(b"APMJ1", 1) == first  # as long: only its end mark is lost below
    (tmp_path / "journal").write_bytes(newer[:first] + raw[first:])
    [torn] = Journal(tmp_path).read()
    assert torn.what == "Assign 0x06" and not torn.committed


def test_an_acknowledged_change_is_not_completed_over_files_changed_since(
    tmp_path: Path,
) -> None:
    """A committed intent whose files hold neither its before nor its after (an admin's
    offline edit, a backup restored) is left as the files are."""
    host = Host.from_name("default")
    armed: list[str] = []
    svc = service(host, tmp_path, fault=crashing(armed))
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    armed[:] = ["open"]  # committed, then the daemon died before its file was written
    with pytest.raises(Crash):
        svc.assign(G1, "adapter", 6)
    path = tmp_path / "matrices" / f"{G1}.json"
    edited = json.loads(path.read_text())
    edited["name"] = "restored"
    path.write_text(json.dumps(edited))
    svc2 = service(host, tmp_path)
    assert svc2.matrix(G1).name == "restored"  # not written over from the journal
    assert json.loads(path.read_text())["name"] == "restored"
    # What the kernel holds beyond the files is then drift, adopted as for any edit.
    assert [u for u, _what in svc2.startup_drift] == [G1]
