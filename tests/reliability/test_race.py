"""Racing clients: 50 clients, each on its own bus connection, create, update and remove
matrices over the same 64 APQNs at once, and race for the same UUIDs and names.

Each matrix has one owner client (its creator), so what the daemon acknowledged per matrix is
a sequence and its last acknowledged state is known. At the end:
- every acknowledged change is in the kernel (the emulator, through FUSE): the mdevs are
  exactly the surviving matrices, each with the sets of its last acknowledged call;
- no APQN has two owners, none is in the host pool, registry = kernel = state directory;
- a contested UUID or name was won by at most one client, the others heard AlreadyExists;
- every refusal named its clash: Conflict and HostOwned texts name APQNs (``05.0004``), each
  one of the refused call's own APQNs, and Conflict names the owner (``owned by``).

CI: 50 clients x 8 calls; long mode (APMATRIXD_LONG=1): 50 clients x 80 calls, 5 rounds.
"""

from __future__ import annotations

import asyncio
import random
import uuid as uuidlib
from collections import Counter
from pathlib import Path
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client
from dbus_fast import MessageType, Variant
from relrig import ERR, SimFactory, apqns_named, check_all, long_mode, path_of

SCENARIO = str(Path(__file__).with_name("race.toml"))
CLIENTS = 50
ADAPTERS = list(range(0x10, 0x18))
DOMAINS = list(range(8))
Sets = tuple[frozenset[int], frozenset[int]]


def some(rng: random.Random, ids: list[int], most: int = 2) -> list[int]:
    return sorted(rng.sample(ids, rng.randint(1, most)))


class Racer:
    def __init__(self, n: int, c: Client, rng: random.Random, figures: Counter[str]) -> None:
        self.n, self.c, self.rng, self.figures = n, c, rng, figures
        self.mine: dict[str, Sets] = {}  # last acknowledged sets of the matrices I own
        self.gone: set[str] = set()  # matrices I removed (acknowledged)

    def judge(self, reply: Any, want: Sets, what: str) -> bool:
        """True on success; a refusal must name its clash."""
        self.figures["calls"] += 1
        if reply.message_type == MessageType.METHOD_RETURN:
            self.figures["acked"] += 1
            return True
        name, text = reply.error_name, str(reply.body[0] if reply.body else "")
        self.figures[name.rsplit(".", 1)[-1]] += 1
        assert name in (ERR + "Conflict", ERR + "AlreadyExists"), (what, name, text)
        if name == ERR + "Conflict":
            named = apqns_named(text)
            mine = {(a, d) for a in want[0] for d in want[1]}
            assert named and named <= mine, (what, text, sorted(mine))
            assert "owned by" in text, (what, text)
            self.figures["races"] += 1
        return False

    async def create(self, uuid: str, name: str = "") -> None:
        a, d = some(self.rng, ADAPTERS, 1), some(self.rng, DOMAINS)
        opts = {"adapters": Variant("au", a), "domains": Variant("au", d)}
        if name:
            opts["name"] = Variant("s", name)
        reply = await self.c.call(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [uuid, opts])
        if self.judge(reply, (frozenset(a), frozenset(d)), f"create {uuid} {a} {d}"):
            assert reply.body == [path_of(uuid)]
            self.mine[uuid] = (frozenset(a), frozenset(d))
        elif reply.error_name == ERR + "AlreadyExists":
            self.figures["races"] += 1

    async def step(self) -> None:
        kind = self.rng.choice(["create", "update", "update", "assign", "remove"])
        if kind == "create" or not self.mine:
            await self.create(str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4)))
            return
        uuid = self.rng.choice(sorted(self.mine))
        a, d = self.mine[uuid]
        if kind == "remove":
            reply = await self.c.call(path_of(uuid), MATRIX, "Remove")
            assert self.judge(reply, (a, d), f"remove {uuid}"), reply.body
            del self.mine[uuid]
            self.gone.add(uuid)
            return
        if kind == "assign":
            dom = self.rng.choice(DOMAINS)
            new = (a, d | {dom})
            reply = await self.c.call(path_of(uuid), MATRIX, "AssignDomain", "u", [dom])
        else:
            new = (frozenset(some(self.rng, ADAPTERS, 1)), frozenset(some(self.rng, DOMAINS)))
            body = [sorted(new[0]), sorted(new[1]), []]
            reply = await self.c.call(path_of(uuid), MATRIX, "Update", "auauau", body)
        if self.judge(reply, new, f"{kind} {uuid} {new}"):
            self.mine[uuid] = new


async def race(address: str, seed: int, calls: int, figures: Counter[str]) -> dict[str, Sets]:
    clients = [await Client.connect(address) for _ in range(CLIENTS)]
    racers = [Racer(i, c, random.Random(f"{seed}-{i}"), figures) for i, c in enumerate(clients)]
    contested = [str(uuidlib.UUID(int=seed * 100 + k, version=4)) for k in range(5)]
    try:
        # everyone at once for 5 UUIDs and 5 names: one winner each at most
        await asyncio.gather(
            *(r.create(contested[r.n % 5], f"shared-{seed}-{r.n % 7}") for r in racers)
        )
        for u in contested:
            assert sum(u in r.mine for r in racers) <= 1, u
        names = Counter(
            f"shared-{seed}-{r.n % 7}" for r in racers for u in r.mine if u in contested
        )
        assert all(v <= 1 for v in names.values()), names

        async def run(r: Racer) -> None:
            for _ in range(calls):
                await r.step()

        await asyncio.gather(*(run(r) for r in racers))
    finally:
        for c in clients:
            c.close()
    out: dict[str, Sets] = {}
    for r in racers:
        assert not set(r.mine) & set(out)
        out |= r.mine
    return out


def test_fifty_clients_race(sim: SimFactory) -> None:
    s = sim(SCENARIO)
    rounds, calls = (5, 80) if long_mode() else (1, 8)
    figures: Counter[str] = Counter()

    async def go() -> None:
        c = await Client.connect(s.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [ADAPTERS, DOMAINS])
        for seed in range(rounds):
            want = await race(s.address, seed, calls, figures)
            kernel = s.kernel()["mdevs"]
            # every acknowledged change is in the kernel, and nothing else is
            assert set(kernel) == set(want)
            for u, (a, d) in want.items():
                assert kernel[u] == (a, d, d), u  # control domains follow the usage domains
            problems, reg = await check_all(c, s)
            assert problems == []
            assert set(reg["matrices"]) == set(want)
            figures["rounds"] += 1
            for u in want:  # the next round races on an empty host pool again
                await c.ok(path_of(u), MATRIX, "Remove")
            assert s.kernel()["mdevs"] == {}
        c.close()

    asyncio.run(go())
    print(f"\nrace: {dict(figures)}")
    assert figures["acked"] > figures["calls"] // 5
    assert figures["Conflict"] > 0 and figures["AlreadyExists"] > 0  # the clients did collide
