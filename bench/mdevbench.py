"""Define + start 100 matrices: apmatrixd (real-host mode) vs Debian's mdevctl 1.2, each on a
fresh FUSE emulator of the big host bound on /sys in a private mount namespace (mdevctl 1.2
ignores MDEVCTL_ENV_ROOT) with a scratch /etc/mdevctl.d. Both start from the same host: domains
00-63 taken from the host pool (aqmask) before the clock starts. Matrix k: adapter k x usage and
control domain k % 64. One process per step on both sides: ``busctl call CreateMatrix`` (define +
start in one call) vs ``mdevctl define --jsonfile`` + ``mdevctl start``."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from busrig import MANAGER, NAME, ROOT, PrivateBus
from dbus_fast import MessageType, Variant
from rigs import NsRig

from bench.busbench import connect, msg, stop
from bench.common import REPO, Row, Stats, say, show

AQMASK = "0x" + format((1 << 192) - 1, "064x")  # domains 00-3f off (left bit = id 0)


def _uuid(k: int, base: int = 0xABC) -> str:
    return f"{base:08x}-0000-4000-8000-{k:012x}"


def mdevctl_side(n: int, work: Path) -> dict[str, Any]:
    rig = NsRig.start("big", uevents=False)
    try:
        (rig.root / "bus/ap/aqmask").write_text(AQMASK + "\n")
        scratch = work / "mdevctl.d"
        for sub in ("scripts.d/callouts", "scripts.d/notifiers"):  # what the package ships
            (scratch / sub).mkdir(parents=True)
        done = subprocess.run(
            rig.argv(sys.executable, "-m", "bench.mdevctl_driver", str(n), mdevctl_scratch=scratch),
            capture_output=True, text=True, cwd=REPO, timeout=900,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"mdevctl driver: {done.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(done.stdout)
        out["files"] = sorted(p.name for p in (scratch / "matrix").glob("*"))[:3]
        live = list((rig.root / "devices/vfio_ap/matrix").glob("*-*-*-*-*"))
        out["live_mdevs"] = len(live)
        return out
    finally:
        rig.close()


async def _ours(address: str, n: int) -> dict[str, Any]:
    per: list[float] = []
    failures: list[str] = []
    for k in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(
            ["busctl", f"--address={address}", "call", NAME, ROOT, MANAGER, "CreateMatrix",
             "sa{sv}", _uuid(k), "2", "adapters", "au", "1", str(k),
             "domains", "au", "1", str(k % 64)],
            capture_output=True, text=True,
        )  # fmt: skip
        per.append(time.perf_counter() - t0)
        if r.returncode != 0:
            failures.append(r.stderr.strip())
    bus = await connect(address)
    inproc: list[float] = []
    for k in range(n):
        opts = {"adapters": Variant("au", [100 + k]), "domains": Variant("au", [k % 64])}
        t0 = time.perf_counter()
        reply = await asyncio.wait_for(
            bus.call(msg(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [_uuid(k, 0xBCD), opts])), 60
        )
        inproc.append(time.perf_counter() - t0)
        assert reply is not None
        if reply.message_type != MessageType.METHOD_RETURN:
            failures.append(f"inproc {k}: {reply.body}")
    shared = {}
    for name, u in (("first", _uuid(1, 0xDEF)), ("second", _uuid(2, 0xDEF))):
        opts = {"adapters": Variant("au", [220]), "domains": Variant("au", [60])}
        reply = await bus.call(msg(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [u, opts]))
        assert reply is not None
        shared[name] = {"reply": reply.error_name or "ok", "body": [str(x) for x in reply.body]}
    bus.disconnect()
    return {"per_matrix": per, "inprocess": inproc, "failures": failures, "shared": shared}


def ours_side(n: int, work: Path) -> dict[str, Any]:
    rig = NsRig.start("big", uevents=False)
    bus = PrivateBus.start()
    try:
        (rig.root / "bus/ap/aqmask").write_text(AQMASK + "\n")
        d, _ = rig.daemon(bus.address, work / "ours-state")
        try:
            return asyncio.run(_ours(bus.address, n))
        finally:
            stop(d)
    finally:
        bus.stop()
        rig.close()


def run(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    n = 20 if quick else 100
    if shutil.which("mdevctl") is None:
        say("== mdevctl is not installed (tools/bench installs it): row skipped")
        return [
            Row(f"define + start {n} matrices", "-", "mdevctl missing", None, "faster", None)
        ], {}
    runs = 2 if quick else 5
    say(
        f"== define + start {n} matrices: apmatrixd vs mdevctl 1.2, big host over FUSE, "
        f"{runs} runs each, interleaved"
    )
    ms: list[dict[str, Any]] = []
    os_: list[dict[str, Any]] = []
    for i in range(runs):  # interleaved: a busy spell of the machine falls on both sides
        for side, into, run_side in (("m", ms, mdevctl_side), ("o", os_, ours_side)):
            where = work / f"{side}{i}"
            where.mkdir()
            into.append(run_side(n, where))
    m, o = ms[-1], os_[-1]
    totals_m = [sum(x["per_matrix"]) for x in ms]
    totals_o = [sum(x["per_matrix"]) for x in os_]
    totals_i = [sum(x["inprocess"]) for x in os_]
    sm = Stats.of([t for x in ms for t in x["per_matrix"]])
    so = Stats.of([t for x in os_ for t in x["per_matrix"]])
    si = Stats.of([t for x in os_ for t in x["inprocess"]])
    show("mdevctl define + start, per matrix", sm)
    show("apmatrixd busctl CreateMatrix, per matrix", so)
    show("apmatrixd CreateMatrix, in-process client", si)
    tm, to, ti = (statistics.median(t) for t in (totals_m, totals_o, totals_i))
    failures = [f for x in os_ for f in x["failures"]]
    say(
        f"  totals (median of {runs}): mdevctl {tm:.2f} s {_runs(totals_m)}, apmatrixd "
        f"{to:.2f} s {_runs(totals_o)}, in-process {ti:.2f} s; failures mdevctl "
        f"{sum(len(x['failures']) for x in ms)}, ours {len(failures)}"
    )
    say(f"  shared APQN: mdevctl {json.dumps(m['shared'])}")
    say(f"  shared APQN: apmatrixd {json.dumps(o['shared'])}")
    r = to / tm
    rows = [
        Row(
            f"define + start {n} matrices (one process per step; median of {runs} interleaved "
            "runs each)",
            f"{to:.2f} s total {_runs(totals_o)}, {so.median * 1e3:.1f} ms/matrix (busctl); "
            f"in-process client {ti:.2f} s ({si.median * 1e3:.1f} ms/matrix, "
            f"{ti / tm:.2f}x mdevctl)",
            f"mdevctl 1.2: {tm:.2f} s total {_runs(totals_m)}, {sm.median * 1e3:.1f} ms/matrix "
            "(a command per step: it has no in-process client)",
            r,
            "faster than mdevctl (< 1x)",
            r < 1 and not failures,
            raw={"ours": so.__dict__, "inprocess": si.__dict__, "mdevctl": sm.__dict__,
                 "totals": {"mdevctl": totals_m, "ours": totals_o, "inprocess": totals_i}},
        )
    ]  # fmt: skip
    return rows, {"mdevctl": ms, "ours": os_}


def _runs(totals: list[float]) -> str:
    return "(runs " + ", ".join(f"{t:.2f}" for t in totals) + ")"
