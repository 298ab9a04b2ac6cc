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

CI: 10 sequences of 20-30 calls. Long mode (``APMATRIXD_LONG=1`` or ``--long``): 100,000
calls (``APMATRIXD_LONG_CALLS=N`` for another number) in sequences of 100-200, and the figures
README quotes are printed: calls by method, refusals by error, checks run, violations, wall
and CPU time, calls/s of each 1,000 (a run that slows down shows there) and where time went.

Made cheap, not weaker: strategies are built once (not at every draw), long mode draws long
sequences (hypothesis' cost is per example as much as per call), the host keeps at most
``MAX_MATRICES`` matrices (each is read through FUSE and listed by GetManagedObjects at every
check), and :func:`relrig.check_all` pipelines its bus calls and reads the kernel through
descriptors kept open (``test_kept_descriptors_read_fresh``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busrig import MANAGER, MATRIX, ROOT, Client
from dbus_fast import Message, MessageType, Variant
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from relrig import MATRIX_DIR, OURS, Sim, SimFactory, check_all, long_mode, path_of, registry

LONG_CALLS = int(os.environ.get("APMATRIXD_LONG_CALLS", "100000"))
"""Calls of a long run; ``APMATRIXD_LONG_CALLS=5000`` for a quick measure of its speed."""
CI_EXAMPLES = 10
PER_EXAMPLE = (20, 30)
LONG_PER_EXAMPLE = (100, 200)
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


# Strategies are built once, here: one made inside a draw is validated anew at every draw, which
# cost more than the call it drew.
D10, D6, D8 = st.integers(0, 9), st.integers(0, 5), st.integers(0, 7)
EXTRA_KEYS = st.lists(st.sampled_from(sorted(KNOWN_OPTIONS)), unique=True, max_size=3)
ANY_KEY = st.sampled_from(sorted(KNOWN_OPTIONS))
WRONG_FOR = {
    k: st.sampled_from([w for w in WRONG_VARIANTS if w.signature != sig])
    for k, sig in OPTION_SIG.items()
}
UNKNOWN_KEY = st.sampled_from(["colour", "", "ADAPTERS", "adapter", "x" * 300])


@st.composite
def options(draw: st.DrawFn) -> dict[str, Any]:
    keys = [k for k in ("adapters", "domains") if draw(D10) < 8]
    keys += draw(EXTRA_KEYS)
    out: dict[str, Any] = {k: ("ok", draw(KNOWN_OPTIONS[k])) for k in keys}
    if draw(D6) == 0:
        key = draw(ANY_KEY)
        out[key] = ("wrong", draw(WRONG_FOR[key]))
    if draw(D8) == 0:
        out[draw(UNKNOWN_KEY)] = ("unknown", Variant("au", [5]))
    return out


OPTIONS = options()
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
    "TakeOver": "",
}
MANAGER_CALLS = {
    "CreateMatrix": "sa{sv}",
    "Check": "auaus",
    "Reserve": "auau",
    "Release": "auau",
    "ImportMdevctl": "s",
    "ExportMdevctl": "s",
    "ProposeMdevctl": "ssauauaua{sv}",
    "ReloadMdevctl": "",
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


KIND = st.sampled_from(
    ["create"] * 6
    + ["matrix"] * 8
    + ["check", "reserve", "reserve", "release", "raw", "raw", "prop", "mdevctl"]
)
MATRIX_MEMBER = st.sampled_from(sorted(MATRIX_CALLS))
TARGET = st.sampled_from(["existing", "existing", "existing", "removed", "bogus"])
N = st.integers(0, 1000)
RAW = st.sampled_from(
    [
        (iface, member, st.sampled_from([s for s in WRONG_SIGS if s != sig]))
        for iface, calls in ((MANAGER, MANAGER_CALLS), (MATRIX, MATRIX_CALLS))
        for member, sig in sorted(calls.items())
    ]
)
PROP_MEMBER = st.sampled_from(["Get", "GetAll", "Set"])
MDEVCTL = st.sampled_from(["ImportMdevctl", "ExportMdevctl"])
MDEVCTL_DIR = st.sampled_from(["tmp", "missing", "relative", "", "file"])


@st.composite
def op(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(KIND)
    if kind == "create":
        return ("create", draw(uuid_arg), draw(OPTIONS))
    if kind == "check":
        return ("check", draw(id_list), draw(id_list), draw(uuid_arg))
    if kind in ("reserve", "release"):
        return (kind, draw(id_list), draw(id_list))
    if kind == "matrix":
        member = draw(MATRIX_MEMBER)
        target = draw(TARGET)
        args = (
            (draw(ids),)
            if MATRIX_CALLS[member] == "u"
            else (draw(id_list), draw(id_list), draw(id_list))
        )
        return ("matrix", member, target, draw(N), args)
    if kind == "raw":
        iface, member, sigs = draw(RAW)
        return ("raw", iface, member, draw(sigs), draw(N))
    if kind == "prop":
        return ("prop", draw(PROP_MEMBER), draw(N))
    return ("mdevctl", draw(MDEVCTL), draw(MDEVCTL_DIR))


OP = op()


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
    by_method: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    violations: int = 0
    spent: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    marks: list[float] = field(default_factory=list)
    """The clock at every 1,000th call: a run that slows down as it goes shows here."""
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
        took = time.monotonic() - t0
        self.slowest = max(self.slowest, took)
        self.spent["the calls themselves"] += took
        self.calls += 1
        self.by_method[member] += 1
        if self.calls % 1000 == 0:
            self.marks.append(time.monotonic())
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
        problems, self.last = await check_all(self.c, self.sim, self.spent)
        self.checks += 1
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
    long = long_mode()
    low, high = LONG_PER_EXAMPLE if long else PER_EXAMPLE

    def hypothesis_run(examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # the daemon keeps its state between sequences: no shrinking
            suppress_health_check=list(HealthCheck),
            derandomize=not long and not os.environ.get("APMATRIXD_FUZZ_RANDOM"),
        )
        @given(ops=st.lists(OP, min_size=low, max_size=high))
        def sequence(ops: list[tuple[Any, ...]]) -> None:
            for o in ops:
                if long and fz.calls >= LONG_CALLS:
                    return
                # keep the host small: every check reads each mdev through FUSE and every
                # matrix in GetManagedObjects; a long run would slow down with each matrix it
                # leaves behind (the Remove is a call like any other, checked after)
                if len(fz.last.get("matrices", {})) > MAX_MATRICES:
                    loop.run_until_complete(fz.run(("matrix", "Remove", "existing", 0, ())))
                loop.run_until_complete(fz.run(o))

        sequence()

    t0, cpu0 = time.monotonic(), (cpu_seconds(os.getpid()), cpu_seconds(s.daemon.proc.pid))
    fz.marks.append(t0)
    try:
        if long:  # long sequences: hypothesis' cost is per example as much as per draw
            while fz.calls < LONG_CALLS:  # runs of 50 examples: each engine's memory is bounded
                hypothesis_run(min(50, (LONG_CALLS - fz.calls) // ((low + high) // 2) + 1))
        else:
            hypothesis_run(CI_EXAMPLES)
    finally:
        c.close()
        loop.close()
    took = time.monotonic() - t0
    s.drain_notify()
    assert s.alive()
    cpu = (cpu_seconds(os.getpid()) - cpu0[0], cpu_seconds(s.daemon.proc.pid) - cpu0[1])
    print(report(fz, took, cpu))
    assert fz.checks == fz.calls  # every call was followed by every check
    assert fz.calls >= (LONG_CALLS if long else CI_EXAMPLES * PER_EXAMPLE[0])
    assert sum(fz.ok.values()) > fz.calls // 20  # the fuzzer really changed things
    assert fz.ok["CreateMatrix"] and fz.ok["Remove"]
    ours = {"Conflict", "HostOwned", "InvalidArgument", "NotFound", "AlreadyExists", "Busy"}
    assert len(ours & set(fz.errors)) >= 3, fz.errors  # the refusals were of many kinds


def windows(marks: list[float]) -> str:
    rates = [1000 / (b - a) for a, b in itertools.pairwise(marks)]
    if not rates:
        return "(under 1,000 calls)"
    tenth = max(1, len(rates) // 10)
    return (
        f"first {rates[0]:.0f}, last {rates[-1]:.0f}, slowest {min(rates):.0f}; by tenths "
        + " ".join(
            f"{sum(r) / len(r):.0f}"
            for r in (rates[i : i + tenth] for i in range(0, len(rates), tenth))
        )
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: what a run costs whatever else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(fz: Fuzzer, took: float, cpu: tuple[float, float]) -> str:
    """The figures of a run, as README's Reliability section quotes them."""

    def counts(c: Counter[str]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in c.most_common())

    checked = sum(fz.spent.values())
    spent = dict(fz.spent, **{"drawing (hypothesis) and the rest": max(0.0, took - checked)})
    return "\n".join(
        [
            "",
            f"fuzz: {fz.calls:,} calls in {took:.0f} s ({fz.calls / took:.0f} calls/s), "
            f"slowest call {fz.slowest * 1000:.0f} ms",
            f"  checks after every call (Ping, one owner per APQN, none in the host pool, "
            f"registry = kernel = state directory): {fz.checks:,}; violations: {fz.violations}",
            "  kills: 0, faults injected: 0 (see test_kill_anywhere.py and test_faults.py)",
            f"  calls by method: {counts(fz.by_method)}",
            f"  accepted {sum(fz.ok.values()):,}: {counts(fz.ok)}",
            f"  refused {sum(fz.errors.values()):,}: {counts(fz.errors)}",
            f"  calls/s of each 1,000: {windows(fz.marks)}",
            f"  kernel reads through FUSE: {fz.sim.fuse_ops:,} "
            f"({fz.sim.fuse_ops / max(fz.checks, 1):.1f} a check), "
            f"matrices at the end: {len(fz.last.get('matrices', {}))}",
            f"  CPU: test process {cpu[0]:.0f} s, daemon {cpu[1]:.0f} s "
            f"({(cpu[0] + cpu[1]) / max(fz.calls, 1) * 1000:.1f} ms a call); largest memory: "
            f"test process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB",
            "  time: "
            + ", ".join(
                f"{k} {v:.0f} s ({v / took:.0%})"
                for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
            ),
        ]
    )


def test_kept_descriptors_read_fresh(sim: SimFactory) -> None:
    """The checks read the kernel through descriptors kept open (one FUSE read each instead of
    five operations); they must still see every change: a domain assigned by hand, an mdev
    removed, and one removed and made again under the same UUID with other APQNs between two
    checks. Each read equals one by a reader that keeps nothing open."""
    s = sim()
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(Client.connect(s.address))
    loop.run_until_complete(c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]]))
    c.close()
    loop.close()
    uuid, create = FIXED_UUIDS[0], f"{MATRIX_DIR}/mdev_supported_types/vfio_ap-passthrough/create"

    def fresh() -> dict[str, Any]:
        other = Sim(s.daemon, s.mnt, s.state)
        try:
            return other.kernel()
        finally:
            other.close()

    def make(adapter: int, domain: int) -> None:
        s.write(create, uuid)
        s.write(f"{MATRIX_DIR}/{uuid}/assign_adapter", hex(adapter))
        s.write(f"{MATRIX_DIR}/{uuid}/assign_domain", hex(domain))

    def look() -> dict[str, Any]:
        kept = s.kernel()
        assert kept == fresh()
        return kept

    look()
    make(5, 4)
    assert look()["mdevs"][uuid][:2] == ({5}, {4})
    s.write(f"{MATRIX_DIR}/{uuid}/assign_domain", "0x47")
    assert look()["mdevs"][uuid][:2] == ({5}, {4, 0x47})
    s.write(f"{MATRIX_DIR}/{uuid}/remove", "1")
    make(6, 0x47)  # no check in between: the descriptors of the old mdev are still open
    assert look()["mdevs"][uuid][:2] == ({6}, {0x47})
    s.write(f"{MATRIX_DIR}/{uuid}/remove", "1")
    assert uuid not in look()["mdevs"]
