"""Run inside the bench namespace (emulated tree on /sys, scratch /etc/mdevctl.d): define and
start N matrices with Debian's mdevctl, one process per step as an admin would; then two
definitions that share an APQN. Prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

TYPE = "vfio_ap-passthrough"


def uuid(k: int, base: int = 0xABC) -> str:
    return f"{base:08x}-0000-4000-8000-{k:012x}"


def mdevctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mdevctl", *args], capture_output=True, text=True, check=False)


def define(u: str, adapter: int, domain: int) -> subprocess.CompletedProcess[str]:
    attrs = [
        {"assign_adapter": f"{adapter:#04x}"},
        {"assign_domain": f"{domain:#06x}"},
        {"assign_control_domain": f"{domain:#06x}"},
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"mdev_type": TYPE, "start": "manual", "attrs": attrs}, f)
        f.flush()
        return mdevctl("define", "-u", u, "-p", "matrix", "--jsonfile", f.name)


def main(n: int) -> int:
    steps: list[float] = []
    per_matrix: list[float] = []
    failures: list[str] = []
    for k in range(n):
        u = uuid(k)
        t0 = time.perf_counter()
        d = define(u, k, k % 64)
        t1 = time.perf_counter()
        s = mdevctl("start", "-u", u)
        t2 = time.perf_counter()
        steps += [t1 - t0, t2 - t1]
        per_matrix.append(t2 - t0)
        for r in (d, s):
            if r.returncode != 0:
                failures.append(f"{' '.join(r.args[:2])} {u}: {r.stderr.strip()}")
    # Two definitions sharing APQN dc.003c (reserved, free): does mdevctl notice?
    a, b = uuid(1, 0xDEF), uuid(2, 0xDEF)
    shared = {}
    for name, u in (("first", a), ("second", b)):
        d = define(u, 220, 60)
        s = mdevctl("start", "-u", u)
        shared[name] = {
            "define_rc": d.returncode,
            "define_err": d.stderr.strip(),
            "start_rc": s.returncode,
            "start_err": s.stderr.strip()[-500:],
        }
    shared["list_defined"] = mdevctl("list", "-d").stdout.strip().splitlines()[-2:]
    shared["list_active"] = [
        line for line in mdevctl("list").stdout.splitlines() if line.startswith("00000def")
    ]
    matrix = {}
    for u in (a, b):
        try:
            with open(f"/sys/devices/vfio_ap/matrix/{u}/matrix") as f:
                matrix[u] = f.read().split()
        except OSError as err:
            matrix[u] = [f"({err.strerror})"]
    shared["sysfs_matrix"] = matrix
    print(json.dumps({"per_matrix": per_matrix, "steps": steps, "failures": failures,
                      "shared": shared}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
