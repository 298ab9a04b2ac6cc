"""The fast clash computation equals the straightforward one, on random registries.

:meth:`Registry.clashes` (behind Check and every decision) works per owner: each matrix
holding an asked adapter, and the host pool, clash on (their adapters & asked) x (their
domains & asked). :func:`reference_clashes` is the code it replaced, APQN by APQN over the
whole cross product; the two must agree on which APQNs clash, who owns them, the order, the
decisions and the error texts, also on registries that break a rule (matrices sharing APQNs,
matrix APQNs in the host pool, an owner index left out of step by such overlaps).
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from apmatrixd.core import (
    Apqn,
    Clash,
    DefineMatrix,
    HostPool,
    Matrix,
    Registry,
    UpdateMatrix,
    cross,
)
from apmatrixd.core.errors import HOST


def reference_clashes(
    reg: Registry, adapters: Iterable[int], domains: Iterable[int], exclude: str | None = None
) -> tuple[list[Clash], list[Clash]]:
    """The old ``Registry.clashes``: every APQN of the cross product, one by one."""
    owners = reg.owners()
    host: list[Clash] = []
    held: list[Clash] = []
    for apqn in cross(adapters, domains):
        owner = owners.get(apqn)
        if owner is not None and owner != exclude:
            held.append(Clash(apqn, owner, reg.matrices[owner].name))
        if reg.pool.owns(apqn):
            host.append(Clash(apqn, HOST))
    return host, held


UUIDS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 6)]
NEW = "ffffffff-0000-4000-8000-000000000000"
# Mostly small ids so that clashes are common, and a few far apart and above the limits.
ID = st.one_of(st.integers(0, 7), st.sampled_from([0x47, 0xAB, 0xFF, 0x100, 0x3FF]))
IDS = st.frozensets(ID, max_size=6)
# Queries small (each asked APQN looked up) or wide (walked matrix by matrix).
QUERY = st.one_of(st.frozensets(st.integers(0, 3), max_size=2), IDS)
APQNS = st.frozensets(st.builds(Apqn, ID, ID), max_size=12)
POOLS = st.one_of(
    st.builds(HostPool, IDS, IDS),
    st.builds(lambda q: HostPool(queues=q), APQNS),
)
# A step builds the registry without asking it: any picture at all, sound or not.
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "drop"]), st.integers(0, 4), IDS, IDS, st.text(max_size=2)
    ),
    max_size=12,
)


def build(
    pool: HostPool, steps: list[tuple[str, int, frozenset[int], frozenset[int], str]]
) -> Registry:
    reg = Registry(pool=pool)
    for op, i, a, d, name in steps:
        uuid = UUIDS[i]
        old = reg.matrices.get(uuid)
        if old is not None:
            reg._drop(old)
        if op == "insert":
            reg._insert(Matrix(uuid, a, d, name=name))
    return reg


@settings(max_examples=1000, deadline=None)
@given(POOLS, STEPS, QUERY, QUERY, st.data())
def test_fast_clashes_equal_the_cross_product_walk(
    pool: HostPool,
    steps: list[tuple[str, int, frozenset[int], frozenset[int], str]],
    adapters: frozenset[int],
    domains: frozenset[int],
    data: st.DataObject,
) -> None:
    reg = build(pool, steps)
    # Excluding a matrix that is there (often an owner), one that is not, or none.
    exclude = data.draw(st.sampled_from([None, UUIDS[-1], *sorted(reg.matrices)]))
    host, held = reg.clashes(adapters, domains, exclude)
    want_host, want_held = reference_clashes(reg, adapters, domains, exclude)
    assert (host, held) == (want_host, want_held)
    assert [str(c) for c in host + held] == [str(c) for c in want_host + want_held]
    assert all(type(c) is Clash and type(c.apqn) is Apqn for c in host + held)
    # Check's reply: the old Service.check's sorted clashes, as the bus layer's rows
    rows = [(c.apqn.adapter, c.apqn.domain, c.owner) for c in sorted(want_host + want_held)]
    assert reg.clash_rows(adapters, domains, exclude) == rows
    # the decisions (so their refusals' texts) carry the same clashes, in the same order
    if exclude is not None and exclude in reg.matrices:
        change: DefineMatrix | UpdateMatrix = UpdateMatrix(exclude, adapters, domains, frozenset())
    else:
        change = DefineMatrix(Matrix(exclude or NEW, adapters, domains))
    decision = reg.decide(change)
    assert decision.host == tuple(sorted(want_host))
    assert decision.conflicts == tuple(sorted(want_held))


def test_whole_host_query_on_a_small_registry() -> None:
    """The case the fast path is for: 256 x 256 asked, a few owners."""
    reg = Registry(pool=HostPool(frozenset(range(8, 256)), frozenset(range(256))))
    reg.apply(DefineMatrix(Matrix(UUIDS[0], frozenset({1, 2}), frozenset({4, 0x47}), name="g")))
    every = frozenset(range(256))
    host, held = reg.clashes(every, every)
    assert (host, held) == reference_clashes(reg, every, every)
    assert len(host) == 248 * 256
    assert [str(c) for c in held] == [
        f"{a:02x}.{d:04x} owned by g ({UUIDS[0]})" for a in (1, 2) for d in (4, 0x47)
    ]
    assert reg.clashes(every, every, UUIDS[0])[1] == []
    u = UUIDS[0]
    assert reg.clash_rows(every, every)[:3] == [(1, 4, u), (1, 0x47, u), (2, 4, u)]
    assert len(reg.clash_rows(every, every)) == 248 * 256 + 4
