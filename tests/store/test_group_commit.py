"""Group commit: changes queued behind one another made durable together (service/group.py).

Through the daemon's own path (Executor.submit in an event loop, the worker thread), on the
emulated host and a real state directory. fsyncs are counted by wrapping os.fsync here.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import json
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_kill_anywhere import (
    ADAPTERS,
    DOMAINS,
    UUIDS,
    Killed,
    Killer,
    KillingSysfs,
    State,
    check_kernel,
    stored_view,
)

from apmatrixd.core import ApmatrixError, Conflict
from apmatrixd.journal import HEADER, Intent, Journal
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service, ops
from apmatrixd.service.state import Changes
from apmatrixd.sim.model import Host
from apmatrixd.store import Reservations, Store, StoredMatrix, StoreError

KILLS = 1000 if os.environ.get("APMATRIXD_LONG") else 100


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Every os.fsync, counted as a directory's or a file's."""
    seen = {"dir": 0, "file": 0}
    real = os.fsync

    def counting(fd: int) -> None:
        seen["dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"] += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    yield seen


def service(
    tmp_path: Path, fault: Callable[[str], None] | None = None, host: Host | None = None
) -> Service:
    host = host or Host.from_name("default")
    svc = Service(Kernel(TreeSysfs(host)), store=Store(tmp_path, fault))
    svc.load()
    svc.reserve([5, 6], [4, 0x47, 0xAB, 0xFF])
    return svc


def run_all(svc: Service, calls: list[Callable[[], asyncio.Future[Any]]]) -> list[Any]:
    """Queue every call before the first runs (so they wait behind one another); their
    answers (a result or an error; Killed for those a kill left unanswered)."""

    async def go() -> list[Any]:
        futs = [call() for call in calls]
        pending = set(futs)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            if any(isinstance(f.exception(), Killed) for f in done if not f.cancelled()):
                break
        if not any(
            isinstance(f.exception(), Killed) for f in futs if f.done() and not f.cancelled()
        ):
            await svc.executor.idle()  # the files of a lone change are written after its answer
        return [
            (f.exception() or f.result()) if f.done() else Killed("never answered") for f in futs
        ]

    return asyncio.run(go())


def assign(svc: Service, uuid: str, kind: ops.Kind, id: int) -> Callable[[], Any]:
    return lambda: svc.change("Assign", ops.change_one, uuid, kind, id, add=True)


def test_a_group_does_one_directory_fsync(tmp_path: Path, fsyncs: dict[str, int]) -> None:
    host = Host.from_name("default")
    svc = service(tmp_path, host=host)
    u = UUIDS[:3]
    for i, uuid in enumerate(u):
        svc.create_matrix(uuid, adapters=[5], domains=[[4, 0x47, 0xAB][i]])
    sent: list[Changes] = []

    def on_disk_before_signal(changes: Changes) -> None:
        # Every change a signal tells of is on disk already.
        assert Store(tmp_path).load().matrices == svc.state.on_disk
        sent.append(changes)

    svc.subscribe(on_disk_before_signal)
    fsyncs["dir"] = fsyncs["file"] = 0
    calls = [assign(svc, uuid, "control_domain", c) for c in (1, 2) for uuid in u]
    calls.insert(3, assign(svc, u[0], "domain", 0x47))  # u[1] holds 5.47: refused alone
    got = run_all(svc, calls)
    assert isinstance(got[3], Conflict)
    assert [g for i, g in enumerate(got) if i != 3] == [None] * 6
    assert svc.executor.groups == 1
    assert fsyncs == {"dir": 1, "file": 3}  # one directory fsync; one file per matrix
    assert len(sent) == 1 and sent[0].matrices_changed == set(u)
    stored = Store(tmp_path).load().matrices
    for uuid in u:
        assert stored[uuid].control_domains >= {1, 2}
        assert svc.matrix(uuid).control_domains == tuple(sorted(stored[uuid].control_domains))
    assert stored[u[0]].domains == {4}
    assert [svc.matrix(uuid).state for uuid in u] == ["active"] * 3  # guest views read
    # The journal holds no intent: a restart finds nothing to roll back, and no drift.
    again = Service(Kernel(TreeSysfs(host)), store=Store(tmp_path))
    again.load()
    assert again.startup_drift == [] and stored_view(again) == stored_view(svc)


