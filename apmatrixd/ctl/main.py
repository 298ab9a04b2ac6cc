"""``apmatrixctl``: the parser, the exit codes, and the one place errors become one line.

Exit status: 0 success; 1 refused or failed (the daemon's named error, or the daemon not
reachable); 2 usage (unknown command, bad id, ambiguous matrix). No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from apmatrixd import __version__
from apmatrixd.argdoc import DocumentedParser
from apmatrixd.ctl import apply, host, matrices, mdevctl, metrics, monitor
from apmatrixd.ctl.client import Connection, CtlError, Target
from apmatrixd.ctl.ids import IdError, parse_ids
from apmatrixd.ctl.output import Output

PROG = "apmatrixctl"
REFUSALS_DRAWN = {"Conflict", "HostOwned"}

DESCRIPTION = (
    "Manage IBM Z AP crypto matrices (vfio_ap mediated devices) through apmatrixd, over D-Bus "
    "only. A MATRIX is named by its name, its UUID, or a unique UUID prefix."
)

IDS_HELP = """\
ids:
  Adapter and domain ids are hexadecimal, as lszcrypt and chzdev print them:
  5, 05 and 0x05 are all adapter 5, and a bare 47 is 0x47 (71), never decimal.
  A 0x prefix is always hex. Ranges include both ends (4-7, 0x00-0x3f); lists
  are comma-separated (4,0x47,ab-ad). 'none' is the empty set (update only).
  Ids above ff are refused (exit 2). APQNs print as adapter.domain: 05.0004."""

JSON_HELP = """\
json (--json, stable; ids are integers, APQNs [adapter, domain] pairs):
  Matrix  {"uuid", "name", "state", "adapters", "domains", "control_domains",
           "apqns", "guest_apqns", "autostart", "adopted", "sysfs_path", "in_use",
           "lost": [{"adapter", "domain", "reason"}], "control_usage_domains", "path"}
  Host    {"version", "layout", "max_adapter_id", "max_domain_id",
           "host_adapters", "host_domains", "settling", "kernel_generation",
           "kernel_features", "boot_host_pool": {"file", "apmask",
           "reserved_adapters", "aqmask", "reserved_domains", "error", "drift"}}
  Adapter {"id", "type", "mode", "online", "configured", "domains",
           "guest_domains", "owners": [[domain, uuid]], "checkstopped",
           "driver_overrides": [[domain, driver]], "path"}
  an error (exit status 1) -> {"error": {"name", "message", "exit"}} on stdout,
           the text on stderr as without --json
  list -> {"matrices": [Matrix]}
  show, create, start, stop, assign, unassign, update, configure -> Matrix
  start, stop of several -> {"matrices": [Matrix]}
  remove -> {"removed": Matrix}; of several -> {"removed": [Matrix]}
  adapters -> {"host": Host, "adapters": [Adapter]}
  reserve/release -> {"host": Host}
  check -> {"ok", "matrix": uuid|null, "adapters", "domains",
            "clashes": [{"apqn", "owner": uuid|"host", "owner_name"}]}
  picture -> {"view": "host", "adapters", "domains", "letters": {uuid: letter},
              "cells": [{"apqn", "owner": uuid|"host"|"free"|"absent"}]}
  picture MATRIX -> {"view": "guest", "matrix": Matrix,
                     "cells": [{"apqn", "assigned", "present", "guest"}]}
  import-mdevctl -> {"imported": [Matrix]}; export-mdevctl -> {"exported": dir}
  libvirt -> {"matrix": uuid, "hostdev": xml, "nodedev": xml}
  apply -> {"changed": bool, "plan": [{"action", "target", "text", "uuid",
            "adapters", "domains", "control_domains"}]} (the keys a step has)
  monitor -> one object per line: {"time", "signal", "path", ...signal data}"""

EXIT_HELP = """\
exit status:
  0 success; 1 refused by apmatrixd (its error printed as one line, e.g.
  'apmatrixctl: Conflict: APQNs already in use: ...'), the daemon not running,
  or check found a clash; 2 usage error (unknown command, bad id)."""

EPILOG = "\n\n".join([IDS_HELP, JSON_HELP, EXIT_HELP])


class Parser(DocumentedParser):
    """argparse, but usage errors name the program once and exit 2 without a traceback."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: {message}\n")


