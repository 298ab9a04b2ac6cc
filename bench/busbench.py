"""Benchmarks through the daemon on a private bus (``--simulate``, the in-process emulator):
AssignAdapter vs Peer.Ping and a durable write, Check at 10 / 1,000 / 10,000 matrices,
start-up vs the reads it must make, resident memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from busrig import MANAGER, NAME, ROOT, Daemon, PrivateBus, apmatrixd_argv
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from apmatrixd.journal import Journal
from bench.common import REPO, Row, Stats, now, say, show
from bench.hosts import big_state

PEER = "org.freedesktop.DBus.Peer"
MATRIX_IFACE = "org.apmatrix.Apmatrix1.Matrix"
G1 = "11111111-1111-4111-8111-111111111111"
P1 = f"{ROOT}/matrices/{G1.replace('-', '_')}"


# -- processes timed to READY=1 ------------------------------------------------------------
def spawn_ready(
    argv: list[str], address: str | None = None, timeout: float = 300
) -> tuple[Daemon, float]:
    """Start ``argv`` as systemd would (NOTIFY_SOCKET) and time it to READY=1."""
    d, t0 = spawn(argv, address)
    return d, ready(d, t0, timeout)


def spawn(argv: list[str], address: str | None = None) -> tuple[Daemon, float]:
    """Start ``argv`` as systemd would (NOTIFY_SOCKET); the Daemon and its start time."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    name = f"apmatrixd-bench-{uuidlib.uuid4().hex}"
    sock.bind("\0" + name)
    env = dict(os.environ, NOTIFY_SOCKET="@" + name)
    env.pop("JOURNAL_STREAM", None)
    if address:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = address
    err = Path(tempfile.mkstemp(prefix="apmatrixd-bench-", suffix=".log")[1])
    with open(err, "wb") as f:
        t0 = now()
        proc = subprocess.Popen(argv, env=env, stderr=f, stdout=subprocess.PIPE, cwd=REPO)
    return Daemon(proc, sock, address or "", err), t0


def ready(d: Daemon, t0: float, timeout: float = 300) -> float:
    """Seconds from ``t0`` to the daemon's READY=1 (it is killed if there is none)."""
    if d.wait_for("READY=1", timeout) is None:
        d.proc.kill()
        d.proc.wait()
        raise RuntimeError(f"no READY=1 (rc={d.proc.returncode}): {d.stderr()[-2000:]}")
    return now() - t0


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def stop(d: Daemon) -> None:
    d.terminate()
    d.close()


# -- a client -------------------------------------------------------------------------------
async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address).connect()


def msg(
    path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None
) -> Message:
    return Message(
        destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body or []
    )


async def ok(bus: MessageBus, m: Message) -> list[Any]:
    reply = await asyncio.wait_for(bus.call(m), 120)  # a dead daemon must not hang the bench
    assert reply is not None
    if reply.message_type != MessageType.METHOD_RETURN:
        raise RuntimeError(f"{m.member}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def settled(bus: MessageBus, timeout: float = 60) -> None:
    """Wait until the daemon has handled the uevents of a change (Settling false twice)."""
    get = msg(ROOT, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER, "Settling"])
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        (value,) = await ok(bus, get)
        quiet = 0 if value.value else quiet + 1


async def timed(bus: MessageBus, m: Message) -> float:
    t = now()
    await ok(bus, m)
    return now() - t


# -- 1. AssignAdapter vs Ping ----------------------------------------------------------------
def durable_write(where: Path) -> float:
    """The floor of a durable change: one small file written as store.py writes one (temp
    file, write, fsync, rename, fsync of the directory), in the daemon's state directory."""
    data = b'{"format": "apmatrixd-bench-floor"}\n' * 8  # about a matrix file's size
    target = where / "bench-floor.json"
    tmp = where / ".bench-floor.json.tmp"
    t = now()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)
    dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return now() - t


async def _files_written(state_dir: Path, most: float = 1.0) -> None:
    """Until the daemon's journal holds no intent (the files of its changes are written)."""
    end = now() + most
    while Journal(state_dir).read() and now() < end:
        await asyncio.sleep(0.001)