def count_calls(kernel: Kernel, method: str) -> list[str]:
    """The UUIDs ``kernel.<method>(uuid)`` is called with from now on."""
    calls: list[str] = []
    real = getattr(kernel, method)

    def counting(uuid: str) -> Any:
        calls.append(uuid)
        return real(uuid)

    setattr(kernel, method, counting)
    return calls


def test_a_group_reads_each_guest_view_once(tmp_path: Path) -> None:
    svc = service(tmp_path)
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    svc.create_matrix(UUIDS[1], adapters=[6], domains=[0x47], start=False)
    reads = count_calls(svc.kernel, "read_guest")
    got = run_all(
        svc,
        [assign(svc, UUIDS[0], "domain", d) for d in (0x47, 0xAB)]
        + [lambda: svc.change("Start", ops.start, UUIDS[1])]
        + [lambda: svc.change("CreateMatrix", ops.create_matrix, UUIDS[2], adapters=[6],
                              domains=[0xFF])],
    )  # fmt: skip
    assert got[:3] == [None, None, None] and got[3].uuid == UUIDS[2]
    assert sorted(reads) == sorted(UUIDS[:3])  # one each, the two changes of UUIDS[0] too
    views = [svc.matrix(u) for u in UUIDS[:3]]
    assert [v.state for v in views] == ["active"] * 3
    assert views[0].guest_apqns == ((5, 4), (5, 0x47), (5, 0xAB))


