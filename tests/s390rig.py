"""The real s390-tools, built from ``../shared/third-party/s390-tools-*.tar.gz`` (unpatched) into
``build/`` once and reused by later runs and by every test that runs them.

The tree is extracted once (marked done by ``.extracted``) and each caller then makes what it
needs in it, under one lock: two test workers never build, or extract, at the same time, and
a tree another worker is using is never removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from rigs import need_tool, unavailable

REPO = Path(__file__).resolve().parents[1]
# Next to the checkout (../shared/third-party), or where APMATRIXD_THIRD_PARTY says.
THIRD_PARTY = [
    Path(p)
    for p in (
        os.environ.get("APMATRIXD_THIRD_PARTY", ""),
        REPO.parent / "shared" / "third-party",
        "/work/shared/third-party",
    )  # fmt: skip
    if str(p)
]


def tarball() -> Path:
    for folder in THIRD_PARTY:
        found = sorted(folder.glob("s390-tools-*.tar.gz"))
        if found:
            return found[-1]
    where = ", ".join(map(str, THIRD_PARTY))
    unavailable(f"no s390-tools source in {where}", installable=False)


def built(*steps: tuple[str, ...]) -> Path:
    """The s390-tools source tree after ``make -C DIR [TARGET...]`` for each step."""
    need_tool("gcc", "gcc")
    need_tool("make", "make")
    source = tarball()
    out = REPO / "build" / source.name.removesuffix(".tar.gz")
    src = out / "s390-tools"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".extracted").exists():
            shutil.rmtree(src, ignore_errors=True)
            with tarfile.open(source) as tar:
                tar.extractall(out, filter="data")
            (out / ".extracted").touch()
        for directory, *targets in steps:
            cmd = ["make", "-C", directory, *targets]
            r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return src


# chzdev takes the s390 configuration lock in /run/lock: a private one, never the host's.
ZDEV_SH = """set -e
mount -t tmpfs -o mode=0755 apmatrixd-zdev-lock /run/lock
exec "$@"
"""


def zdev() -> Path:
    """The directory holding the built chzdev and lszdev."""
    return built(("libutil",), ("libap",), ("zdev",)) / "zdev" / "src"


def run_zdev(tool: str, sysfs: Path, etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``tool`` (chzdev or lszdev) in a private mount namespace, reading sysfs at ``sysfs``
    (libap honours SYSFS_ROOT) and every ``/etc`` file below ``etc`` (``--base``): the udev
    rule it keeps and mdevctl's definitions it checks."""
    need_tool("unshare", "util-linux")
    argv = [str(zdev() / tool), *args, "--base", f"/etc={etc}"]
    if tool == "chzdev":
        argv += ["--no-settle", "--no-module-load", "--no-root-update", "--yes"]
    env = dict(os.environ, SYSFS_ROOT=str(sysfs))
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", ZDEV_SH, "sh",
         *argv],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def lszdev_masks(sysfs: Path, etc: Path) -> dict[str, frozenset[int]]:
    """What ``lszdev -t ap -p`` shows of chzdev's persistent masks: the host's ids per mask
    (it prints them in decimal, as ranges)."""
    r = run_zdev("lszdev", sysfs, etc, "-t", "ap", "-p")
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, frozenset[int]] = {}
    for line in r.stdout.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0] in ("apmask", "aqmask"):
            ids: set[int] = set()
            for part in words[1].strip().strip('"').split(","):
                if part:
                    lo, _, hi = part.partition("-")
                    ids.update(range(int(lo), int(hi or lo) + 1))
            out[words[0]] = frozenset(ids)
    return out
