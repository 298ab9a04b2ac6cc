"""The registry's rules, from the kernel doc's and the design document's examples."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apmatrixd.core import (
    AlreadyExists,
    ApmatrixError,
    Apqn,
    Busy,
    Change,
    Conflict,
    Decision,
    DefineMatrix,
    HostOwned,
    HostPool,
    InvalidArgument,
    Limits,
    Matrix,
    NotFound,
    OutOfRange,
    Registry,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)
from apmatrixd.core.matrix import normalize_uuid

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"


def fs(*ids: int) -> frozenset[int]:
    return frozenset(ids)


@pytest.fixture
def reg() -> Registry:
    """The design document's host with adapters 05, 06 and domains 04, 47 given to vfio_ap."""
    pool = HostPool(adapters=frozenset(range(256)) - {5, 6}, domains=frozenset(range(256)))
    return Registry(pool=pool)


def define(reg: Registry, uuid: str, a: frozenset[int], d: frozenset[int], name: str = "") -> None:
    reg.apply(DefineMatrix(Matrix(uuid, a, d, name=name)))


def test_design_example_1_two_guests_share_an_adapter_not_an_apqn(reg: Registry) -> None:
    define(reg, U1, fs(5, 6), fs(4), "guest1")
    define(reg, U2, fs(5, 6), fs(0x47), "guest2")
    assert reg.owner(Apqn(5, 4)) == U1
    assert reg.owner(Apqn(6, 0x47)) == U2
    assert reg.violations() == []


def test_design_example_2_refused_with_every_clashing_apqn_named(reg: Registry) -> None:
    define(reg, U1, fs(5, 6), fs(4, 0x47), "guest1")
    with pytest.raises(Conflict) as exc:
        define(reg, U3, fs(6), fs(0x47, 0xAB), "guest3")
    assert [str(c.apqn) for c in exc.value.clashes] == ["06.0047"]
    assert "06.0047 owned by guest1 (1111" in str(exc.value)
    assert U3 not in reg.matrices


def test_owners_of_adapter_from_the_index(reg: Registry) -> None:
    define(reg, U1, fs(5, 6), fs(4), "guest1")
    define(reg, U2, fs(5), fs(0x47, 0x10), "guest2")
    assert reg.owners_of_adapter(5) == {4: U1, 0x10: U2, 0x47: U2}
    assert list(reg.owners_of_adapter(5)) == [4, 0x10, 0x47]
    assert reg.owners_of_adapter(6) == {4: U1}
    assert reg.owners_of_adapter(7) == {}
    reg.apply(RemoveMatrix(U2))
    assert reg.owners_of_adapter(5) == {4: U1}


def test_host_owned_apqns_are_refused_before_sharing(reg: Registry) -> None:
    define(reg, U1, fs(6), fs(4))
    decision = reg.decide(DefineMatrix(Matrix(U2, fs(6, 7), fs(4))))
    assert [str(c.apqn) for c in decision.host] == ["07.0004"]
    assert [str(c.apqn) for c in decision.conflicts] == ["06.0004"]
    with pytest.raises(HostOwned) as exc:
        decision.raise_if_refused()
    assert {c.owner for c in exc.value.clashes} == {"host", U1}
    # each APQN named under what it is: the guest-held one is no host APQN
    assert str(exc.value) == (
        "APQNs still belong to the host: 07.0004 owned by host; "
        f"and already in use: 06.0004 owned by {U1}"
    )


def test_only_adapters_or_only_domains_never_clash(reg: Registry) -> None:
    define(reg, U1, fs(5), fs(4))
    define(reg, U2, fs(5), fs())
    define(reg, U3, fs(), fs(4))
    assert reg.violations() == []


def test_control_domains_may_be_shared(reg: Registry) -> None:
    reg.apply(DefineMatrix(Matrix(U1, fs(5), fs(4), fs(4, 7))))
    reg.apply(DefineMatrix(Matrix(U2, fs(6), fs(4), fs(4, 7))))
    assert reg.get(U2).control_domains == fs(4, 7)


def test_range_is_checked_against_the_host_limits() -> None:
    reg = Registry(limits=Limits(63, 15), pool=HostPool(frozenset(), frozenset()))
    with pytest.raises(OutOfRange) as exc:
        reg.apply(DefineMatrix(Matrix(U1, fs(64), fs(4), fs(16))))
    assert [v.id for v in exc.value.violations] == [64, 16]


