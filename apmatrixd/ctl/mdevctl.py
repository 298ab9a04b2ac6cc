"""import-mdevctl / export-mdevctl: matrices in and out of mdevctl's definitions, by the daemon."""

from __future__ import annotations

import argparse
import os
from typing import Any

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError
from apmatrixd.ctl.output import Output, matrix_block

MDEVCTL_DIR = "/etc/mdevctl.d"


def register(cmds: DocumentedParser) -> None:
    adopt = "adopt mdevctl's vfio_ap definitions (refused if any clash)"
    for name, func, text in (
        ("import-mdevctl", cmd_import, adopt),
        ("export-mdevctl", cmd_export, "write the matrices as mdevctl definitions"),
    ):
        p = cmds.command(name, help=text)
        p.add_argument(
            "dir",
            metavar="DIR",
            nargs="?",
            default=MDEVCTL_DIR,
            help=f"mdevctl's configuration directory (default {MDEVCTL_DIR})",
        )
        p.set_defaults(func=func)


def open_dir(path: str) -> int:
    """The directory, opened with the caller's own rights in the caller's own namespace: the
    daemon works through this descriptor and resolves no path itself."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CtlError(
            f"NotFound: no directory {path}", name=names.error_name("NotFound")
        ) from None
    except OSError as err:
        raise CtlError(f"cannot open {path}: {err.strerror}") from None


async def _call_with_dir(conn: Connection, member: str, path: str) -> list[Any]:
    fd = open_dir(path)
    try:
        return await conn.call(
            names.MANAGER_PATH, names.MANAGER_IFACE, member, "h", [0], unix_fds=[fd]
        )
    finally:
        os.close(fd)


async def cmd_import(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    d = os.path.abspath(args.dir)
    (paths,) = await _call_with_dir(conn, "ImportMdevctlFd", d)
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
    await _call_with_dir(conn, "ExportMdevctlFd", d)
    if out.as_json:
        out.json({"exported": d})
    else:
        out.line(f"exported to {d}")
    return 0
