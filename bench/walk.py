"""The floor of start-up: a bare walk of an emulated sysfs, reading every attribute.

``python -m bench.walk SCENARIO`` builds the emulated host in-process (as ``apmatrixd
--simulate`` does), reads every file and link of its tree, and sends READY=1 to
$NOTIFY_SOCKET, so it is timed exactly as the daemon is. ``python -m bench.walk --fs DIR``
walks a mounted tree (the FUSE face) with plain system calls instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Any


def walk_tree(tree: Any, path: str = "") -> tuple[int, int]:
    """(files read, bytes) of everything below ``path`` (the SysfsTree protocol)."""
    files = size = 0
    stack = [path]
    while stack:
        p = stack.pop()
        kind = tree.kind(p)
        if kind == "dir":
            stack.extend(f"{p}/{n}" if p else n for n in tree.listdir(p))
        elif kind == "link":
            tree.readlink(p)
            files += 1
        else:
            with contextlib.suppress(OSError):  # write-only attributes
                size += len(tree.read(p))
            files += 1
    return files, size


def walk_fs(root: str) -> tuple[int, int]:
    files = size = 0
    for top, dirs, names in os.walk(root):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            p = os.path.join(top, n)
            files += 1
            if os.path.islink(p):
                os.readlink(p)
                continue
            try:
                with open(p, "rb") as f:
                    size += len(f.read())
            except OSError:
                pass
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
    return files, size


def notify(text: str) -> None:
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    addr = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), addr)


def main(argv: list[str]) -> int:
    """``SCENARIO [CARDS]``: walk everything but the card directories, then CARDS of them
    (all by default); prints JSON timings on stdout."""
    t0 = time.perf_counter()
    from apmatrixd.sim.model import Host

    host = Host.from_name(argv[0])
    built = time.perf_counter()
    cards = sorted(n for n in host.listdir("devices/ap") if n.startswith("card"))
    sample = cards[: int(argv[1])] if len(argv) > 1 else cards
    files, size = 0, 0
    for top in host.listdir(""):
        if top == "devices":
            for sub in host.listdir("devices"):
                if sub != "ap":
                    f, s = walk_tree(host, f"devices/{sub}")
                    files, size = files + f, size + s
            for n in host.listdir("devices/ap"):
                if not n.startswith("card"):
                    f, s = walk_tree(host, f"devices/ap/{n}")
                    files, size = files + f, size + s
        else:
            f, s = walk_tree(host, top)
            files, size = files + f, size + s
    rest = time.perf_counter()
    card_files = 0
    for c in sample:
        f, s = walk_tree(host, f"devices/ap/{c}")
        card_files, size = card_files + f, size + s
    done = time.perf_counter()
    per_card = (done - rest) / max(1, len(sample))
    out = {
        "start_to_built": built - t0,
        "rest": rest - built,
        "cards_walked": len(sample),
        "cards": len(cards),
        "per_card": per_card,
        "files_rest": files,
        "files_per_card": card_files / max(1, len(sample)),
        "measured": done - t0,
        "full": (rest - t0) + per_card * len(cards),
    }
    notify(f"READY=1\nSTATUS=walked {files + card_files} files")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