def test_order_lets_a_caller_speak_for_a_kernel_interface(reg: Registry) -> None:
    define(reg, U1, fs(5), fs(4))
    d = reg.decide(DefineMatrix(Matrix(U2, fs(5, 0x1FF % 256), fs(4))))
    assert isinstance(d.error(["conflict"]), Conflict)


def test_host_pool_cannot_take_back_a_held_apqn(reg: Registry) -> None:
    define(reg, U1, fs(5), fs(4))
    back = HostPool(adapters=frozenset(range(256)) - {6}, domains=frozenset(range(256)))
    with pytest.raises(Busy) as exc:
        reg.apply(SetHostPool(back))
    assert [str(c.apqn) for c in exc.value.clashes] == ["05.0004"]
    assert 5 not in reg.pool.adapters


def test_host_pool_rule_is_the_strict_6_19_one(reg: Registry) -> None:
    """Setting adapter 5 back counts against every domain of matrices holding adapter 5,
    even a domain outside aqmask (6.19+ kernels), so the registry is never looser."""
    pool = HostPool(adapters=frozenset(range(256)) - {5, 6}, domains=frozenset(range(256)) - {9})
    reg = Registry(pool=pool)
    define(reg, U1, fs(5), fs(9))
    with pytest.raises(Busy):
        reg.apply(SetHostPool(HostPool(pool.adapters | {5}, pool.domains)))


def test_per_queue_pool_of_the_2017_layout() -> None:
    q = Apqn(5, 4)
    reg = Registry(pool=HostPool(queues=frozenset({q, Apqn(5, 0x47)})))
    with pytest.raises(HostOwned):
        define(reg, U1, fs(5), fs(4))
    reg.apply(SetHostPool(HostPool(queues=frozenset({Apqn(5, 0x47)}))))
    define(reg, U1, fs(5), fs(4))
    with pytest.raises(Busy):
        reg.apply(SetHostPool(HostPool(queues=frozenset({q, Apqn(5, 0x47)}))))


def test_update_is_atomic_and_undo_restores(reg: Registry) -> None:
    define(reg, U1, fs(5), fs(4), "g1")
    define(reg, U2, fs(6), fs(4), "g2")
    with pytest.raises(Conflict):
        reg.apply(UpdateMatrix(U1, fs(5, 6), fs(4, 0x47), fs()))
    assert reg.get(U1).adapters == fs(5)
    undo = reg.apply(UpdateMatrix(U1, fs(5), fs(4, 0x47), fs(1), name="renamed"))
    assert reg.get(U1).name == "renamed"
    reg.restore(undo)
    assert reg.get(U1) == Matrix(U1, fs(5), fs(4), name="g1")
    assert reg.violations() == []


def test_names_uuids_and_missing_matrices(reg: Registry) -> None:
    define(reg, U1, fs(), fs(), "g1")
    with pytest.raises(AlreadyExists):
        define(reg, U1, fs(), fs())
    with pytest.raises(AlreadyExists):
        define(reg, U2, fs(), fs(), "g1")
    with pytest.raises(NotFound):
        reg.apply(RemoveMatrix(U2))
    with pytest.raises(NotFound):
        reg.apply(UpdateMatrix(U2, fs(), fs(), fs()))
    assert normalize_uuid(U1.upper()) == U1


def test_apqn_text() -> None:
    assert str(Apqn(5, 0xAB)) == "05.00ab"
    assert Apqn.parse("05.00ab") == Apqn(5, 0xAB)