async def _roundtrip(
    address: str, reps: int, burst_reps: int, state_dir: Path
) -> dict[str, list[float]]:
    bus = await connect(address)
    await ok(bus, msg(ROOT, MANAGER, "Reserve", "auau", [list(range(128)), []]))
    await settled(bus)  # the Reserve's uevents (a queue each) must not land in the samples
    opts = {"adapters": Variant("au", [0]), "domains": Variant("au", [0])}
    await ok(bus, msg(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts]))
    out: dict[str, list[float]] = {k: [] for k in ("ping", "assign", "unassign")}
    out |= {"ping100": [], "assign100": [], "unassign100": []}
    for _ in range(20):  # warm-up
        await timed(bus, msg(ROOT, PEER, "Ping"))
    out["durable"] = []
    for i in range(reps):  # interleaved, so both sides see the same machine
        a = 1 + i % 100
        # The last change's files are written just after its answer (journal.py): the floor
        # waits for them, so that it does not share the disk with the daemon's own writes.
        await _files_written(state_dir)
        out["durable"].append(durable_write(state_dir))
        out["ping"].append(await timed(bus, msg(ROOT, PEER, "Ping")))
        out["assign"].append(await timed(bus, msg(P1, MATRIX_IFACE, "AssignAdapter", "u", [a])))
        out["unassign"].append(await timed(bus, msg(P1, MATRIX_IFACE, "UnassignAdapter", "u", [a])))

    async def burst(make: Any) -> float:
        t = now()
        await asyncio.gather(*(ok(bus, make(a)) for a in range(1, 101)))
        return now() - t

    # 100 in flight: the uevents of a burst's changes (a queue each) must not land in the
    # next burst's samples, nor in the Pings'.

    for _ in range(burst_reps):
        out["ping100"].append(await burst(lambda a: msg(ROOT, PEER, "Ping")))
        out["assign100"].append(
            await burst(lambda a: msg(P1, MATRIX_IFACE, "AssignAdapter", "u", [a]))
        )
        out["unassign100"].append(
            await burst(lambda a: msg(P1, MATRIX_IFACE, "UnassignAdapter", "u", [a]))
        )
        await settled(bus, 30)
    bus.disconnect()
    return out


