"""Lone changes in a row (one client's changes, each waiting for its answer): each answered on
its journal commit, their files written together once the queue is idle (journal.py, the
chain of committed intents), through the daemon's own path: Executor.submit in an event loop
and the worker thread, on the emulated host and a real state directory."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_group_commit import assign, fsyncs, member, reserve, reserved_all, restart, service
from test_kill_anywhere import (
    UUIDS,
    Killed,
    Killer,
    State,
    stored_view,
)

from apmatrixd import store as store_mod
from apmatrixd.core import ApmatrixError
from apmatrixd.journal import Journal
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.store import Store, StoreError

__all__ = ["fsyncs"]  # a fixture, used by name

KILLS = 1000 if os.environ.get("APMATRIXD_LONG") else 100
NEVER = 3600.0  # write_after: the queue is never idle long enough, their files wait


def one_by_one(svc: Service, calls: list[Callable[[], asyncio.Future[Any]]]) -> list[Any]:
    """Each call queued once the one before is answered; their answers (a result or an
    error; Killed for the one a kill cut, and none after it). The files are not waited for."""

    async def go() -> list[Any]:
        out: list[Any] = []
        for call in calls:
            try:
                out.append(await call())
            except Killed as cut:
                out.append(cut)
                break
            except Exception as err:
                out.append(err)
        return out

    return asyncio.run(go())


def idle(svc: Service) -> None:
    asyncio.run(svc.executor.idle())


def record(state: Path, uuid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state / "matrices" / f"{uuid}.json").read_text())
    return data


def test_lone_changes_are_answered_on_their_commits_and_stored_together_when_idle(
    tmp_path: Path, fsyncs: dict[str, int]
) -> None:
    state = tmp_path / "state"
    host = Host.from_name("default")
    svc = service(state, host=host)
    u = UUIDS[0]
    svc.create_matrix(u, adapters=[5], domains=[4])
    svc.executor.write_after = NEVER
    fsyncs["dir"] = fsyncs["file"] = 0
    calls = [assign(svc, u, "control_domain", c) for c in (1, 2, 3)]
    assert one_by_one(svc, calls) == [None, None, None]
    assert svc.matrix(u).control_domains == (1, 2, 3, 4)
    assert record(state, u)["control_domains"] == [4]  # not written yet
    assert fsyncs == {"dir": 0, "file": 0}
    [chain] = Journal(state).read()
    assert chain.committed and chain.what == "3 acknowledged changes"
    assert svc.executor.busy  # their files are owed
    # A crash now: start-up writes their files from the journal, and finds no drift.
    crashed = shutil.copytree(state, tmp_path / "crashed")
    again = Service(Kernel(TreeSysfs(host)), store=Store(crashed))
    again.load()
    assert again.matrix(u).control_domains == (1, 2, 3, 4) and again.startup_drift == []
    assert record(crashed, u)["control_domains"] == [1, 2, 3, 4]
    assert Journal(crashed).read() == []
    # Once idle, the running daemon writes them: one file, once, and one directory fsync.
    fsyncs["dir"] = fsyncs["file"] = 0
    idle(svc)
    assert not svc.executor.busy
    assert record(state, u)["control_domains"] == [1, 2, 3, 4]
    assert fsyncs == {"dir": 1, "file": 1}
    assert Journal(state).read() == []


def test_the_files_are_written_once_the_queue_is_dry_for_write_after(tmp_path: Path) -> None:
    state = tmp_path / "state"
    svc = service(state)
    u = UUIDS[0]
    svc.create_matrix(u, adapters=[5], domains=[4])
    svc.executor.write_after = 0.05

    async def go() -> list[list[int]]:
        await assign(svc, u, "control_domain", 1)()
        seen = [record(state, u)["control_domains"]]
        await asyncio.sleep(0.5)
        return [*seen, record(state, u)["control_domains"]]

    assert asyncio.run(go()) == [[4], [1, 4]]
    assert Journal(state).read() == []


def test_a_change_cut_behind_acknowledged_ones_is_undone_and_they_are_completed(
    tmp_path: Path,
) -> None:
    """The chain's files are written from the journal; the change in flight after it (its
    kernel writes half done) is taken back to what the acknowledged ones left."""
    state = tmp_path / "state"
    host = Host.from_name("default")
    commits = {"left": 0}

    def kill_at_commit(step: str) -> None:  # the kernel written, the commit not yet durable
        if step == "journal-commit" and commits["left"]:
            commits["left"] -= 1
            if not commits["left"]:
                raise Killed(step)

    svc = Service(Kernel(TreeSysfs(host)), store=Store(state, kill_at_commit))
    svc.load()
    svc.reserve([5, 6], [4, 0x47, 0xAB, 0xFF])
    u = UUIDS[0]
    svc.create_matrix(u, adapters=[5], domains=[4])
    svc.executor.write_after = NEVER
    commits["left"] = 3
    got = one_by_one(
        svc,
        [assign(svc, u, "control_domain", 1), assign(svc, u, "adapter", 6),
         assign(svc, u, "domain", 0x47)],
    )  # fmt: skip
    assert got[:2] == [None, None] and isinstance(got[2], Killed)
    svc.executor.close()
    assert Kernel(TreeSysfs(host)).read_mdev(u).domains == {4, 0x47}  # cut after it
    left = Journal(state).read()
    assert [i.committed for i in left] == [True, False]
    again = Service(Kernel(TreeSysfs(host)), store=Store(state))
    again.load()
    m = again.matrix(u)
    assert (m.adapters, m.domains, m.control_domains) == ((5, 6), (4,), (1, 4))
    live = Kernel(TreeSysfs(host)).read_mdev(u)
    assert live.domains == {4} and live.control_domains == {1, 4}
    assert again.startup_drift == []
    assert record(state, u)["adapters"] == [5, 6] and record(state, u)["domains"] == [4]
    assert Journal(state).read() == []


def test_files_that_cannot_be_written_when_idle_are_written_before_the_next_change(
    tmp_path: Path,
) -> None:
    """A failed write of the owed files keeps them owed (the journal has them): the next
    change writes them first, and is refused with nothing done while it cannot."""
    state = tmp_path / "state"
    full = {"left": 0}

    def disk(step: str) -> None:
        if full["left"] and step == "open":
            full["left"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    svc = service(state, disk)
    u = UUIDS[0]
    svc.create_matrix(u, adapters=[5], domains=[4])
    svc.executor.write_after = NEVER
    assert one_by_one(svc, [assign(svc, u, "control_domain", c) for c in (1, 2)]) == [None] * 2
    full["left"] = 1
    idle(svc)  # the write fails: logged, still owed
    assert record(state, u)["control_domains"] == [4]
    [chain] = Journal(state).read()
    assert chain.committed
    full["left"] = 1
    [refused] = one_by_one(svc, [assign(svc, u, "adapter", 6)])
    assert isinstance(refused, StoreError) and "files of earlier changes" in str(refused)
    assert "No space left" in str(refused)
    assert svc.matrix(u).adapters == (5,) and svc.kernel.read_mdev(u).adapters == {5}
    assert Journal(state).read() == [chain]
    assert one_by_one(svc, [assign(svc, u, "adapter", 6)]) == [None]
    assert record(state, u)["control_domains"] == [1, 2, 4]  # written first
    idle(svc)
    assert record(state, u)["adapters"] == [5, 6]
    assert Journal(state).read() == []


def test_a_chain_is_written_out_at_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up reads every committed record: past CHAIN_CHANGES, a change writes the owed
    files before its own intent, and the journal starts afresh."""
    monkeypatch.setattr(store_mod, "CHAIN_CHANGES", 3)
    state = tmp_path / "state"
    svc = service(state)
    u = UUIDS[0]
    svc.create_matrix(u, adapters=[5], domains=[4])
    svc.executor.write_after = NEVER
    seen: list[int] = []
    journal = svc.store.journal if svc.store is not None else None
    assert journal is not None
    for c in range(10, 17):
        assert one_by_one(svc, [assign(svc, u, "control_domain", c)]) == [None]
        seen.append(journal.owed_changes)
    assert seen == [1, 2, 3, 1, 2, 3, 1]
    assert record(state, u)["control_domains"] == [4, *range(10, 16)]
    idle(svc)
    assert record(state, u)["control_domains"] == [4, *range(10, 17)]