ids = st.frozensets(st.integers(0, 7), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["define", "update", "remove", "pool"]),
            st.integers(0, 3),
            ids,
            ids,
            st.sampled_from(["", "guest1", "guest2"]),
        ),
        max_size=30,
    )
)
def test_no_sequence_of_changes_breaks_an_invariant(
    ops: list[tuple[str, int, frozenset[int], frozenset[int], str]],
) -> None:
    """Refused changes leave the registry as it was; accepted ones keep it sound."""
    reg = Registry(limits=Limits(6, 6), pool=HostPool(frozenset({0, 1}), frozenset({0, 1})))
    uuids = [f"{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-000000000000" for i in range(4)]
    for op, i, a, d, name in ops:
        before = (dict(reg.matrices), reg.pool)
        change: Change
        if op == "define":
            change = DefineMatrix(Matrix(uuids[i], a, d, name=name))
        elif op == "update":
            change = UpdateMatrix(uuids[i], a, d, frozenset(), name=name or None)
        elif op == "remove":
            change = RemoveMatrix(uuids[i])
        else:
            change = SetHostPool(HostPool(a, d))
        decision = reg.decide(change)
        if decision.accepted:
            reg.apply(change)
        else:
            assert (dict(reg.matrices), reg.pool) == before
        assert reg.violations() == []
        for adapter in range(7):  # the index agrees with a scan of every APQN
            scan = {q.domain: u for q, u in sorted(reg.owners().items()) if q.adapter == adapter}
            assert reg.owners_of_adapter(adapter) == scan
        for n in ("guest1", "guest2"):  # so does the name index
            named = [m for m in reg.matrices.values() if m.name == n]
            assert reg.by_name(n) == (named[0] if named else None)


junk = st.one_of(
    st.integers(-(2**70), 2**70), st.text(max_size=3), st.none(), st.floats(), st.booleans()
)


@settings(max_examples=300, deadline=None)
@given(st.lists(junk, max_size=3), st.lists(junk, max_size=3), st.lists(junk, max_size=3))
def test_bad_input_only_ever_gives_a_named_refusal(
    a: list[object], d: list[object], c: list[object]
) -> None:
    reg = Registry(limits=Limits(63, 15))
    try:
        m = Matrix(U1, frozenset(a), frozenset(d), frozenset(c))  # type: ignore[arg-type]
    except TypeError:
        return  # unhashable: the D-Bus layer never builds such a thing
    for change in (DefineMatrix(m), SetHostPool(HostPool(m.adapters, m.domains))):
        with contextlib.suppress(ApmatrixError):  # the only thing bad input may raise
            reg.apply(change)
        assert reg.violations() == []
    assert all(type(i) is int and i >= 0 for apqn in reg.owners() for i in apqn)


def test_apply_reuses_only_this_changes_decision(reg: Registry) -> None:
    """A decision handed to apply is used only if it was taken for this very change object."""
    define(reg, U1, fs(5), fs(4))
    clash = DefineMatrix(Matrix(U2, fs(5), fs(4)))
    fine = DefineMatrix(Matrix(U3, fs(6), fs(4)))
    with pytest.raises(Conflict):  # the accepted decision of another change does not count
        reg.apply(clash, decided=reg.decide(fine))
    decision = reg.decide(fine)
    assert reg.apply(fine, decided=decision) == RemoveMatrix(U3)
    assert reg.violations() == []


def test_the_kernels_truth_counts_in_every_decision() -> None:
    """A live matrix whose mdev holds more than its registry sets (a drift the registry could
    not adopt) claims those APQNs: Check names it, a define or a pool change clashes."""
    from apmatrixd.core import (
        Busy,
        Conflict,
        DefineMatrix,
        HostPool,
        Matrix,
        Registry,
        SetHostPool,
        UpdateMatrix,
    )

    g, d = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    reg = Registry(pool=HostPool(frozenset(), frozenset()))
    reg.apply(DefineMatrix(Matrix(g, frozenset({5, 6}), frozenset({4}))))
    reg.apply(DefineMatrix(Matrix(d, frozenset({6}), frozenset({0xAB}))))
    reg.set_truth(g, {5, 6}, {4, 0xAB})  # the kernel's g also holds 05.00ab and 06.00ab
    assert reg.claims() == {(5, 0xAB): g, (6, 0xAB): g}
    rows = reg.clash_rows({5, 6}, {0xAB})
    assert (5, 0xAB, g) in rows and (6, 0xAB, d) in rows and (6, 0xAB, g) in rows
    err = reg.decide(UpdateMatrix(d, frozenset({6}), frozenset({0xAB}), frozenset())).error()
    assert isinstance(err, Conflict) and "06.00ab" in str(err) and g in str(err)
    reg.set_truth(g, {5, 6, 7}, {4, 0xAB, 0xCD})  # drifted further: adapter 07, domain cd
    new = HostPool(frozenset({7}), frozenset({0xCD}))  # give 07.00cd to the host: EBUSY
    refused = reg.decide(SetHostPool(new)).error()
    assert isinstance(refused, Busy) and "07.00cd" in str(refused)
    reg.clear_truth(g)
    assert reg.claims() == {} and reg.decide(SetHostPool(new)).accepted
    assert reg.violations() == []