def roundtrip(address: str, quick: bool, state_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """AssignAdapter / UnassignAdapter on a live matrix of the big host, every change durable
    (``--state-dir``), against Peer.Ping answered by the same daemon."""
    # 1,000 interleaved single calls give a stable median and a p99 of 10 samples; 20 bursts
    # of 100 (2,000 calls) a stable median per call (their p99 is the slowest burst).
    reps, burst_reps = (50, 5) if quick else (1000, 20)
    say(f"== AssignAdapter vs Peer.Ping (state dir {state_dir}, {reps} + {burst_reps}x100)")
    d, _ = spawn_ready(
        [*apmatrixd_argv(), "--simulate", "big", "--state-dir", str(state_dir),
         "--rescan-interval", "0", "--bus-address", address]
    )  # fmt: skip
    try:
        raw = asyncio.run(_roundtrip(address, reps, burst_reps, state_dir))
    finally:
        stop(d)
    st = {k: Stats.of(v) for k, v in raw.items()}
    for k, s in st.items():
        show(k, s)
    return roundtrip_rows(st), {k: s.__dict__ for k, s in st.items()}


SLACK = 0.3e-3  # what a change may add to Ping and the durable write (the goal)


def roundtrip_rows(st: dict[str, Stats]) -> list[Row]:
    """The floors as rows of their own, then the calls against them."""
    ping, durable = st["ping"], st["durable"]
    rows = [
        Row(
            "floor: Peer.Ping round trip, one client",
            f"{ping.median * 1e3:.3f} ms (p99 {ping.p99 * 1e3:.3f})",
            "(a floor)", None, "-", None, raw={"ours": ping.__dict__},
        ),
        Row(
            "floor: Peer.Ping, 100 calls in flight (per call)",
            f"{st['ping100'].median / 100 * 1e3:.4f} ms (p99 {st['ping100'].p99 / 100 * 1e3:.4f})",
            "(a floor)", None, "-", None, raw={"ours": st["ping100"].__dict__},
        ),
        Row(
            "floor: durable write of one small file in the state directory "
            "(write, fsync, rename, directory fsync)",
            f"{durable.median * 1e3:.3f} ms (p99 {durable.p99 * 1e3:.3f})",
            "(a floor)", None, "-", None, raw={"ours": durable.__dict__},
        ),
    ]  # fmt: skip
    floor = ping.median + durable.median
    for ours, label in (
        ("assign", "AssignAdapter round trip, one client (durable)"),
        ("unassign", "UnassignAdapter round trip, one client (durable)"),
    ):
        s = st[ours]
        rows.append(
            Row(
                label,
                f"{s.median * 1e3:.3f} ms (p99 {s.p99 * 1e3:.3f})",
                f"Ping + durable write {floor * 1e3:.3f} ms",
                s.median / floor,
                f"<= floor + 0.3 ms = {(floor + SLACK) * 1e3:.3f} ms",
                s.median <= floor + SLACK,
                raw={"ours": s.__dict__, "ping": ping.__dict__, "durable": durable.__dict__},
            )
        )
    a, p = st["assign100"], st["ping100"]
    r = a.median / p.median
    rows.append(
        Row(
            "AssignAdapter, 100 calls in flight (per call; group commit)",
            f"{a.median / 100 * 1e3:.3f} ms (slowest burst {a.p99 / 100 * 1e3:.3f})",
            f"Ping 100 in flight {p.median / 100 * 1e3:.4f} ms per call",
            r,
            "<= 4x",
            r <= 4,
            raw={"ours": a.__dict__, "floor": p.__dict__},
        )
    )
    return rows


# -- 1b. reads while a change waits on the kernel ---------------------------------------------
WAIT = 2.0


async def _reads_while_waiting(address: str, reps: int) -> dict[str, list[float]]:
    bus = await connect(address)
    other = await connect(address)
    await ok(bus, msg(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4]]))
    await settled(bus)
    out: dict[str, list[float]] = {"ping": [], "getall": [], "ping_wait": [], "getall_wait": []}

    def get_all() -> Message:  # the Manager's: there before, during and after the Remove
        return msg(ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER])

    opts = {"adapters": Variant("au", [5, 6]), "domains": Variant("au", [4])}
    for _ in range(reps):
        await ok(bus, msg(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts]))
        for _ in range(40):  # idle: nothing in flight
            out["ping"].append(await timed(other, msg(ROOT, PEER, "Ping")))
            out["getall"].append(await timed(other, get_all()))
        remove = asyncio.ensure_future(ok(bus, msg(P1, MATRIX_IFACE, "Remove")))
        await asyncio.sleep(0.05)
        while not remove.done():  # the Remove's write to `remove` blocks WAIT seconds
            out["ping_wait"].append(await timed(other, msg(ROOT, PEER, "Ping")))
            out["getall_wait"].append(await timed(other, get_all()))
        await remove
    bus.disconnect()
    other.disconnect()
    return out


