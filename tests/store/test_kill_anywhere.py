"""kill -9 anywhere, in process: a stream of changes, killed at hundreds of points inside calls.

A kill point is any store step (open, half a write, the rest, fsync, rename, fsync of the
directory, unlink), any step of the intent journal (its write, its sync, its clear) or any
single sysfs write, chosen by the test: after every restart the
next kill is armed 1..30 points ahead, so kills land inside kernel transactions, between the
kernel and the store, inside the store, during start-up itself, and between calls. A "kill"
raises a BaseException that no ``except Exception`` catches, the service object is dropped,
and a new one starts on the same state directory: half the time on the same emulated host
(a daemon crash: live mdevs and masks survive, possibly half-written), half the time on a
fresh one (a reboot). After each restart:

- the store parses (nothing set aside, no temp file left),
- it holds every acknowledged change: exactly the acknowledged state, or that state plus
  the one change in flight at the kill (which was never acknowledged, so either is right),
- nothing is left adopted and nothing is drift: the journal says which change was cut,
- no APQN has two owners: the registry's invariants hold, and the kernel agrees (no APQN in
  two live mdevs or in a mdev and the host pool), every live matrix is in the kernel as the
  registry has it, and after a reboot every autostart matrix is active, the rest defined.

APMATRIXD_LONG=1 kills ten times as often. Real process kills: tests/bus/test_bus_kill.py.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from apmatrixd.core import ApmatrixError, Apqn
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.store import Reservations, Store, StoredMatrix

KILLS = 2000 if os.environ.get("APMATRIXD_LONG") else 200
UUIDS = [f"{i}{i}{i}{i}{i}{i}{i}{i}-{i}{i}{i}{i}-4{i}{i}{i}-8{i}{i}{i}-{i * 12}" for i in "12345"]
ADAPTERS = [5, 6]
DOMAINS = [4, 0x47, 0xAB, 0xFF]


class Killed(BaseException):
    """kill -9: unwinds everything, nothing catches it."""


class Killer:
    def __init__(self) -> None:
        self.left = 0
        self.kills = 0
        self.where: dict[str, int] = {}

    def step(self, what: str) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        if self.left == 0:
            self.kills += 1
            self.where[what] = self.where.get(what, 0) + 1
            raise Killed(what)


class KillingSysfs(TreeSysfs):
    def __init__(self, host: Host, killer: Killer) -> None:
        super().__init__(host)
        self.killer = killer

    def write(self, path: str, data: str) -> None:
        self.killer.step("sysfs write")
        super().write(path, data)


State = tuple[dict[str, StoredMatrix], Reservations]
Op = tuple[str, Callable[[Service], object], Callable[[State], State]]


def some(rng: random.Random, ids: list[int], most: int = 2) -> list[int]:
    return sorted(rng.sample(ids, rng.randint(0, most)))


def make_op(rng: random.Random, state: State) -> Op:
    """One random change and what it does to the stored state if it is accepted."""
    matrices, res = state
    u = rng.choice(UUIDS)
    have = matrices.get(u)
    kind = rng.choice(
        [
            *("reserve", "reserve", "release", "create", "create", "update", "assign"),
            *("unassign", "start", "stop", "remove", "autostart", "apply"),
        ]
    )

    def put(sm: StoredMatrix) -> Callable[[State], State]:
        return lambda s: ({**s[0], sm.uuid: sm}, s[1])

    same: Callable[[State], State] = lambda s: s  # noqa: E731
    if kind == "apply":  # a declared document: a reserve and one or two matrices at once
        a, d = some(rng, ADAPTERS, 1), some(rng, DOMAINS, 2)
        doc = {"reserve": {"adapters": a, "domains": d}, "matrices": []}
        declared: list[StoredMatrix] = []
        for v in rng.sample(UUIDS, rng.randint(1, 2)):
            ma, md, auto = some(rng, ADAPTERS), some(rng, DOMAINS), rng.random() < 0.6
            old = matrices.get(v)
            cud = old.control_usage_domains if old is not None else True
            control = frozenset(md) if cud else frozenset()
            declared.append(StoredMatrix(v, f"g{v[0]}", frozenset(ma), frozenset(md), control,
                                         auto, cud))  # fmt: skip
            doc["matrices"].append(  # type: ignore[attr-defined]
                {"name": f"g{v[0]}", "uuid": v, "adapters": ma, "domains": md, "autostart": auto}
            )
        text = json.dumps(doc)
        return (
            kind,
            lambda svc: svc.apply(text),
            lambda s: ({**s[0], **{m.uuid: m for m in declared}}, s[1].reserve(a, d)),
        )
    if kind in ("reserve", "release"):
        a, d = some(rng, ADAPTERS, 1), some(rng, DOMAINS, 2)
        if kind == "reserve":
            return kind, lambda svc: svc.reserve(a, d), lambda s: (s[0], s[1].reserve(a, d))
        return kind, lambda svc: svc.release(a, d), lambda s: (s[0], s[1].release(a, d))
    if kind == "create" or have is None:
        a, d, c = some(rng, ADAPTERS), some(rng, DOMAINS), some(rng, [1, 2], 1)
        cud, auto, start = rng.random() < 0.8, rng.random() < 0.6, rng.random() < 0.7
        control = frozenset(c) | (frozenset(d) if cud else frozenset())
        sm = StoredMatrix(u, "", frozenset(a), frozenset(d), control, auto, cud)
        return (
            "create",
            lambda svc: svc.create_matrix(
                u,
                adapters=a,
                domains=d,
                control_domains=c,
                autostart=auto,
                start=start,
                control_usage_domains=cud,
            ),
            put(sm),
        )
    if kind == "update":
        a, d, c = some(rng, ADAPTERS), some(rng, DOMAINS), some(rng, [1, 2], 1)
        control = frozenset(c) | (frozenset(d) if have.control_usage_domains else frozenset())
        sm = replace(have, adapters=frozenset(a), domains=frozenset(d), control_domains=control)
        return kind, lambda svc: svc.update(u, a, d, c), put(sm)
    if kind in ("assign", "unassign"):
        what = rng.choice(["adapter", "domain", "control_domain"])
        i = rng.choice(ADAPTERS if what == "adapter" else DOMAINS)
        sets = {
            "adapter": set(have.adapters),
            "domain": set(have.domains),
            "control_domain": set(have.control_domains),
        }
        (sets[what].add if kind == "assign" else sets[what].discard)(i)
        if have.control_usage_domains:
            # Usage domains are control domains too; the control domains beyond them are the
            # caller's own, and a domain op leaves those (unassigning a domain the matrix does
            # not use keeps it as a control domain).
            own = sets["control_domain"] - (set() if what == "control_domain" else have.domains)
            sets["control_domain"] = own | sets["domain"]
        sm = replace(
            have,
            adapters=frozenset(sets["adapter"]),
            domains=frozenset(sets["domain"]),
            control_domains=frozenset(sets["control_domain"]),
        )
        call = (
            (lambda svc: svc.assign(u, what, i))
            if kind == "assign"
            else (lambda svc: svc.unassign(u, what, i))
        )  # type: ignore[arg-type]
        return kind, call, put(sm)
    if kind == "start":
        return kind, lambda svc: svc.start(u), same
    if kind == "stop":
        return kind, lambda svc: svc.stop(u), same
    if kind == "remove":
        return (
            kind,
            lambda svc: svc.remove(u),
            lambda s: ({k: v for k, v in s[0].items() if k != u}, s[1]),
        )
    auto = not have.autostart
    return kind, lambda svc: svc.set_autostart(u, auto), put(replace(have, autostart=auto))


def between(got: State, candidates: list[State]) -> bool:
    """Every record of ``got`` is one of the candidates' (and no other record is there)."""
    keys = {u for c in candidates for u in c[0]} | set(got[0])
    return got[1] in [c[1] for c in candidates] and all(
        got[0].get(u) in [c[0].get(u) for c in candidates] for u in keys
    )