small = st.frozensets(st.integers(0, 5), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), small, small, st.sampled_from(["", "a", "b"])),
             min_size=1, max_size=25)
)  # fmt: skip
def test_an_update_changes_the_indexes_as_dropping_and_inserting_the_matrix_would(
    steps: list[tuple[int, frozenset[int], frozenset[int], str]],
) -> None:
    """An update touches only the APQNs and ids that differ; the indexes come out as a
    drop and insert of the whole matrix leaves them, overlapping (restored past the rules)
    matrices and shared names included."""
    reg = Registry(limits=Limits(6, 6))
    uuids = [f"{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-000000000000" for i in range(3)]
    for i, a, d, name in steps:
        uuid = uuids[i]
        if uuid not in reg.matrices:
            reg.restore(DefineMatrix(Matrix(uuid, a, d, name=name)))
            continue
        ref = reg.copy()
        old = ref.get(uuid)
        ref._drop(old)
        ref._insert(replace(old.with_sets(a, d, frozenset()), name=name))
        reg.restore(UpdateMatrix(uuid, a, d, frozenset(), name=name))
        assert reg._owner == ref._owner
        assert reg._by_adapter == ref._by_adapter and reg._by_domain == ref._by_domain
        assert {n: list(u) for n, u in reg._by_name.items()} == {
            n: list(u) for n, u in ref._by_name.items()
        }
        assert list(reg.matrices.items()) == list(ref.matrices.items())


def _normalize_by_uuidlib(text: object) -> str | None:
    """What normalize_uuid answers, from the uuid module alone (None: refused)."""
    try:
        canonical = str(uuid.UUID(text))  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
    return canonical if canonical == text.lower() else None  # type: ignore[attr-defined]


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: str(u) + "\n"),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.text(alphabet="0123456789abcdefABCDEF-{}\n", max_size=40),
        st.none(),
    )
)
def test_normalize_uuid_answers_as_the_uuid_module(text: object) -> None:
    """The canonical form is taken as it is, without parsing; everything else as before."""
    want = _normalize_by_uuidlib(text)
    if want is None:
        with pytest.raises(InvalidArgument):
            normalize_uuid(text)  # type: ignore[arg-type]
    else:
        assert normalize_uuid(text) == want  # type: ignore[arg-type]


# -- a decision on a sound matrix judges what it gains; the answer is the whole product's -----
def _whole(reg: Registry) -> Registry:
    """A copy that knows no matrix to be sound: every decision judges the whole product."""
    ref = reg.copy()
    ref._sound.clear()
    return ref


def test_an_accepted_update_marks_the_matrix_and_the_next_decision_uses_it(reg: Registry) -> None:
    define(reg, U1, fs(5), fs(4))
    assert U1 in reg._sound
    grow = UpdateMatrix(U1, fs(5, 6), fs(4, 0x47), fs())
    assert reg.decide(grow) == _whole(reg).decide(grow)
    reg.apply(grow)
    reg.restore(DefineMatrix(Matrix(U2, fs(6), fs(0x47))))  # adopted past the rules: 06.0047
    assert U1 not in reg._sound  # its 06.0047 is U2's in the index now
    again = UpdateMatrix(U1, fs(5, 6), fs(4, 0x47, 0xAB), fs())
    assert reg.decide(again) == _whole(reg).decide(again)
    assert not reg.decide(again).accepted  # 06.0047, which it keeps, is held by U2
    reg.apply(RemoveMatrix(U2))
    reg.apply(UpdateMatrix(U1, fs(5, 6), fs(4, 0x47), fs()))
    assert U1 in reg._sound
    reg.pool = HostPool(adapters=frozenset(range(256)) - {5}, domains=frozenset(range(256)))
    shrink = UpdateMatrix(U1, fs(5, 6), fs(4), fs())  # 06.0004 is the host's since
    assert not reg.decide(shrink).accepted and reg.decide(shrink) == _whole(reg).decide(shrink)
    assert reg.violations() == ["06.0004 of " + U1 + " is in the host pool",
                                "06.0047 of " + U1 + " is in the host pool"]  # fmt: skip