def reads_while_waiting(address: str, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """Ping and GetAll from a second client while a Remove waits WAIT s on the kernel (the
    emulator's delay hook on the mdev's ``remove``), against the same reads with nothing in
    flight, interleaved per round."""
    reps = 2 if quick else 5
    say(f"== reads while a change waits {WAIT:.0f} s on the kernel ({reps} rounds)")
    remove = f"devices/vfio_ap/matrix/{G1}/remove:delay={WAIT}:{reps}"
    argv = [*apmatrixd_argv(), "--simulate", "--rescan-interval", "0", "--bus-address", address]
    os.environ["APMATRIXD_TEST_FAULTS"] = remove  # the emulator's delay hook (--simulate only)
    try:
        d, _ = spawn_ready(argv)
    finally:
        del os.environ["APMATRIXD_TEST_FAULTS"]
    try:
        raw = asyncio.run(_reads_while_waiting(address, reps))
    finally:
        stop(d)
    st = {k: Stats.of(v) for k, v in raw.items()}
    for k, s in st.items():
        show(k, s)
    rows = []
    for ours, floor, label in (
        ("ping_wait", "ping", "Ping while a change waits 2 s on the kernel"),
        ("getall_wait", "getall", "GetAll of the Manager while a change waits 2 s on the kernel"),
    ):
        r = st[ours].p99 / st[floor].p99
        rows.append(
            Row(
                label,
                f"p99 {st[ours].p99 * 1e3:.3f} ms (median {st[ours].median * 1e3:.3f}, "
                f"{st[ours].n} calls)",
                f"idle p99 {st[floor].p99 * 1e3:.3f} ms (median {st[floor].median * 1e3:.3f})",
                r,
                "p99 <= 2x idle p99",
                r <= 2.0,
                raw={"ours": st[ours].__dict__, "floor": st[floor].__dict__},
            )
        )
    return rows, {k: s.__dict__ for k, s in st.items()}


# -- 2. Check at 10 / 1,000 / 10,000 matrices ------------------------------------------------
CHECK_ADAPTERS = list(range(10))
CHECK_DOMAINS = [0, *range(50, 57)]  # 80 APQNs; 10 clashes at every size (matrices 0-9)


async def _check(addresses: dict[int, str], reps: int) -> dict[int, list[float]]:
    """The same Check against every daemon, interleaved round-robin (the order rotates), so
    the load of the machine falls on every size alike."""
    buses = {n: await connect(a) for n, a in addresses.items()}
    m = msg(ROOT, MANAGER, "Check", "auaus", [CHECK_ADAPTERS, CHECK_DOMAINS, ""])
    for n, bus in buses.items():
        (clashes,) = await ok(bus, m)
        assert len(clashes) == 10, (n, clashes)
        for _ in range(20):
            await timed(bus, m)
    out: dict[int, list[float]] = {n: [] for n in buses}
    order = sorted(buses)
    for i in range(reps):
        for n in order[i % len(order) :] + order[: i % len(order)]:
            out[n].append(await timed(buses[n], m))
    for bus in buses.values():
        bus.disconnect()
    return out


def check_services(states: dict[int, Path]) -> dict[int, Any]:
    """``Service`` loaded from each state directory, in this process (no bus)."""
    from apmatrixd.kernel import Kernel, TreeSysfs
    from apmatrixd.service import Service
    from apmatrixd.sim.model import Host
    from apmatrixd.store import Store

    out = {}
    for n, state in sorted(states.items()):
        service = Service(Kernel(TreeSysfs(Host.from_name("big"))), store=Store(state))
        service.load()
        assert len(service.check(CHECK_ADAPTERS, CHECK_DOMAINS)) == 10
        out[n] = service
    return out


def check_inprocess(services: dict[int, Any], reps: int) -> dict[int, list[float]]:
    """``Service.check_rows`` (what the Check method replies) of each size, interleaved
    round-robin as over the bus."""
    out: dict[int, list[float]] = {n: [] for n in services}
    order = sorted(services)
    for i in range(reps):
        for n in order[i % len(order) :] + order[: i % len(order)]:
            check = services[n].check_rows
            t = now()
            check(CHECK_ADAPTERS, CHECK_DOMAINS)
            out[n].append(now() - t)
    return out


def check_flat(
    quick: bool, work: Path, states: dict[int, Path]
) -> tuple[list[Row], dict[str, Any]]:
    """One daemon per size, side by side, each on its own private bus; the calls interleaved.
    The in-process services load while the daemons start (two CPUs; neither is timed)."""
    reps = 100 if quick else 2000
    say(
        f"== Check (10 x 8 APQNs, 10 clashes) at {sorted(states)} matrices, {reps} calls each, "
        "interleaved"
    )
    buses = {n: PrivateBus.start() for n in states}
    daemons: dict[int, Daemon] = {}
    loads: dict[int, float] = {}
    try:
        started = {}
        for n, state in sorted(states.items()):
            copy = work / f"check-{n}"
            shutil.copytree(state, copy)
            daemons[n], started[n] = spawn(
                [*apmatrixd_argv(), "--simulate", "big", "--state-dir", str(copy),
                 "--rescan-interval", "0", "--bus-address", buses[n].address]
            )  # fmt: skip
        services = check_services(states)
        for n, d in daemons.items():  # READY=1 is read only now: an upper bound, not a figure
            loads[n] = ready(d, started[n], timeout=600)
        raw_bus = asyncio.run(_check({n: b.address for n, b in buses.items()}, reps))
    finally:
        for d in daemons.values():
            stop(d)
        for b in buses.values():
            b.stop()
    raw_in = check_inprocess(services, reps)
    del services
    bus_st = {n: Stats.of(v) for n, v in raw_bus.items()}
    inproc = {n: Stats.of(v) for n, v in raw_in.items()}
    for n in sorted(states):
        show(f"Check over D-Bus, {n} matrices", bus_st[n])
        show(f"Service.check_rows in-process, {n} matrices", inproc[n], "us", 1e6)
    rows = []
    base = min(bus_st)
    for n in sorted(bus_st)[1:]:
        r = bus_st[n].median / bus_st[base].median
        ri = inproc[n].median / inproc[base].median
        rows.append(
            Row(
                f"Check with {n:,} matrices (big host)",
                f"{bus_st[n].median * 1e3:.3f} ms (p99 {bus_st[n].p99 * 1e3:.3f}); "
                f"in-process {inproc[n].median * 1e6:.1f} us",
                f"itself at {base}: {bus_st[base].median * 1e3:.3f} ms "
                f"(p99 {bus_st[base].p99 * 1e3:.3f}); "
                f"in-process {inproc[base].median * 1e6:.1f} us",
                r,
                "flat: <= 1.2x",
                r <= 1.2,
                note=f"in-process ratio {ri:.2f}x",
                raw={"bus": bus_st[n].__dict__, "inprocess": inproc[n].__dict__},
            )
        )
    raw = {
        "bus": {n: s.__dict__ for n, s in bus_st.items()},
        "inprocess": {n: s.__dict__ for n, s in inproc.items()},
        "ready_within_s": loads,
    }
    return rows, raw


# -- 3. start-up to READY=1 vs the reads it must make; 6. memory ---------------------------
@contextlib.contextmanager
def byte_compiled(cache: Path) -> Iterator[None]:
    """Processes started meanwhile keep their compiled modules in ``cache`` (outside the tree).

    A packaged daemon starts from byte-compiled modules (dh_python3 and RPM compile them at
    install). Where PYTHONDONTWRITEBYTECODE is set and the tree has no __pycache__, every
    start compiled all it imports again: ours ~0.3 s of its start-up, the floor less (it
    imports fewer modules), which measured the compiler rather than the start-up."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def startup(
    address: str, quick: bool, work: Path, state: Path, n: int
) -> tuple[list[Row], dict[str, Any]]:
    reps = 2 if quick else 5
    say(
        f"== start-up to READY=1, big host, {n} autostart matrices stored "
        f"({reps} runs of ours and of the floor, interleaved)"
    )
    ours: list[float] = []
    mem: list[dict[str, int]] = []
    floors: list[float] = []
    floor_raw: list[dict[str, Any]] = []

    def run_ours(name: str) -> float:
        copy = work / name
        shutil.copytree(state, copy)
        d, took = spawn_ready(
            [*apmatrixd_argv(), "--simulate", "big", "--state-dir", str(copy),
             "--rescan-interval", "0", "--bus-address", address]
        )  # fmt: skip
        mem.append(rss_kb(d.proc.pid))
        stop(d)
        shutil.rmtree(copy)
        return took

    def run_floor(name: str) -> float:
        copy = work / name
        shutil.copytree(state, copy)
        w, took = spawn_ready([sys.executable, "-m", "bench.startfloor", "big", str(copy)])
        out, _ = w.proc.communicate(timeout=600)
        w.close()
        shutil.rmtree(copy)
        info = json.loads(out)
        info["to_ready"] = took
        floor_raw.append(info)
        return took

    with byte_compiled(work / "pycache"):
        run_ours("startup-warm")  # untimed: fills the cache with what ours imports
        run_floor("startup-floor-warm")
        mem.clear()
        floor_raw.clear()
        # Interleaved, as many floors as ours: the floor swings by half between runs on
        # this machine, and a busy spell then falls on both sides of the ratio.
        for i in range(reps):
            ours.append(run_ours(f"startup-{i}"))
            floors.append(run_floor(f"startup-floor-{i}"))
    so, sf = Stats.of(ours), Stats.of(floors)
    show("apmatrixd start-up to READY=1", so, "s", 1)
    show("the reads start-up must make (in-process)", sf, "s", 1)
    r = so.median / sf.median
    rows = [
        Row(
            f"start-up to READY=1, big host (256x256), {n:,} autostart matrices in --state-dir",
            f"{so.median:.2f} s (min {so.min:.2f}, max {so.max:.2f})",
            f"the reads start-up must make, in-process (the emulated host built, "
            f"{floor_raw[0]['stored']:,} stored definitions and the whole AP configuration "
            f"read through the kernel backend): {sf.median:.2f} s (median of {reps}, "
            f"min {sf.min:.2f}, max {sf.max:.2f}, interleaved with ours)",
            r,
            "<= 3x",
            r <= 3,
            note=f"ours also creates the {n:,} autostart mdevs and applies the reservations",
            raw={"ours": so.__dict__, "floor": sf.__dict__},
        )
    ]
    rss = Stats.of([m["VmRSS"] * 1024 for m in mem])
    say(f"  RSS after READY=1 (--simulate: emulator included) median {rss.median / 2**20:.1f} MiB")
    raw = {"ours_s": ours, "floor_s": floors, "floor": floor_raw, "memory_kb": mem}
    raw["bytecode"] = "both sides from compiled modules, after one untimed start each"
    return rows, raw


def make_states(work: Path, sizes: list[int], autostart: bool) -> dict[int, Path]:
    states = {}
    for n in sizes:
        t = time.monotonic()
        kind = "autostart" if autostart else "defined"
        states[n] = big_state(work / f"state-{kind}-{n}", n, autostart=autostart)
        say(f"  stored {n} {kind} matrices in {time.monotonic() - t:.1f} s")
    return states


def run(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    raw: dict[str, Any] = {"seconds": {}}
    t = time.monotonic()

    def lap(part: str) -> None:
        nonlocal t
        raw["seconds"][part] = round(time.monotonic() - t, 1)
        say(f"   ({part}: {raw['seconds'][part]:.0f} s)")
        t = time.monotonic()

    bus = PrivateBus.start()
    try:
        r, raw["roundtrip"] = roundtrip(bus.address, quick, work / "roundtrip-state")
        rows += r
    finally:
        bus.stop()
    lap("round trips")
    bus = PrivateBus.start()
    try:
        r, raw["reads_while_waiting"] = reads_while_waiting(bus.address, quick)
        rows += r
    finally:
        bus.stop()
    lap("reads while waiting")
    # Check asks the registry, which holds a defined matrix as it holds a live one; starting
    # 10,000 in the emulated kernel would only time the emulator (its sharing check walks
    # every mdev: ~130 s), so the Check sizes are stored definitions without autostart.
    sizes = [10, 100, 1000] if quick else [10, 1000, 10000]
    r, raw["check"] = check_flat(quick, work, make_states(work, sizes, autostart=False))
    rows += r
    lap("check")
    bus = PrivateBus.start()
    try:
        state = make_states(work, [1000], autostart=True)[1000]
        r, raw["startup"] = startup(bus.address, quick, work, state, 1000)
        rows += r
    finally:
        bus.stop()
    lap("start-up")
    return rows, raw


# -- where a call's time goes inside the daemon (development, not a figure) -------------------
def profile(out: Path, reps: int = 300, burst_reps: int = 3) -> None:
    """The round-trip load (single client, then 100 in flight) against the daemon run under
    cProfile (``bench.profiled``); prints the top of the profile, keeps the stats in ``out``."""
    import pstats
    import tempfile

    bus = PrivateBus.start()
    try:
        with tempfile.TemporaryDirectory(prefix="apmatrixd-bench-", dir="/var/tmp") as tmp:
            d, _ = spawn_ready(
                [sys.executable, "-m", "bench.profiled", str(out), "--simulate", "big",
                 "--state-dir", tmp, "--rescan-interval", "0", "--bus-address", bus.address]
            )  # fmt: skip
            try:
                raw = asyncio.run(_roundtrip(bus.address, reps, burst_reps, Path(tmp)))
            finally:
                stop(d)
    finally:
        bus.stop()
    for k, v in raw.items():
        show(k, Stats.of(v))
    if out.suffix == ".json":
        for k, v in json.loads(out.read_text()).items():
            if v:
                show(f"in the daemon: {k}", Stats.of(v))
        return
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