def _idtype(allow_none: bool) -> Any:
    def parse(text: str) -> frozenset[int]:
        try:
            return parse_ids(text, allow_none=allow_none)
        except IdError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "ids"
    return parse


def _common(p: DocumentedParser, top: bool) -> None:
    """Bus and output options, accepted before or after the command."""
    off: Any = False if top else argparse.SUPPRESS
    x = p.exclusive()
    x.add_argument(
        "--address",
        metavar="ADDR",
        default=None if top else argparse.SUPPRESS,
        help="the D-Bus address to use",
    )
    x.add_argument(
        "--system",
        action="store_true",
        default=off,
        help="the system bus (default; honours DBUS_SYSTEM_BUS_ADDRESS)",
    )
    x.add_argument("--session", action="store_true", default=off, help="the session bus")
    p.add_argument(
        "--json",
        action="store_true",
        default=off,
        help="print JSON (its shapes: apmatrixctl --help, or JSON in apmatrixctl(1))",
    )


def build_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p, True)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--print-completion",
        choices=["bash"],
        help="print the shell completion script and exit",
    )
    p.add_argument("--print-man", action="store_true", help="print the man page (roff) and exit")
    p.add_argument("--complete-matrices", action="store_true", help=argparse.SUPPRESS)
    p.subcommands(dest="command", metavar="COMMAND")
    p.on_command = lambda sp: _common(sp, False)
    ids, ids_none = _idtype(False), _idtype(True)
    matrices.register(p, ids, ids_none)
    host.register(p, ids)
    monitor.register(p)
    mdevctl.register(p)
    metrics.register(p)
    apply.register(p)
    return p


async def _run(args: argparse.Namespace, out: Output) -> int:
    target = Target(address=args.address, session=bool(args.session))
    conn = await Connection.open(target)
    try:
        try:
            rc: int = await args.func(conn, args, out)
            return rc
        except CtlError as err:
            if err.proposal is not None and err.name.rsplit(".", 1)[-1] in REFUSALS_DRAWN:
                err.picture = await _picture(conn, err.proposal, out)
            raise
    finally:
        conn.close()


async def _picture(
    conn: Connection, proposal: tuple[frozenset[int], frozenset[int], str], out: Output
) -> list[str]:
    if out.as_json:
        return []
    try:
        return await host.refusal_picture(conn, proposal)
    except CtlError:
        return []


async def _complete(args: argparse.Namespace) -> int:
    conn = await Connection.open(Target(address=args.address, session=bool(args.session)))
    try:
        snap = await conn.snapshot()
    finally:
        conn.close()
    for m in snap.sorted_matrices():
        print(m.name or m.uuid)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output cut short by e.g. `| head`: not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as err:  # the last line of defence: never a traceback
        if os.environ.get("APMATRIXCTL_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_completion:
        from apmatrixd.ctl.docs import bash_completion

        sys.stdout.write(bash_completion(parser))
        return 0
    if args.print_man:
        from apmatrixd.ctl.docs import man_page

        sys.stdout.write(man_page(parser))
        return 0
    if args.complete_matrices:
        try:
            return asyncio.run(_complete(args))
        except CtlError:
            return 1
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print(f"{PROG}: give a COMMAND (see {PROG} --help)", file=sys.stderr)
        return 2
    out = Output(bool(args.json))
    try:
        return asyncio.run(_run(args, out))
    except CtlError as err:
        if out.as_json:  # a script reads stdout: the refusal comes there too, as JSON
            doc = {"error": {"name": err.name or None, "message": str(err), "exit": err.code}}
            print(json.dumps(doc), flush=True)
        print(f"{PROG}: {err}", file=sys.stderr, flush=True)
        for line in err.picture:
            print(line, file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