SPOILERS = {
    # Each gives an APQN U1 holds and keeps to someone else, behind the decisions.
    "adopted over it": lambda reg: reg.restore(DefineMatrix(Matrix(U2, fs(6), fs(0x47)))),
    "adopted into it": lambda reg: (
        reg.apply(DefineMatrix(Matrix(U2, fs(7), fs(0x47)))),
        reg.restore(UpdateMatrix(U2, fs(6, 7), fs(0x47), fs())),
    ),
    "claimed by the kernel's truth": lambda reg: (
        reg.apply(DefineMatrix(Matrix(U2, fs(7), fs(0x47)))),
        reg.set_truth(U2, {6, 7}, {0x47}),
    ),
    "a truth pool": lambda reg: setattr(reg, "truth_pool", HostPool(fs(5), fs(4))),
    "a pool set outside": lambda reg: setattr(reg, "pool", HostPool(fs(5), fs(4))),
    "a vfio_ap override gone": lambda reg: setattr(reg, "vfio_overrides", frozenset()),
}


@pytest.mark.parametrize("spoil", sorted(SPOILERS))
def test_whatever_takes_a_kept_apqn_away_is_seen_by_the_next_decision(spoil: str) -> None:
    reg = Registry(pool=HostPool(fs(6), fs(0x47)), vfio_overrides=frozenset({(6, 0x47)}))
    reg.apply(DefineMatrix(Matrix(U1, fs(5, 6), fs(4, 0x47))))
    assert U1 in reg._sound and [v for v in reg.violations() if "sound" in v] == []
    SPOILERS[spoil](reg)
    grow = UpdateMatrix(U1, fs(5, 6, 7), fs(4, 0x47), fs())
    decision = reg.decide(grow)
    assert decision == _whole(reg).decide(grow)
    kept = {Apqn(a, d) for a in (5, 6) for d in (4, 0x47)}
    assert kept & {c.apqn for c in (*decision.host, *decision.conflicts)}
    assert [v for v in reg.violations() if "sound" in v] == []


def test_a_decision_made_up_by_the_caller_marks_nothing() -> None:
    """A flag change is applied with an empty Decision of the caller's (it judges no APQN):
    it must not mark a matrix whose APQNs the kernel's truth claims as sound."""
    reg = Registry(pool=HostPool(frozenset(), frozenset()))
    reg.apply(DefineMatrix(Matrix(U1, fs(5, 6), fs(4))))
    reg.apply(DefineMatrix(Matrix(U2, fs(6), fs(0xAB))))
    reg.set_truth(U1, {5, 6}, {4, 0xAB})  # U1's mdev holds 06.00ab too
    flag = UpdateMatrix(U2, fs(6), fs(0xAB), fs(), autostart=True)
    reg.apply(flag, decided=Decision(flag))
    assert U2 not in reg._sound and [v for v in reg.violations() if "sound" in v] == []
    grow = UpdateMatrix(U2, fs(6, 7), fs(0xAB), fs())
    assert reg.decide(grow) == _whole(reg).decide(grow) and not reg.decide(grow).accepted


def test_a_claim_held_behind_another_counts_once_that_one_is_cleared() -> None:
    """U1's own claim hides U3's on the same APQN, so U1 may take it; once U1's claim is
    cleared, U3's counts, and U1 keeping that APQN is refused as the whole product says."""
    reg = Registry(pool=HostPool(frozenset(), frozenset()))
    reg.apply(DefineMatrix(Matrix(U1, fs(6), fs(0x47))))
    reg.apply(DefineMatrix(Matrix(U3, fs(0x11), fs(0x11))))
    reg.set_truth(U1, {6}, {0x47, 0x48})  # U1's mdev holds 06.0048 too
    reg.set_truth(U3, {0x11, 6}, {0x11, 0x48})  # and so does U3's: behind U1's claim
    reg.apply(UpdateMatrix(U1, fs(6), fs(0x47, 0x48), fs()))
    assert U1 in reg._sound
    reg.clear_truth(U1)  # as every update does once it is applied
    grow = UpdateMatrix(U1, fs(6), fs(0x47, 0x48, 0x49), fs())
    assert reg.decide(grow) == _whole(reg).decide(grow)
    assert [(c.apqn, c.owner) for c in reg.decide(grow).conflicts] == [(Apqn(6, 0x48), U3)]