def stored_view(svc: Service) -> dict[str, StoredMatrix]:
    """What the running service says it holds, for the matrices it did not merely adopt."""
    return {m.uuid: svc.state.record(m.uuid) for m in svc.matrices() if not m.adopted}


def check_kernel(svc: Service, rebooted: bool, state: State) -> None:
    assert svc.registry.violations() == []
    snap = svc.kernel.read_host()
    seen: dict[Apqn, str] = {}
    for mdev in snap.mdevs.values():
        for apqn in (Apqn(a, d) for a in mdev.adapters for d in mdev.domains):
            assert apqn not in seen, f"{apqn} in {seen[apqn]} and {mdev.uuid}"
            seen[apqn] = mdev.uuid
            assert not snap.pool.owns(apqn), f"{apqn} of {mdev.uuid} is in the host pool"
    for m in svc.matrices():
        if m.state == "defined":
            assert m.uuid not in snap.mdevs
        else:
            live = snap.mdevs[m.uuid]
            assert (set(live.adapters), set(live.domains)) == (set(m.adapters), set(m.domains))
    assert set(snap.mdevs) <= set(svc.registry.matrices)
    if rebooted:
        for u, sm in state[0].items():
            want = "active" if sm.autostart else "defined"
            assert svc.matrix(u).state == want, (u, sm)


