"""Verbs on matrices: list, show, create, remove, start, stop, assign, unassign, update,
configure, libvirt."""

from __future__ import annotations

import argparse
from typing import Any

from dbus_fast import Variant

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError, MatrixInfo
from apmatrixd.ctl.ids import format_ids
from apmatrixd.ctl.output import Output, matrix_block


def register(cmds: DocumentedParser, idtype: Any, idtype_none: Any) -> None:
    p = cmds.command("list", help="list the matrices")
    p.set_defaults(func=cmd_list)

    p = cmds.command("show", help="show one matrix")
    p.add_argument("matrix", metavar="MATRIX", help="name, UUID or unique UUID prefix")
    p.set_defaults(func=cmd_show)

    p = cmds.command(
        "create",
        help="define a matrix and start it (a refused one is drawn)",
        description="Define a matrix and, unless --no-start, make it live at once. All or "
        "nothing; a refused proposal is drawn over the host's picture with the clashes marked.",
    )
    p.add_argument("name", metavar="NAME", nargs="?", default="", help="the admin's name for it")
    p.add_argument("--uuid", default="", help="the mdev UUID (default: a new one)")
    _sets(p, idtype)
    p.add_argument("--autostart", action="store_true", help="start it when the daemon starts")
    p.add_argument("--no-start", action="store_true", help="only define it (State 'defined')")
    p.add_argument(
        "--no-control-usage-domains",
        action="store_true",
        help="do not make every usage domain a control domain too",
    )
    p.set_defaults(func=cmd_create)

    for verb, what in (
        ("remove", "stop if live, then forget a matrix"),
        ("start", "make a defined matrix live in the kernel"),
        ("stop", "take a live matrix out of the kernel, keeping its definition"),
        (
            "take-over",
            "make a matrix mdevctl manages, or an mdev made outside apmatrixd, apmatrixd's",
        ),
    ):
        p = cmds.command(verb, help=what)
        p.add_argument(
            "matrix",
            metavar="MATRIX",
            nargs="+",
            help="name, UUID or unique UUID prefix (several: one after the other, stopping at "
            "the first refusal)",
        )
        if verb in ("stop", "remove"):
            p.add_argument(
                "--force",
                action="store_true",
                help="take it from a running guest (6.0+: the kernel asks QEMU to let go)",
            )
            p.add_argument(
                "--timeout",
                type=int,
                metavar="SECONDS",
                help="with --force: how long to wait for the guest (default: the daemon's)",
            )
        p.set_defaults(func=cmd_lifecycle, verb=verb)

    for verb, what in (
        ("assign", "add adapters, domains, control domains (all at once, or none)"),
        (
            "unassign",
            "drop adapters, domains, control domains (a usage domain dropped is "
            "dropped as a control domain too)",
        ),
        ("update", "replace the given sets (atomic); 'none' empties a set"),
    ):
        p = cmds.command(verb, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("matrix", metavar="MATRIX", help="name, UUID or unique UUID prefix")
        _sets(p, idtype_none if verb == "update" else idtype)
        p.set_defaults(func=cmd_change, verb=verb)

    what = "rename a matrix or change its autostart (no APQN changes)"
    p = cmds.command("configure", help=what, description=what[0].upper() + what[1:] + ".")
    p.add_argument("matrix", metavar="MATRIX", help="name, UUID or unique UUID prefix")
    p.add_argument("--name", help="the new name ('' for none)")
    p.add_argument("--autostart", choices=("yes", "no"), help="start it at boot")
    p.set_defaults(func=cmd_configure)

    p = cmds.command(
        "libvirt",
        help="print the matrix's <hostdev> for a libvirt domain (--nodedev: its node device)",
        description="Print the <hostdev mode='subsystem' type='mdev' model='vfio-ap'> element "
        "that gives a libvirt domain this matrix (paste it into <devices>, or 'virsh "
        "attach-device DOMAIN FILE'); with --nodedev, the node device XML 'virsh "
        "nodedev-define FILE' takes to define the same matrix through libvirt and mdevctl.",
    )
    p.add_argument("matrix", metavar="MATRIX", help="name, UUID or unique UUID prefix")
    p.add_argument(
        "--nodedev", action="store_true", help="the node device XML for virsh nodedev-define"
    )
    p.set_defaults(func=cmd_libvirt)


def _sets(p: argparse.ArgumentParser, idtype: Any) -> None:
    p.add_argument("-a", "--adapters", type=idtype, metavar="IDS", help="adapter ids (hex)")
    p.add_argument("-d", "--domains", type=idtype, metavar="IDS", help="usage domain ids (hex)")
    p.add_argument(
        "-c", "--control-domains", type=idtype, metavar="IDS", help="control domain ids (hex)"
    )


def _ids(x: frozenset[int] | None) -> list[int]:
    return sorted(x or ())


def print_matrix(out: Output, m: MatrixInfo) -> None:
    if out.as_json:
        out.json(m.json())
    else:
        out.lines(matrix_block(m))


async def cmd_list(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    ms = snap.sorted_matrices()
    if out.as_json:
        out.json({"matrices": [m.json() for m in ms]})
        return 0
    if not ms:
        out.line("no matrices (create one with: apmatrixctl create NAME -a IDS -d IDS)")
        return 0
    out.table(
        ["NAME", "UUID", "STATE", "MANAGER", "ADAPTERS", "DOMAINS", "CONTROL", "APQNS", "GUEST"],
        [
            [
                m.name or "-",
                m.uuid,
                m.state,
                m.manager,
                format_ids(m.adapters),
                format_ids(m.domains),
                format_ids(m.control_domains),
                str(len(m.apqns)),
                str(len(m.guest_apqns)),
            ]
            for m in ms
        ],
    )
    return 0


async def cmd_show(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    print_matrix(out, snap.resolve(args.matrix))
    return 0


async def cmd_create(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    opts: dict[str, Variant] = {
        "adapters": Variant("au", _ids(args.adapters)),
        "domains": Variant("au", _ids(args.domains)),
        "control_domains": Variant("au", _ids(args.control_domains)),
        "name": Variant("s", args.name),
        "autostart": Variant("b", bool(args.autostart)),
        "start": Variant("b", not args.no_start),
        "control_usage_domains": Variant("b", not args.no_control_usage_domains),
    }
    proposal = (frozenset(args.adapters or ()), frozenset(args.domains or ()), "")
    (path,) = await conn.call(
        names.MANAGER_PATH,
        names.MANAGER_IFACE,
        "CreateMatrix",
        "sa{sv}",
        [args.uuid, opts],
        proposal=proposal,
    )
    snap = await conn.snapshot()
    m = next((x for x in snap.matrices.values() if x.path == path), None)
    if m is None:
        raise CtlError(f"created {path}, but it is already gone")
    print_matrix(out, m)
    return 0


async def cmd_lifecycle(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    ms = [snap.resolve(ref) for ref in args.matrix]  # every name known before any change
    force, timeout = getattr(args, "force", False), getattr(args, "timeout", None)
    if timeout is not None and (not force or timeout < 1):
        raise CtlError("--timeout needs --force and at least 1 second", 2)
    for m in ms:
        if force:
            opts = {"force": Variant("b", True)}
            if timeout is not None:
                opts["timeout"] = Variant("u", timeout)
            method = f"{args.verb.capitalize()}WithOptions"
            await conn.call(m.path, names.MATRIX_IFACE, method, "a{sv}", [opts])
        else:
            method = args.verb.title().replace("-", "")
            await conn.call(m.path, names.MATRIX_IFACE, method)
        if args.verb == "remove" and not out.as_json:
            out.line(f"removed {m.label}")
    if args.verb == "remove":
        if out.as_json:
            docs = [m.json() for m in ms]
            out.json({"removed": docs[0] if len(docs) == 1 else docs})
        return 0
    now = (await conn.snapshot()).matrices
    after = [now.get(m.uuid, m) for m in ms]
    if out.as_json:
        out.json(after[0].json() if len(after) == 1 else {"matrices": [m.json() for m in after]})
    else:
        for m in after:
            by = f", managed by {m.manager}" if m.manager != "apmatrixd" else ""
            out.line(f"{m.label}: {m.state}{by}")
    return 0


async def cmd_configure(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    options: dict[str, Variant] = {}
    if args.name is not None:
        options["name"] = Variant("s", args.name)
    if args.autostart is not None:
        options["autostart"] = Variant("b", args.autostart == "yes")
    if not options:
        raise CtlError("configure: give --name and/or --autostart", code=2)
    m = (await conn.snapshot()).resolve(args.matrix)
    await conn.call(m.path, names.MATRIX_IFACE, "Configure", "a{sv}", [options])
    print_matrix(out, (await conn.snapshot()).matrices.get(m.uuid, m))
    return 0


MODES = {"assign": "add", "unassign": "remove", "update": "set"}


async def cmd_change(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    """The daemon applies the change to the sets as they are when it runs (UpdateWithOptions
    with mode add/remove/set and only the sets given): two admins' changes both land."""
    given = {
        k: v
        for k, v in (
            ("adapters", args.adapters),
            ("domains", args.domains),
            ("control_domains", args.control_domains),
        )
        if v is not None
    }
    if not given:
        raise CtlError(
            f"{args.verb}: give at least one of --adapters, --domains, --control-domains", code=2
        )
    snap = await conn.snapshot()
    m = snap.resolve(args.matrix)
    a, d, c = (sorted(given.get(k, ())) for k in ("adapters", "domains", "control_domains"))
    # what the change would hold, for the picture drawn with a refusal
    a_new = set(m.adapters) | set(a) if args.verb != "unassign" else set(m.adapters) - set(a)
    if args.verb == "update" and "adapters" in given:
        a_new = set(a)
    d_new = set(m.domains) | set(d) if args.verb != "unassign" else set(m.domains) - set(d)
    if args.verb == "update" and "domains" in given:
        d_new = set(d)
    options = {"mode": Variant("s", MODES[args.verb]), "sets": Variant("as", sorted(given))}
    await conn.call(
        m.path,
        names.MATRIX_IFACE,
        "UpdateWithOptions",
        "auauaua{sv}",
        [a, d, c, options],
        proposal=(frozenset(a_new), frozenset(d_new), m.uuid),
    )
    after = (await conn.snapshot()).matrices.get(m.uuid, m)
    print_matrix(out, after)
    kept = _kept_control_domains(args.verb, given, after)
    if kept and not out.as_json:
        out.line(
            f"note: control domains {format_ids(kept)} stay: they are usage domains of this "
            "matrix, and its usage domains are control domains too (created so; see "
            "'create --no-control-usage-domains')"
        )
    return 0


def _kept_control_domains(verb: str, given: dict[str, Any], after: MatrixInfo) -> set[int]:
    """Control domains the caller asked to drop that the matrix keeps as usage domains."""
    if not after.control_usage_domains or "control_domains" not in given:
        return set()
    asked, now = set(given["control_domains"]), set(after.control_domains)
    if verb == "unassign":
        kept = asked & now
    elif verb == "update":
        kept = now - asked
    else:
        return set()
    return kept & set(after.domains)


async def cmd_libvirt(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    m = (await conn.snapshot()).resolve(args.matrix)
    hostdev, nodedev = await conn.call(m.path, names.MATRIX_IFACE, "LibvirtXML")
    if out.as_json:
        out.json({"matrix": m.uuid, "hostdev": hostdev, "nodedev": nodedev})
    else:
        out.lines(str(nodedev if args.nodedev else hostdev).splitlines())
    return 0