small_ids = st.frozensets(st.integers(0, 2), max_size=3)
pools = st.builds(HostPool, small_ids, small_ids)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["define", "update", "adopt", "redo", "remove", "pool", "truth_pool",
                             "overrides", "claim", "unclaim"]),
            st.integers(0, 2),
            small_ids,
            small_ids,
            pools,
        ),
        max_size=30,
    ),
    st.lists(st.tuples(st.integers(0, 2), small_ids, small_ids), min_size=1, max_size=4),
)  # fmt: skip
def test_a_decision_on_a_sound_matrix_is_the_whole_products(
    ops: list[tuple[str, int, frozenset[int], frozenset[int], HostPool]],
    asks: list[tuple[int, frozenset[int], frozenset[int]]],
) -> None:
    """Random registries (matrices adopted past the rules, the kernel's claims and truth pool,
    driver_override queues, pools changed outside) and random updates: every decision equals
    the one that judges the whole cross product, and no matrix marked sound is not."""
    reg = Registry(limits=Limits(4, 4), pool=HostPool(frozenset({0}), frozenset({0})))
    uuids = [f"{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-000000000000" for i in range(3)]

    def check() -> None:
        # The per-id indexes follow the matrices whatever was adopted; the owner index
        # may not (two matrices restored over one another).
        kept = ("sound", "adapter index", "domain index")
        assert [v for v in reg.violations() if any(k in v for k in kept)] == []
        for i, a, d in asks:
            if uuids[i] in reg.matrices:
                ask = UpdateMatrix(uuids[i], a, d, d)
                assert reg.decide(ask) == _whole(reg).decide(ask)

    for op, i, a, d, pool in ops:
        uuid = uuids[i]
        here = uuid in reg.matrices
        change: Change | None = None
        if op == "define" and not here:
            change = DefineMatrix(Matrix(uuid, a, d))
        elif op == "update" and here:
            change = UpdateMatrix(uuid, a, d, frozenset())
        elif op == "adopt" and not here:
            reg.restore(DefineMatrix(Matrix(uuid, a, d)))
        elif op == "redo" and here:
            reg.restore(UpdateMatrix(uuid, a, d, frozenset()))
        elif op == "remove" and here:
            change = RemoveMatrix(uuid)
        elif op == "pool":
            change = SetHostPool(pool)
        elif op == "truth_pool":
            reg.truth_pool = pool if a else None
        elif op == "overrides":
            reg.vfio_overrides = frozenset((x, y) for x in a for y in d)
        elif op == "claim" and here:
            reg.set_truth(uuid, a, d)
        elif op == "unclaim":
            reg.clear_truth(uuid)
        if change is not None and reg.decide(change).accepted:
            reg.apply(change)
        check()


def test_a_pool_taking_an_apqn_the_index_lost_is_busy_for_its_holder() -> None:
    """Matrices restored over one another, one removed since: the index no longer names the
    other as the APQN's owner, but the pool may not take it (a refusal, not a KeyError)."""
    reg = Registry(pool=HostPool(frozenset(), frozenset()))
    reg.restore(DefineMatrix(Matrix(U1, fs(5), fs(4))))
    reg.restore(DefineMatrix(Matrix(U2, fs(5), fs(4))))
    reg.apply(RemoveMatrix(U2))
    err = reg.decide(SetHostPool(HostPool(fs(5), fs(4)))).error()
    assert isinstance(err, Busy) and [c.owner for c in err.clashes] == [U1]


def test_with_sets_keeps_every_other_field() -> None:
    """with_sets() names each field itself (faster than dataclasses.replace): one added to
    Matrix and not to it would be dropped here."""
    m = Matrix(U1, fs(1), fs(2), fs(3), name="guest1", autostart=True)
    assert {f.name for f in fields(Matrix)} == {
        "uuid", "adapters", "domains", "control_domains", "name", "autostart"
    }  # fmt: skip
    assert m.with_sets(fs(5), None, fs()) == replace(m, adapters=fs(5), control_domains=fs())
    assert m.with_sets() == m