@pytest.mark.parametrize("scenario", ["default", "rfc2017"])
def test_kill_anywhere(tmp_path: Path, scenario: str) -> None:
    rng = random.Random(f"kill-anywhere-{scenario}")
    killer = Killer()
    host = Host.from_name(scenario)
    acked: State = ({}, Reservations())
    target = KILLS if scenario == "default" else KILLS // 2
    restarts = ops = acks = 0
    svc: Service | None = None
    in_flight: Callable[[State], State] | None = None
    rebooted = True
    while killer.kills < target:
        if svc is None:
            # Restart: the store must hold the acknowledged state (plus, maybe, the change
            # that was in flight: until a start-up has finished its recovery, either), parse
            # cleanly, and the service must agree with it.
            contents = Store(tmp_path).load()
            assert contents.set_aside == []
            got: State = (contents.matrices, contents.reservations)
            candidates = [acked] + ([in_flight(acked)] if in_flight else [])
            # Before recovery a change of several records (an apply) may be cut between
            # them: each record is the acknowledged one or the change's.
            assert between(
                got, candidates
            ), f"restart {restarts}: store lost an acknowledged change"
            leftovers = [n for n in os.listdir(tmp_path / "matrices") if n.startswith(".")]
            assert leftovers == []
            rebooted = rng.random() < 0.5
            if rebooted:
                host = Host.from_name(scenario)
            killer.left = rng.randint(1, 30)
            fresh = Service(
                Kernel(KillingSysfs(host, killer)), store=Store(tmp_path, fault=killer.step)
            )
            try:
                fresh.load()
            except Killed:
                restarts += 1
                continue  # killed during start-up: start again (no reboot needed)
            svc = fresh
            restarts += 1
            # The recovery may have undone the change in flight (or found it done).
            contents = Store(tmp_path).load()
            got = (contents.matrices, contents.reservations)
            assert got in candidates, f"restart {restarts}: recovery lost an acknowledged change"
            acked, in_flight = got, None
            assert stored_view(svc) == acked[0]
            check_kernel(svc, rebooted, acked)
            # The journal names the change a kill cut: it is undone (or completed), so no
            # half-created mdev is left to be adopted, and none of our own writes is drift.
            assert [m.uuid for m in svc.matrices() if m.adopted] == []
            assert svc.startup_drift == []
        name, call, effect = make_op(rng, acked)
        ops += 1
        try:
            call(svc)
        except Killed:
            svc, in_flight = None, effect
            continue
        except ApmatrixError:
            assert stored_view(svc) == acked[0], name  # a refusal changes nothing
            continue
        acked = effect(acked)
        acks += 1
        assert stored_view(svc) == acked[0], name
        assert svc.state.reservations == acked[1]
    print(
        f"{scenario}: {killer.kills} kills, {restarts} restarts, {ops} calls, {acks} acked,",
        f"killed at {killer.where}",
    )
    # The stream really changed things between kills (on the 2017 layout start-up writes a
    # bind and an unbind per queue, so many kills land there instead).
    assert ops >= target // 4 and acks >= ops // 4
    assert killer.where.get("sysfs write", 0) > target // 10
    assert killer.where.get("rename", 0) >= target // 50
    journal = sum(n for step, n in killer.where.items() if step.startswith("journal-"))
    assert journal > target // 20
    assert killer.where.get("journal-commit", 0) + killer.where.get("journal-commit-sync", 0)
