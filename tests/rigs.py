"""Shared rigs for end-to-end tests: what the machine offers, private namespaces, mounts.

Python 3.11 has no ``os.unshare``; the netns side runs in a child under ``unshare -n``
(util-linux), so the test process itself stays in the host namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def fuse_missing() -> str | None:
    """Why a real FUSE mount cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    return None


def netns_missing() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if done.returncode != 0:
        return f"unshare -n failed: {done.stderr.decode().strip()}"
    return None


def in_netns(script: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a Python ``script`` in a fresh network namespace (nothing leaks to the host's udev)."""
    return subprocess.run(
        ["unshare", "-n", "--", PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def is_mount(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a mountpoint (by /proc/self/mounts, which never blocks on FUSE)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def wait_unmounted(path: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mount(path):
            return True
        time.sleep(0.02)
    return not is_mount(path)


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Detach a FUSE mount whatever state its server is in; call before removing the dir."""
    if is_mount(path):
        subprocess.run(["fusermount3", "-uz", os.fspath(path)], capture_output=True, check=False)