def test_kill_anywhere_in_a_chain(tmp_path: Path) -> None:
    """Lone changes one after another (the files of some written when idle, of others left
    to the chain), killed at every kind of point: after each restart the store holds every
    acknowledged change, plus perhaps the one that was cut (never a part of it), and
    nothing is drift."""
    rng = random.Random("kill-anywhere-chain")
    killer = Killer()
    host, acked = reserved_all(tmp_path)
    svc: Service | None = None
    cut: State | None = None
    chained = 0
    while killer.kills < KILLS:
        if svc is None:
            host, svc, acked = restart(tmp_path, rng, killer, host, [acked, cut], 60)
            if svc is None:
                continue
            svc.executor.write_after = NEVER
            cut = None
        live = svc
        outcome = acked
        answer: Any = None
        for _ in range(rng.randint(1, 6)):
            # each drawn from what the ones before left, and answered before the next
            call, effect = (
                reserve(rng) if rng.random() < 0.2 else member(rng, outcome, rng.choice(UUIDS))
            )
            [answer] = one_by_one(live, [functools.partial(call, live)])
            if isinstance(answer, Killed):
                break
            if not isinstance(answer, ApmatrixError):
                outcome = effect(outcome)
        if isinstance(answer, Killed):
            live.executor.close()
            svc = None
            # the cut change may be done or not; the acknowledged ones are all there
            acked, cut = outcome, effect(outcome)
            continue
        chained = max(chained, live.store.journal.owed_changes if live.store else 0)
        acked = outcome
        assert stored_view(live) == acked[0]
        assert live.state.reservations == acked[1]
        if rng.random() < 0.3:
            kills = killer.kills
            idle(live)  # the owed files written; a kill there cuts only those
            if killer.kills != kills:
                live.executor.close()
                svc, cut = None, None
                continue
            contents = Store(tmp_path).load()
            assert (contents.matrices, contents.reservations) == acked
    print(f"{killer.kills} kills, chains up to {chained}, killed at {killer.where}")
    assert chained >= 3
    assert killer.where.get("sysfs write", 0) >= KILLS // 20
    assert killer.where.get("journal-commit", 0) + killer.where.get("journal-write", 0) >= 5
    assert killer.where.get("rename", 0) + killer.where.get("fsync-dir", 0) >= KILLS // 20
