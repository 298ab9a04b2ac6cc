"""import-mdevctl / export-mdevctl: matrices in and out of mdevctl's definitions, by the daemon."""

from __future__ import annotations

import argparse
import os
from typing import Any

from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection
from apmatrixd.ctl.output import Output, matrix_block

Sub = Any
MDEVCTL_DIR = "/etc/mdevctl.d"


def register(sub: Sub, common: argparse.ArgumentParser) -> None:
    adopt = "adopt mdevctl's vfio_ap definitions (refused if any clash)"
    for name, func, text in (
        ("import-mdevctl", cmd_import, adopt),
        ("export-mdevctl", cmd_export, "write the matrices as mdevctl definitions"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument(
            "dir",
            metavar="DIR",
            nargs="?",
            default=MDEVCTL_DIR,
            help=f"mdevctl's configuration directory (default {MDEVCTL_DIR})",
        )
        p.set_defaults(func=func)


async def cmd_import(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    d = os.path.abspath(args.dir)  # the daemon's working directory is not ours
    (paths,) = await conn.call(names.MANAGER_PATH, names.MANAGER_IFACE, "ImportMdevctl", "s", [d])
    snap = await conn.snapshot()
    ms = [m for m in snap.sorted_matrices() if m.path in set(paths)]
    if out.as_json:
        out.json({"imported": [m.json() for m in ms]})
        return 0
    out.line(f"imported {len(ms)} matrix(es) from {d}")
    for m in ms:
        out.line()
        out.lines(matrix_block(m))
    return 0


async def cmd_export(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    d = os.path.abspath(args.dir)
    await conn.call(names.MANAGER_PATH, names.MANAGER_IFACE, "ExportMdevctl", "s", [d])
    if out.as_json:
        out.json({"exported": d})
    else:
        out.line(f"exported to {d}")
    return 0