class LockProbe(TreeSysfs):
    """Records, for every write, whether the s390 lock file is held (by anyone but us)."""

    def __init__(self, host: Host, lock: Path) -> None:
        super().__init__(host)
        lock.touch(mode=0o600)
        self._fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        self.writes: list[bool] = []

    def held(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def write(self, path: str, data: str) -> None:
        self.writes.append(self.held())
        super().write(path, data)


def test_a_group_holds_the_lock_throughout_and_reads_each_mdev_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The s390 lock is taken once for the group's writes and kept until they are all done,
    so each member plans from what the one before wrote: a matrix changed by several
    members is read once."""
    lock = tmp_path / "s390apconfig.lock"
    io = LockProbe(Host.from_name("default"), lock)
    svc = Service(Kernel(io, lock_path=str(lock)), store=Store(tmp_path / "state"))
    svc.load()
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    svc.create_matrix(UUIDS[1], adapters=[6], domains=[0x47])
    reads = count_calls(svc.kernel, "read_mdev_sets")
    opened: list[str] = []
    real_open = os.open

    def opening(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path) == str(lock):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", opening)
    io.writes.clear()
    calls = [assign(svc, u, "control_domain", c) for c in (1, 2, 3) for u in UUIDS[:2]]
    assert run_all(svc, calls) == [None] * 6
    monkeypatch.undo()
    assert svc.executor.groups == 1
    assert len(io.writes) >= 6 and all(io.writes)  # every write under the lock ...
    assert len(opened) == 1  # ... taken once for the whole group
    assert sorted(reads) == sorted(UUIDS[:2])  # each mdev read by its first member only
    assert not io.held()  # and let go once the group is done
    mdevs = svc.kernel.read_host().mdevs
    assert mdevs[UUIDS[0]].control_domains == {1, 2, 3, 4}
    assert mdevs[UUIDS[1]].control_domains == {1, 2, 3, 0x47}
    assert svc.store is not None and svc.store.journal.read() == []


def test_a_lone_change_still_syncs_as_before(tmp_path: Path, fsyncs: dict[str, int]) -> None:
    svc = service(tmp_path)
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    fsyncs["dir"] = 0
    assert run_all(svc, [assign(svc, UUIDS[0], "control_domain", 1)]) == [None]
    assert svc.executor.groups == 0 and fsyncs["dir"] == 1


def test_a_failed_flush_undoes_the_group(tmp_path: Path) -> None:
    armed = {"on": False}

    def full_disk(step: str) -> None:
        if armed["on"] and step == "rename":
            armed["on"] = False  # once: putting the files back works
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    svc = service(tmp_path, full_disk)
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    svc.create_matrix(UUIDS[1], adapters=[6], domains=[0x47], start=False)
    before_kernel = svc.kernel.read_host()
    before_store = Store(tmp_path).load()
    before_views = svc.matrices(), svc.adapters(), svc.host
    sent: list[Changes] = []
    svc.subscribe(sent.append)
    armed["on"] = True
    new = UUIDS[2]
    calls = [
        assign(svc, UUIDS[0], "adapter", 6),
        assign(svc, UUIDS[0], "domain", 0xAB),
        lambda: svc.change("Start", ops.start, UUIDS[1]),
        lambda: svc.change("CreateMatrix", ops.create_matrix, new, adapters=[6], domains=[0xFF]),
    ]
    got = run_all(svc, calls)
    assert all(isinstance(g, StoreError) for g in got), got
    assert "No space left" in str(got[0])
    after = svc.kernel.read_host()
    assert after.mdevs == before_kernel.mdevs and after.pool == before_kernel.pool
    assert Store(tmp_path).load() == before_store
    assert (svc.matrices(), svc.adapters(), svc.host) == before_views
    assert sent == []
    assert svc.registry.violations() == []
    # Nothing is left for start-up either: no intent.
    assert svc.store is not None and svc.store.journal.read() == []
    svc.assign(UUIDS[0], "adapter", 6)  # and the service goes on
    assert Store(tmp_path).load().matrices[UUIDS[0]].adapters == {5, 6}


def test_a_member_refused_in_the_kernel_leaves_the_group(tmp_path: Path) -> None:
    host = Host.from_name("default")
    svc = service(tmp_path, host=host)
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    svc.create_matrix(UUIDS[1], adapters=[6], domains=[4])
    last = "ap_config" if svc.kernel.features.ap_config else "assign_control_domain"
    host.inject_fault(f"{svc.kernel.mdev_path(UUIDS[1])}/{last}", errno.EIO)
    got = run_all(
        svc,
        [assign(svc, u, "control_domain", 2) for u in (UUIDS[0], UUIDS[1])]
        + [assign(svc, UUIDS[0], "control_domain", 1)],
    )
    assert got[0] is None and got[2] is None and isinstance(got[1], ApmatrixError)
    stored = Store(tmp_path).load().matrices
    assert stored[UUIDS[0]].control_domains == {1, 2, 4}
    assert stored[UUIDS[1]].control_domains == {4}
    assert svc.kernel.read_host().mdevs[UUIDS[1]].control_domains == {4}


# -- kill -9 anywhere inside a group ------------------------------------------------------------
Member = tuple[Callable[[Service], Any], Callable[[State], State]]


def member(rng: random.Random, state: State, uuid: str) -> Member:
    """One change of ``uuid`` that may join a group, and its effect on the stored state."""
    matrices, _ = state
    have = matrices.get(uuid)
    if have is None:
        a, d = sorted(rng.sample(ADAPTERS, 1)), sorted(rng.sample(DOMAINS, rng.randint(1, 2)))
        start, auto = rng.random() < 0.7, rng.random() < 0.5
        sm = StoredMatrix(uuid, "", frozenset(a), frozenset(d), frozenset(d), auto, True)
        return (
            lambda svc: svc.change(
                "CreateMatrix", ops.create_matrix, uuid,
                adapters=a, domains=d, start=start, autostart=auto,
            ),
            lambda s: ({**s[0], uuid: sm}, s[1]),
        )  # fmt: skip
    kind = rng.choice(["adapter", "domain", "control_domain", "autostart", "start"])
    if kind == "start":
        return lambda svc: svc.change("Start", ops.start, uuid), lambda s: s
    if kind == "autostart":
        auto = not have.autostart
        sm = replace(have, autostart=auto)
        return (
            lambda svc: svc.change("Configure", ops.configure, uuid, autostart=auto),
            lambda s: ({**s[0], uuid: sm}, s[1]),
        )
    i = rng.choice(ADAPTERS if kind == "adapter" else DOMAINS if kind == "domain" else [1, 2])
    add = rng.random() < 0.6
    sets = {"adapter": set(have.adapters), "domain": set(have.domains),
            "control_domain": set(have.control_domains)}  # fmt: skip
    for k in [kind] + (["control_domain"] if kind == "domain" else []):
        (sets[k].add if add else sets[k].discard)(i)
    sm = replace(have, adapters=frozenset(sets["adapter"]), domains=frozenset(sets["domain"]),
                 control_domains=frozenset(sets["control_domain"]))  # fmt: skip
    return (
        lambda svc: svc.change("Assign", ops.change_one, uuid, kind, i, add=add),
        lambda s: ({**s[0], uuid: sm}, s[1]),
    )


def reserve(rng: random.Random) -> Member:
    a, d = sorted(rng.sample(ADAPTERS, 1)), sorted(rng.sample(DOMAINS, 1))
    if rng.random() < 0.5:
        return (lambda svc: svc.change("Reserve", ops.reserve, a, d),
                lambda s: (s[0], s[1].reserve(a, d)))  # fmt: skip
    return (lambda svc: svc.change("Release", ops.release, a, d),
            lambda s: (s[0], s[1].release(a, d)))  # fmt: skip


def reserved_all(state: Path) -> tuple[Host, State]:
    """A host with every adapter and domain of the kill tests reserved, and that state: the
    creates are decided on APQNs, not refused as the host's."""
    host = Host.from_name("default")
    first = Service(Kernel(TreeSysfs(host)), store=Store(state))
    first.load()
    first.reserve(ADAPTERS, DOMAINS)
    return host, ({}, Reservations().reserve(ADAPTERS, DOMAINS))


def restart(
    state: Path,
    rng: random.Random,
    killer: Killer,
    host: Host,
    candidates: list[State | None],
    most: int,
) -> tuple[Host, Service | None, State]:
    """Start-up after a kill (after a reboot, half the time), itself killed within ``most``
    steps (None then). The store holds one of ``candidates`` (what was acknowledged, or that
    plus the change or group that was cut: never a part of it), as the service does; the
    kernel agrees and nothing is drift. Before start-up the store may hold a part of what was
    cut (some renames done): the journal says so, and start-up takes it back."""
    assert Store(state).load().set_aside == []
    if rebooted := rng.random() < 0.5:
        host = Host.from_name("default")
    killer.left = rng.randint(1, most)
    svc = Service(Kernel(KillingSysfs(host, killer)), store=Store(state, killer.step))
    try:
        svc.load()
    except Killed:
        return host, None, candidates[0]  # type: ignore[return-value]
    contents = Store(state).load()
    got: State = (contents.matrices, contents.reservations)
    assert got in candidates, "stored in part, or an acknowledged change lost"
    assert stored_view(svc) == got[0]
    check_kernel(svc, rebooted, got)
    assert [m.uuid for m in svc.matrices() if m.adopted] == []
    assert svc.startup_drift == []
    return host, svc, got


def test_kill_anywhere_in_a_group(tmp_path: Path) -> None:
    """Groups of changes on distinct matrices (and one host pool change), killed at every
    kind of point: after each restart the store holds the acknowledged state, or that plus
    every member of the group that was cut (never a part of it), and nothing is drift."""
    rng = random.Random("kill-anywhere-group")
    killer = Killer()
    host, acked = reserved_all(tmp_path)
    svc: Service | None = None
    cut: State | None = None
    groups = 0
    while killer.kills < KILLS:
        if svc is None:
            host, svc, acked = restart(tmp_path, rng, killer, host, [acked, cut], 40)
            if svc is None:
                continue
            cut = None
        uuids = rng.sample(UUIDS, rng.randint(2, len(UUIDS)))
        members = [member(rng, acked, u) for u in uuids]
        if rng.random() < 0.4:
            members.insert(rng.randrange(len(members) + 1), reserve(rng))
        live = svc
        answers = run_all(live, [functools.partial(m[0], live) for m in members])
        killed = any(isinstance(a, Killed) for a in answers)
        # Every member not refused (ApmatrixError) belongs to the group's outcome.
        outcome = acked
        for (_, effect), answer in zip(members, answers, strict=True):
            if not isinstance(answer, ApmatrixError):
                outcome = effect(outcome)
        if killed:
            live.executor.close()
            svc, cut = None, outcome
            continue
        groups += live.executor.groups > 0
        live.executor.groups = 0
        acked = outcome
        assert stored_view(live) == acked[0]
        assert live.state.reservations == acked[1]
        contents = Store(tmp_path).load()
        assert (contents.matrices, contents.reservations) == acked
    print(f"{killer.kills} kills, {groups} groups acknowledged, killed at {killer.where}")
    assert groups >= KILLS // 10
    # Inside members' kernel writes, in the group's journal and inside its flush.
    assert killer.where.get("sysfs write", 0) >= KILLS // 20
    assert killer.where.get("journal-write", 0) >= KILLS // 20
    assert killer.where.get("rename", 0) + killer.where.get("fsync-dir", 0) >= KILLS // 20


def test_the_journal_reads_a_group_as_one_change(tmp_path: Path) -> None:
    def sets(a: list[int], d: list[int]) -> dict[str, list[int]]:
        return {"adapters": a, "domains": d, "control_domains": d}

    def step(before: Any, after: Any, stored: tuple[Any, Any] = (None, None)) -> Intent:
        item = {"kernel_before": before, "kernel_after": after, "stored": True,
                "stored_before": stored[0], "stored_after": stored[1]}  # fmt: skip
        return Intent("Assign", matrices={UUIDS[0]: item})

    j = Journal(tmp_path)
    for n in (4, 2):  # a longer group first: its records past the shorter one's end are not read
        j.stage(step(None, sets([5], [4]), (None, {"a": 1})))
        for k in range(1, n):
            j.append(step(sets([5, 5 + k], [4]), sets([5, 6 + k], [4]), ({"a": k}, {"a": k + 1})))
        cut = j.append(step(sets([9], [9]), sets([9, 10], [9])))
        j.cut(cut)  # failed and undone: not part of the group
    [got] = j.read()
    assert got.what == "a group of 2 changes"
    item = got.matrices[UUIDS[0]]
    assert (item["kernel_before"], item["kernel_after"]) == (None, sets([5, 7], [4]))
    assert (item["kernel_low"], item["kernel_high"]) == (sets([], []), sets([5, 6, 7], [4]))
    assert (item["stored_before"], item["stored_after"]) == (None, {"a": 2})
    raw = (tmp_path / "journal").read_bytes()
    (tmp_path / "journal").write_bytes(raw[: raw.index(b"APMJ1", 10) + 40])  # the 2nd torn
    [torn] = Journal(tmp_path).read()
    assert torn.what == "Assign"
    j.end()
    assert Journal(tmp_path).read() == []


def test_a_group_journals_a_matrix_s_stored_before_once(tmp_path: Path) -> None:
    """Only the first record of a matrix carries its stored_before (the one read back); after
    a member that first carried another matrix's is cut off, the next one carries it again."""

    def item(a: list[int], stored: tuple[Any, Any]) -> dict[str, Any]:
        before = {"adapters": a[:-1], "domains": [4], "control_domains": []}
        after = {"adapters": a, "domains": [4], "control_domains": []}
        return {"kernel_before": before, "kernel_after": after, "stored": True,
                "stored_before": stored[0], "stored_after": stored[1]}  # fmt: skip

    def carried() -> list[list[str]]:
        """Per record up to the end mark: the matrices whose stored_before it carries."""
        raw, at, out = (tmp_path / "journal").read_bytes(), 0, []
        while n := int(raw[at : at + HEADER].split()[1], 16):
            body = json.loads(raw[at + HEADER : at + HEADER + n])
            out.append(sorted(u for u, i in body["matrices"].items() if "stored_before" in i))
            at += HEADER + n
        return out

    j = Journal(tmp_path)
    j.stage(Intent("Assign", matrices={UUIDS[0]: item([5, 6], ({"a": 0}, {"a": 1}))}))
    j.append(Intent("Assign", matrices={UUIDS[0]: item([5, 6, 7], ({"a": 0}, {"a": 2}))}))
    both = {UUIDS[0]: item([5, 6, 7, 8], ({"a": 0}, {"a": 3})),
            UUIDS[1]: item([9], ({"b": 0}, {"b": 1}))}  # fmt: skip
    mark = j.append(Intent("Apply", matrices=both))
    assert carried() == [[UUIDS[0]], [], [UUIDS[1]]]
    j.cut(mark)
    j.append(Intent("Apply", matrices=both))
    j.append(Intent("Assign", matrices={UUIDS[1]: item([9, 10], ({"b": 0}, {"b": 2}))}))
    assert carried() == [[UUIDS[0]], [], [UUIDS[1]], []]
    [got] = Journal(tmp_path).read()
    assert got.what == "a group of 4 changes"
    first, second = got.matrices[UUIDS[0]], got.matrices[UUIDS[1]]
    assert (first["stored_before"], first["stored_after"]) == ({"a": 0}, {"a": 3})
    assert (second["stored_before"], second["stored_after"]) == ({"b": 0}, {"b": 2})
    assert first["kernel_low"]["adapters"] == [5] and second["kernel_high"]["adapters"] == [9, 10]
    j.end()
    j.stage(Intent("Assign", matrices={UUIDS[1]: item([9], ({"b": 2}, {"b": 3}))}))  # anew
    j.append(Intent("Assign", matrices={UUIDS[0]: item([5], ({"a": 3}, {"a": 4}))}))
    assert carried() == [[UUIDS[1]], [UUIDS[0]]]


def test_reads_are_answered_while_a_group_is_stored(tmp_path: Path) -> None:
    """The flush runs in the worker: Check and the properties answer meanwhile (the loop is
    never blocked), and show each member's change as it was applied."""
    slow = {"on": False}

    def slow_disk(step: str) -> None:
        if slow["on"] and step == "fsync-dir":
            time.sleep(0.3)

    svc = service(tmp_path, slow_disk)
    svc.create_matrix(UUIDS[0], adapters=[5], domains=[4])
    slow["on"] = True
    reads: list[tuple[int, ...]] = []

    async def go() -> list[Any]:
        futs = [assign(svc, UUIDS[0], "control_domain", c)() for c in (1, 2)]
        while not all(f.done() for f in futs):
            reads.append(svc.matrix(UUIDS[0]).control_domains)
            assert len(svc.check_rows([5], [4])) == 1
            await asyncio.sleep(0.01)
        return [f.result() for f in futs]

    assert asyncio.run(go()) == [None, None]
    assert len(reads) >= 10  # answered all through the 0.3 s the group took to store
    assert reads[-1] == (1, 2, 4)
