"""Fuzzing the bus API: hypothesis draws long sequences of method calls with valid, edge and
invalid arguments and sends them to the daemon over the private system bus, as root (so
every call reaches the daemon's own code, not the bus policy).

Arguments: ids 0..255 and beyond (256, 2^32-1), arrays of up to 200,000 ids, UUIDs valid,
upper-case, empty and malformed, names of matrices, unknown option keys and wrong variant
types, matrix paths that were just removed, raw messages whose signature fits no method.

After every call:
- the daemon answers ``Peer.Ping``;
- a failure is one of our named errors ``org.apmatrix.Apmatrix1.Error.*``, never ``Failed``
  (an exception inside the daemon); the bus library's own errors are accepted only where the
  library decides: ``UnknownMethod`` for a signature that fits no method or a path with no
  object, ``PropertyReadOnly``/``UnknownProperty``/``InvalidArgs`` for Properties calls;
- oracles that need no model: an id above 255 is never accepted, an unknown option key or a
  wrong variant type is InvalidArgument, a malformed UUID never creates anything;
- every rule of :func:`relrig.violations` holds: no APQN with two owners, none in a matrix
  and in the host pool, the registry (GetManagedObjects) equal to the kernel (the emulator
  read through FUSE) and the state directory equal to the registry.

CI: 16 sequences of 20-30 calls. Long mode (``APMATRIXD_LONG=1`` or ``--long``): 100,000
calls; the figures are printed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client
from dbus_fast import Message, MessageType, Variant
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from relrig import OURS, SimFactory, check_all, long_mode, path_of, registry

LONG_CALLS = 100_000
CI_EXAMPLES = 10
PER_EXAMPLE = (20, 30)
MAX_MATRICES = 8

FIXED_UUIDS = [
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "33333333-3333-4333-8333-333333333333",
    "AAAAAAAA-AAAA-4AAA-8AAA-AAAAAAAAAAAA",  # upper case: accepted, stored lower case
]
BAD_UUIDS = [
    "",
    "not-a-uuid",
    "11111111111141118111111111111111",  # no dashes
    "{11111111-1111-4111-8111-111111111111}",
    "11111111-1111-4111-8111-11111111111",
    "11111111-1111-4111-8111-111111111111\n",
    "zzzzzzzz-1111-4111-8111-111111111111",
    "ü" * 40,
    "a" * 100_000,
    "guest1",  # a name, not a UUID
    " ",
]
ADAPTERS = [5, 6]
DOMAINS = [4, 0x47, 0xAB, 0xFF]
EDGE_IDS = [0, 255, 256, 2**31, 2**32 - 1, 7, 63, 64]
HUGE = 200_000
STD = "org.freedesktop.DBus.Error."

# -- strategies ------------------------------------------------------------------------------------
ids = st.one_of(
    st.sampled_from(ADAPTERS + DOMAINS),
    st.sampled_from(EDGE_IDS),
    st.integers(0, 2**32 - 1),
)
# mostly ids of the host (so calls get far: conflicts, busy, kernel writes), some edges
id_list = st.one_of(
    st.lists(st.sampled_from(ADAPTERS), max_size=2),
    st.lists(st.sampled_from(DOMAINS), max_size=3),
    st.lists(st.sampled_from(ADAPTERS), max_size=2),
    st.lists(st.sampled_from(DOMAINS), max_size=3),
    st.lists(ids, max_size=6),
    st.integers(0, 30).map(
        lambda n: "huge-valid"
        if n == 0
        else "huge-dups"
        if n == 1
        else "huge-bad"
        if n == 2
        else []
    ),  # built at call time: 200,000 ids
)
uuid_arg = st.one_of(
    st.just(""),
    st.sampled_from(FIXED_UUIDS),
    st.sampled_from(FIXED_UUIDS),
    st.sampled_from(BAD_UUIDS),
    st.just("<existing>"),
    st.just("<removed>"),
    st.text(alphabet=st.characters(exclude_characters="\x00", codec="utf-8"), max_size=40),
)
names = st.one_of(
    st.sampled_from(["", "guest1", "guest2", "x" * 255, "x" * 256, "two\nlines", "ünï"]),
    st.text(alphabet=st.characters(exclude_characters="\x00", codec="utf-8"), max_size=20),
)
KNOWN_OPTIONS = {
    "adapters": id_list,
    "domains": id_list,
    "control_domains": id_list,
    "name": names,
    "autostart": st.booleans(),
    "start": st.booleans(),
    "control_usage_domains": st.booleans(),
}
OPTION_SIG = {
    "adapters": "au",
    "domains": "au",
    "control_domains": "au",
    "name": "s",
    "autostart": "b",
    "start": "b",
    "control_usage_domains": "b",
}
WRONG_VARIANTS = [
    Variant("as", ["5"]),
    Variant("ai", [5]),
    Variant("ay", b"\x05"),
    Variant("s", "5"),
    Variant("u", 5),
    Variant("b", True),
    Variant("v", Variant("au", [5])),
    Variant("a{sv}", {}),
    Variant("(uu)", [5, 4]),
]


@st.composite
def options(draw: st.DrawFn) -> dict[str, Any]:
    keys = [k for k in ("adapters", "domains") if draw(st.integers(0, 9)) < 8]
    keys += draw(st.lists(st.sampled_from(sorted(KNOWN_OPTIONS)), unique=True, max_size=3))
    out: dict[str, Any] = {k: ("ok", draw(KNOWN_OPTIONS[k])) for k in keys}
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from(sorted(KNOWN_OPTIONS)))
        var = draw(st.sampled_from([w for w in WRONG_VARIANTS if w.signature != OPTION_SIG[key]]))
        out[key] = ("wrong", var)
    if draw(st.integers(0, 7)) == 0:
        key = draw(st.sampled_from(["colour", "", "ADAPTERS", "adapter", "x" * 300]))
        out[key] = ("unknown", Variant("au", [5]))
    return out


MATRIX_CALLS = {
    "AssignAdapter": "u",
    "UnassignAdapter": "u",
    "AssignDomain": "u",
    "UnassignDomain": "u",
    "AssignControlDomain": "u",
    "UnassignControlDomain": "u",
    "Update": "auauau",
    "Start": "",
    "Stop": "",
    "Remove": "",
}
MANAGER_CALLS = {
    "CreateMatrix": "sa{sv}",
    "Check": "auaus",
    "Reserve": "auau",
    "Release": "auau",
    "ImportMdevctl": "s",
    "ExportMdevctl": "s",
}
WRONG_SIGS = [
    "",
    "s",
    "u",
    "au",
    "ai",
    "as",
    "auau",
    "auauau",
    "sa{sv}",
    "a{sv}",
    "v",
    "uu",
    "b",
    "x",
]


@st.composite
def op(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(
        st.sampled_from(
            ["create"] * 6
            + ["matrix"] * 8
            + ["check", "reserve", "reserve", "release", "raw", "raw", "prop", "mdevctl"]
        )
    )
    if kind == "create":
        return ("create", draw(uuid_arg), draw(options()))
    if kind == "check":
        return ("check", draw(id_list), draw(id_list), draw(uuid_arg))
    if kind in ("reserve", "release"):
        return (kind, draw(id_list), draw(id_list))
    if kind == "matrix":
        member = draw(st.sampled_from(sorted(MATRIX_CALLS)))
        target = draw(st.sampled_from(["existing", "existing", "existing", "removed", "bogus"]))
        args = (
            (draw(ids),)
            if MATRIX_CALLS[member] == "u"
            else (draw(id_list), draw(id_list), draw(id_list))
        )
        return ("matrix", member, target, draw(st.integers(0, 1000)), args)
    if kind == "raw":
        iface, calls = draw(st.sampled_from([(MANAGER, MANAGER_CALLS), (MATRIX, MATRIX_CALLS)]))
        member = draw(st.sampled_from(sorted(calls)))
        sig = draw(st.sampled_from([s for s in WRONG_SIGS if s != calls[member]]))
        return ("raw", iface, member, sig, draw(st.integers(0, 1000)))
    if kind == "prop":
        return ("prop", draw(st.sampled_from(["Get", "GetAll", "Set"])), draw(st.integers(0, 1000)))
    return (
        "mdevctl",
        draw(st.sampled_from(["ImportMdevctl", "ExportMdevctl"])),
        draw(st.sampled_from(["tmp", "missing", "relative", "", "file"])),
    )


# -- materialising and judging ---------------------------------------------------------------
def build_ids(spec: Any) -> list[int]:
    if spec == "huge-valid":
        return [i % 256 for i in range(HUGE)]
    if spec == "huge-dups":
        return [5] * HUGE
    if spec == "huge-bad":
        return list(range(HUGE))
    return list(spec)


def has_bad_id(*specs: Any) -> bool:
    return any(i > 255 for s in specs for i in build_ids(s))


def body_for(sig: str) -> list[Any]:
    return {
        "": [],
        "s": ["x"],
        "u": [5],
        "au": [[5]],
        "ai": [[5]],
        "as": [["5"]],
        "auau": [[5], [4]],
        "auauau": [[5], [4], [4]],
        "sa{sv}": ["", {}],
        "a{sv}": [{"adapters": Variant("au", [5])}],
        "v": [Variant("u", 5)],
        "uu": [5, 4],
        "b": [True],
        "x": [-1],
    }[sig]


@dataclass
class Fuzzer:
    c: Client
    sim: Any
    tmp: Path
    removed: list[str] = field(default_factory=list)
    calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    violations: int = 0
    slowest: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)

    def uuid(self, choice: str) -> str:
        if choice == "<existing>":
            existing = sorted(self.last.get("matrices", {}))
            return existing[0] if existing else ""
        if choice == "<removed>":
            return self.removed[-1] if self.removed else FIXED_UUIDS[0]
        return choice

    def target(self, which: str, n: int) -> str:
        existing = sorted(self.last.get("matrices", {}))
        if which == "existing" and existing:
            return path_of(existing[n % len(existing)])
        if which in ("existing", "removed") and self.removed:
            return path_of(self.removed[n % len(self.removed)])
        return f"{ROOT}/matrices/bogus_{n}"

    def dir(self, which: str) -> str:
        return {
            "tmp": str(self.tmp / "mdevctl"),
            "missing": str(self.tmp / "missing"),
            "relative": "etc/mdevctl.d",
            "": "",
            "file": str(self.tmp / "a-file"),
        }[which]

    async def send(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> Message:
        t0 = time.monotonic()
        reply = await self.c.call(path, iface, member, sig, body)
        self.slowest = max(self.slowest, time.monotonic() - t0)
        self.calls += 1
        if reply.message_type == MessageType.ERROR:
            self.errors[str(reply.error_name).rsplit(".", 1)[-1]] += 1
        else:
            self.ok[member] += 1
        return reply

    async def run(self, o: tuple[Any, ...]) -> None:
        kind = o[0]
        allowed = set(OURS)
        must_fail = False
        want: str | None = None
        path, iface = ROOT, MANAGER
        if kind == "create":
            _, uuid_choice, opts = o
            uuid = self.uuid(uuid_choice)
            body_opts = {}
            for k, (how, val) in opts.items():
                body_opts[k] = (
                    val
                    if how != "ok"
                    else Variant(OPTION_SIG[k], build_ids(val) if OPTION_SIG[k] == "au" else val)
                )
            hows = {how for how, _ in opts.values()}
            if hows & {"wrong", "unknown"}:
                want = ERR_INVALID
            member, sig, body = "CreateMatrix", "sa{sv}", [uuid, body_opts]
            must_fail = has_bad_id(
                *(v for k, (h, v) in opts.items() if h == "ok" and OPTION_SIG[k] == "au")
            )
            must_fail = must_fail or (bool(uuid) and not _is_uuid(uuid))
        elif kind == "check":
            _, a, d, uuid_choice = o
            member, sig, body = (
                "Check",
                "auaus",
                [build_ids(a), build_ids(d), self.uuid(uuid_choice)],
            )
            must_fail = has_bad_id(a, d)
        elif kind in ("reserve", "release"):
            _, a, d = o
            member, sig, body = kind.capitalize(), "auau", [build_ids(a), build_ids(d)]
            must_fail = has_bad_id(a, d)
        elif kind == "matrix":
            _, member, which, n, args = o
            path, iface, sig = self.target(which, n), MATRIX, MATRIX_CALLS[member]
            body = [build_ids(x) for x in args] if sig == "auauau" else list(args) if sig else []
            must_fail = has_bad_id(*args) if sig == "auauau" else bool(sig) and args[0] > 255
            allowed.add(STD + "UnknownMethod")  # a path with no object (just removed)
        elif kind == "raw":
            _, iface, member, sig, n = o
            existing = sorted(self.last.get("matrices", {}))
            path = (
                ROOT
                if iface == MANAGER
                else self.target("existing", n)
                if existing
                else f"{ROOT}/matrices/x"
            )
            body = body_for(sig)
            allowed = {STD + "UnknownMethod", STD + "InvalidArgs"}
            must_fail = True
        elif kind == "prop":
            _, member, n = o
            existing = sorted(self.last.get("matrices", {}))
            path = path_of(existing[n % len(existing)]) if existing and n % 2 else ROOT
            target_iface = MATRIX if path != ROOT else MANAGER
            iface = "org.freedesktop.DBus.Properties"
            prop = ["Uuid", "State", "Version", "HostAdapters", "Nope"][n % 5]
            if member == "Get":
                sig, body = "ss", [target_iface, prop]
            elif member == "GetAll":
                sig, body = "s", [[target_iface, "org.nope", ""][n % 3]]
            else:
                sig, body = "ssv", [target_iface, prop, Variant("s", "x")]
                must_fail = True
            allowed = {
                STD + "UnknownProperty",
                STD + "PropertyReadOnly",
                STD + "InvalidArgs",
                STD + "UnknownMethod",
                STD + "UnknownInterface",
                STD + "NotSupported",  # dbus-fast: GetAll("") (all interfaces) is not supported
            }
        else:
            _, member, which = o
            sig, body = "s", [self.dir(which)]
        reply = await self.send(path, iface, member, sig, body)
        label = f"{member}{sig and '(' + sig + ')'} at {path}"
        if reply.message_type == MessageType.ERROR:
            assert reply.error_name in allowed, (label, reply.error_name, reply.body)
            if want is not None:
                assert reply.error_name == want, (label, reply.error_name, reply.body)
        else:
            assert reply.message_type == MessageType.METHOD_RETURN
            assert not must_fail, (label, "accepted", str(body)[:300])
            assert want is None, (label, "accepted", str(body)[:300])
            if member == "Remove":
                self.removed.append(path.rsplit("/", 1)[1].replace("_", "-"))
        problems, self.last = await check_all(self.c, self.sim)
        if problems:
            self.violations += len(problems)
        assert problems == [], (label, str(body)[:300], problems)


ERR_INVALID = "org.apmatrix.Apmatrix1.Error.InvalidArgument"


def _is_uuid(text: str) -> bool:
    from apmatrixd.core.matrix import normalize_uuid

    try:
        normalize_uuid(text)
    except Exception:
        return False
    return True


def test_fuzz_bus_api(sim: SimFactory, tmp_path: Path) -> None:
    s = sim()
    (tmp_path / "mdevctl").mkdir()
    (tmp_path / "a-file").write_text("")
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(Client.connect(s.address))
    fz = Fuzzer(c, s, tmp_path)
    # a start that lets the fuzzer reach the interesting places: half the host reserved
    loop.run_until_complete(c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]]))
    fz.last = loop.run_until_complete(registry(c))
    n = PER_EXAMPLE[1] + PER_EXAMPLE[0]
    examples = LONG_CALLS * 2 // n + 1 if long_mode() else CI_EXAMPLES

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # the daemon keeps its state between sequences: no shrinking
        suppress_health_check=list(HealthCheck),
        derandomize=not long_mode() and not os.environ.get("APMATRIXD_FUZZ_RANDOM"),
    )
    @given(ops=st.lists(op(), min_size=PER_EXAMPLE[0], max_size=PER_EXAMPLE[1]))
    def sequence(ops: list[tuple[Any, ...]]) -> None:
        # keep the host small: every check reads each mdev through FUSE, and a long run
        # would otherwise slow down with every matrix the fuzzer leaves behind
        for _ in range(len(fz.last.get("matrices", {})) - MAX_MATRICES):
            loop.run_until_complete(fz.run(("matrix", "Remove", "existing", 0, ())))
        for o in ops:
            if long_mode() and fz.calls >= LONG_CALLS:
                return
            loop.run_until_complete(fz.run(o))

    t0 = time.monotonic()
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        sequence()
    finally:
        c.close()
        loop.close()
    took = time.monotonic() - t0
    prof.disable()
    import pstats

    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    assert s.alive()
    print(
        f"\nfuzz: {fz.calls} calls in {took:.0f} s, slowest {fz.slowest * 1000:.0f} ms, "
        f"violations {fz.violations}; accepted {sum(fz.ok.values())} {dict(fz.ok)}; "
        f"refused {sum(fz.errors.values())} {dict(fz.errors)}"
    )
    assert fz.calls >= (LONG_CALLS if long_mode() else CI_EXAMPLES * PER_EXAMPLE[0])
    assert sum(fz.ok.values()) > fz.calls // 20  # the fuzzer really changed things
    assert fz.ok["CreateMatrix"] and fz.ok["Remove"]
    ours = {"Conflict", "HostOwned", "InvalidArgument", "NotFound", "AlreadyExists", "Busy"}
    assert len(ours & set(fz.errors)) >= 3, fz.errors  # the refusals were of many kinds
