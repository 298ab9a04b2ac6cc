"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, write RESULTS.md and
results.json next to this file (or --out DIR)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH, Row, cpus, load, say

SUITES = ("bus", "hotplug", "mdevctl", "fleet")
PARTS = ("startup", "idle", "hotplug-card")
"""One row of a suite alone (start-up of bus, idle cost and card hot plug of hotplug): a
partial run, for measuring one change against its base back to back."""


def table(rows: list[Row]) -> str:
    out = [
        "| figure | ours | floor or peer | ratio | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        note = f" ({r.note})" if r.note else ""
        out.append(f"| {r.figure} | {r.ours}{note} | {r.floor} | {ratio} | {r.goal} | {met} |")
    return "\n".join(out)


def render(doc: dict[str, Any]) -> str:
    """RESULTS.md from a run's results.json and the hand-written head and notes (so the notes
    can be corrected with ``--render`` without running again: the figures stay the run's)."""
    from bench import cockpitbench

    meta, errors = doc["meta"], doc.get("errors", {})
    rows = [Row(**r) for r in doc["rows"]]
    page = cockpitbench.load()
    if page:
        rows += cockpitbench.rows(page)
    tmpl = (BENCH / "RESULTS.head.md").read_text() if (BENCH / "RESULTS.head.md").exists() else ""
    tail = (BENCH / "RESULTS.notes.md").read_text() if (BENCH / "RESULTS.notes.md").exists() else ""
    before, after = meta["loadavg_before"], meta["loadavg_after"]
    # Only the load before the run says whether others were busy: the bench itself keeps
    # both CPUs at work, so the load after is always high.
    busy = float(before.split()[0]) > meta["cpus"] * 0.5
    quick = "--quick, " if meta["quick"] else ""
    md = [
        "# apmatrixd benchmarks",
        "",
        tmpl.strip(),
        "",
        f"Run {meta['date']} on commit {meta['commit']}, {meta['cpus']} CPUs, Python "
        f"{meta['python']}, kernel {meta['kernel']}; {meta['duration_s']} s"
        + (
            ""
            if meta["full"]
            else f" (a partial run: {quick}suites {', '.join(meta['suites'])} only)"
        )
        + ". Every row below is from this one run"
        + (
            f" except the Cockpit page's two, measured in the browser by "
            f"tests/cockpit/test_big_host.py on {page['measured']} (commit {page['commit']}; "
            "`APMATRIXD_BENCH_COCKPIT=1` writes bench/cockpit.json)"
            if page
            else ""
        )
        + ". "
        f"Load average before {before}, after {after} (the bench's own)"
        + (
            ": **the machine was busy** before the run (other work running); the ratios, "
            "measured in the same run, are what to read."
            if busy
            else ": the machine was otherwise idle."
        ),
        "",
        table(rows),
        "",
    ]
    if errors:
        md += ["Suites that failed in this run:", ""]
        md += [f"- {k}: {v}" for k, v in errors.items()] + [""]
    md.append(tail.strip())
    return "\n".join(md).rstrip() + "\n"


def changed_files() -> list[str]:
    """Tracked files that differ from HEAD (a run measures the tree as it was at its start)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, cwd=BENCH,
    ).stdout  # fmt: skip
    return [line[3:] for line in out.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="few repetitions, small sizes (smoke)")
    p.add_argument("--only", nargs="+", choices=SUITES + PARTS, default=list(SUITES))
    p.add_argument(
        "--out",
        type=Path,
        help="where RESULTS.md and results.json go: bench/ for a full run; a partial run "
        "(--only, --quick) goes to a directory under /var/tmp unless told, so that "
        "bench/RESULTS.md always holds one full run",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="STATS",
        help="no figures: profile the daemon under the round-trip load (cProfile stats to STATS)",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="no run: write RESULTS.md again from results.json in --out (default bench/), "
        "with the current RESULTS.head.md and RESULTS.notes.md",
    )
    args = p.parse_args(argv)
    if args.render:
        out = args.out or BENCH
        doc = json.loads((out / "results.json").read_text())
        (out / "RESULTS.md").write_text(render(doc))
        say(f"wrote {out / 'RESULTS.md'} from {out / 'results.json'}")
        return 0
    if os.geteuid() != 0:
        say("bench: needs root (FUSE, namespaces); run sudo tools/bench")
        return 1
    if args.profile:
        from bench.busbench import profile

        profile(args.profile)
        return 0
    full = not args.quick and set(args.only) == set(SUITES)
    if args.out is None:
        args.out = (
            BENCH
            if full
            else Path(tempfile.mkdtemp(prefix="apmatrixd-bench-partial-", dir="/var/tmp"))
        )
    if args.out.resolve() == BENCH and not full:
        say("bench: bench/RESULTS.md holds one full run; give --out DIR for a partial run")
        return 2
    started = time.time()
    load_before = load()
    dirty_before = changed_files()
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="apmatrixd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for name in args.only:
            t = time.monotonic()
            try:
                if name == "bus":
                    from bench import busbench as mod
                elif name in PARTS:
                    from bench import parts as mod  # type: ignore[no-redef]
                elif name == "hotplug":
                    from bench import hotbench as mod  # type: ignore[no-redef]
                elif name == "fleet":
                    from bench import fleetbench as mod  # type: ignore[no-redef]
                else:
                    from bench import mdevbench as mod  # type: ignore[no-redef]
                (work / name).mkdir()
                run = mod.run if name not in PARTS else getattr(mod, name.replace("-", "_"))
                r, raw[name] = run(args.quick, work / name)
                rows += r
            except Exception as err:  # one broken suite must not hide the others
                import traceback

                traceback.print_exc()
                errors[name] = f"{type(err).__name__}: {err}"
            say(f"   ({name}: {time.monotonic() - t:.0f} s)")
    load_after = load()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()
    dirty_after = changed_files()
    if dirty_before:  # what was measured is not the commit
        commit += " plus uncommitted changes"
    elif dirty_after:
        commit += f" (changed while it ran: {', '.join(dirty_after)})"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": round(time.time() - started),
        "commit": commit,
        "quick": args.quick,
        "suites": args.only,
        "full": full,
        "cpus": cpus(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "rows": [r.as_json() for r in rows], "raw": raw, "errors": errors}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (args.out / "RESULTS.md").write_text(render(doc))
    say(f"wrote {args.out / 'RESULTS.md'} and {args.out / 'results.json'}")
    say(table(rows))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
