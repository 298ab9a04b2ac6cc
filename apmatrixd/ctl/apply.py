"""apply: bring the host to a declared document (YAML or JSON), all or nothing, by the daemon.

The file is read here, with the caller's own rights, and sent as text: the daemon opens no
path a caller names. It parses, plans and applies (Manager.Apply).
"""

from __future__ import annotations

import argparse
import sys

from dbus_fast import Variant

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError, unvariant
from apmatrixd.ctl.output import Output

MAX_BYTES = 1 << 20  # the daemon's limit too: a larger file is refused before the call


def register(cmds: DocumentedParser) -> None:
    p = cmds.command(
        "apply",
        help="bring the host to a declared layout (reservations and matrices), all or nothing",
        description=(
            "Apply a declared document (YAML or JSON): the adapters and domains to reserve "
            "and the matrices, by name. Every problem is named before anything changes; the "
            "same document applied again changes nothing."
        ),
    )
    p.add_argument("file", metavar="FILE", help="the document ('-' for standard input)")
    p.add_argument(
        "--check", action="store_true", help="only print the plan; change nothing (dry run)"
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="also remove apmatrixd's matrices the document lacks, and release what it does "
        "not reserve",
    )
    p.set_defaults(func=cmd_apply)


def read_document(path: str) -> str:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise CtlError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise CtlError(
            f"InvalidArgument: document: {path} is larger than {MAX_BYTES} bytes",
            name=names.error_name("InvalidArgument"),
        )
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise CtlError(
            f"InvalidArgument: document: {path} is not UTF-8 ({err.reason} at byte {err.start})",
            name=names.error_name("InvalidArgument"),
        ) from None


async def cmd_apply(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    text = read_document(args.file)
    options = {"check": Variant("b", bool(args.check)), "prune": Variant("b", bool(args.prune))}
    (result,) = await conn.call(
        names.MANAGER_PATH, names.MANAGER_IFACE, "Apply", "sa{sv}", [text, options]
    )
    doc = unvariant(result)
    changed, plan = bool(doc.get("changed")), list(doc.get("plan", []))
    if out.as_json:
        out.json({"changed": changed, "plan": plan})
        return 0
    if not plan:
        out.line("nothing to change: the host is as declared")
        return 0
    out.line("would change:" if args.check else "changed:")
    for step in plan:
        out.line(f"  {step['text']}")
    return 0
