"""Verbs on the host: adapters, reserve, release, check (a dry run), picture."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError, HostInfo, Snapshot
from apmatrixd.ctl.ids import format_apqn, format_ids
from apmatrixd.ctl.output import Output
from apmatrixd.ctl.picture import GuestPicture, HostPicture, Proposal


def register(cmds: DocumentedParser, idtype: Any) -> None:
    p = cmds.command("adapters", help="list the AP adapters and who holds them")
    p.set_defaults(func=cmd_adapters)

    for verb, what in (
        ("reserve", "take adapters and domains out of the host pool, for matrices"),
        ("release", "give adapters and domains back to the host pool"),
    ):
        p = cmds.command(verb, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("-a", "--adapters", type=idtype, metavar="IDS", help="adapter ids (hex)")
        p.add_argument("-d", "--domains", type=idtype, metavar="IDS", help="domain ids (hex)")
        p.set_defaults(func=cmd_pool, verb=verb)

    p = cmds.command(
        "check",
        help="dry run: would these APQNs be free? names every clash and its owner",
        description="Dry run. Without MATRIX: would a new matrix of ADAPTERS x DOMAINS be "
        "accepted? With MATRIX: would assigning them to it be? Names every clashing APQN and its "
        "owner and draws the proposal over the host. Exit status 1 if it would be refused.",
    )
    p.add_argument("matrix", metavar="MATRIX", nargs="?", help="the matrix that would change")
    p.add_argument("-a", "--adapters", type=idtype, metavar="IDS", help="adapter ids (hex)")
    p.add_argument("-d", "--domains", type=idtype, metavar="IDS", help="domain ids (hex)")
    p.set_defaults(func=cmd_check)

    p = cmds.command(
        "picture",
        help="draw who owns every APQN; with MATRIX, what its guest really gets",
    )
    p.add_argument("matrix", metavar="MATRIX", nargs="?", help="name, UUID or unique UUID prefix")
    p.set_defaults(func=cmd_picture)


def pool_lines(host: HostInfo) -> list[str]:
    kernel = [f"Kernel: vfio_ap {host.kernel_generation}"] if host.kernel_generation else []
    if kernel and host.kernel_features:
        features = f" ({', '.join(host.kernel_features)})"
        if len(kernel[0] + features) <= 80:
            kernel[0] += features
        else:  # one line per 80 columns, as every other line here
            kernel += textwrap.wrap(
                ", ".join(host.kernel_features), 80, initial_indent="  features: ",
                subsequent_indent="            ",
            )  # fmt: skip
    return [
        *kernel,
        f"Layout: {host.layout}; highest adapter id {host.max_adapter_id:02x}, "
        f"highest domain id {host.max_domain_id:02x}",
        f"Host pool: adapters {format_ids(host.host_adapters)}",
        f"           domains  {format_ids(host.host_domains)}",
        # the same line means different things per layout: say which
        "           (apmask/aqmask: ids of absent adapters and domains included)"
        if host.layout == "upstream"
        else "           (queues bound to the host's drivers: present ones only)",
    ]


def boot_lines(host: HostInfo) -> list[str]:
    """chzdev's persistent masks (Manager.BootHostPool), if the host has any."""
    pool = host.boot_host_pool
    if not pool:
        return []
    lines = [f"At boot (chzdev, {pool.get('file', '?')}):"]
    if pool.get("error"):
        return [*lines, f"  not used: the file {pool['error']}"]
    kept = "as the kernel boots (chzdev keeps no {})"
    adapters = pool.get("reserved_adapters")
    domains = pool.get("reserved_domains")
    lines += [
        "  for guests: adapters "
        + (format_ids(adapters) if adapters is not None else kept.format("apmask")),
        "              domains  "
        + (format_ids(domains) if domains is not None else kept.format("aqmask")),
    ]
    return [*lines, *drift_lines(host)]


def drift_lines(host: HostInfo) -> list[str]:
    """Where apmatrixd's reservations and chzdev's persistent masks disagree."""
    where = host.boot_host_pool.get("drift")
    if not where:
        return []
    return textwrap.wrap(
        str(where), 80, initial_indent="  differs from apmatrixd: ", subsequent_indent="    "
    )


async def cmd_adapters(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    ads = [snap.adapters[i] for i in sorted(snap.adapters)]
    if out.as_json:
        out.json({"host": snap.host.json(), "adapters": [a.json() for a in ads]})
        return 0
    out.lines(pool_lines(snap.host))
    out.lines(boot_lines(snap.host))
    out.line()
    rows = []
    for a in ads:
        # names (or short UUIDs): 'show' gives the rest; full labels ran lines to 160 columns
        held = sorted({snap.short_label(u) for u in a.owners.values()})
        rows.append(
            [
                f"{a.id:02x}",
                a.type,
                a.mode,
                "checkstop" if a.checkstopped else "online" if a.online else "offline",
                "yes" if a.configured else "no",
                format_ids(a.domains),
                format_ids(a.guest_domains),
                ", ".join(held) or "-",
            ]
        )
    out.table(["CARD", "TYPE", "MODE", "STATUS", "CONFIG", "DOMAINS", "VFIO", "HELD BY"], rows)
    overridden = [(a.id, d, drv) for a in ads for d, drv in a.overrides]
    if overridden:
        out.line()
        out.line("Queues bound by driver_override (not apmatrixd's to give; masks locked):")
        out.lines([f"  {a:02x}.{d:04x} -> {drv}" for a, d, drv in overridden])
    return 0


async def cmd_pool(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    if args.adapters is None and args.domains is None:
        raise CtlError(f"{args.verb}: give --adapters and/or --domains", code=2)
    await conn.call(
        names.MANAGER_PATH,
        names.MANAGER_IFACE,
        args.verb.capitalize(),
        "auau",
        [sorted(args.adapters or ()), sorted(args.domains or ())],
    )
    host = HostInfo.of(await conn.props(names.MANAGER_PATH, names.MANAGER_IFACE))
    if out.as_json:
        out.json({"host": host.json()})
    else:
        out.lines(pool_lines(host)[-3:])
        if lines := drift_lines(host):  # this change may be what chzdev disagrees with
            out.line(f"At boot (chzdev, {host.boot_host_pool.get('file', '?')}):")
            out.lines(lines)
    return 0


async def check(
    conn: Connection, adapters: frozenset[int], domains: frozenset[int], uuid: str
) -> Proposal:
    (clashes,) = await conn.call(
        names.MANAGER_PATH,
        names.MANAGER_IFACE,
        "Check",
        "auaus",
        [sorted(adapters), sorted(domains), uuid],
    )
    found = {(int(a), int(d)): str(o) for a, d, o in clashes}
    return Proposal(adapters, domains, uuid, found)


def clash_lines(snap: Snapshot, p: Proposal) -> list[str]:
    return [
        f"  {format_apqn(a, d)}  owned by {'the host pool' if o == 'host' else snap.owner_label(o)}"
        for (a, d), o in sorted(p.clashes.items())
    ]


async def refusal_picture(
    conn: Connection, proposal: tuple[frozenset[int], frozenset[int], str]
) -> list[str]:
    """The host with a refused proposal drawn over it (for create, assign, update)."""
    p = await check(conn, *proposal)
    snap = await conn.snapshot()
    return HostPicture(snap, p).lines()


async def cmd_check(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    a, d = args.adapters or frozenset(), args.domains or frozenset()
    uuid = ""
    if args.matrix:
        m = snap.resolve(args.matrix)
        uuid, a, d = m.uuid, m.adapters | a, m.domains | d
    elif not a or not d:
        raise CtlError("check: give --adapters and --domains (or a MATRIX)", code=2)
    p = await check(conn, a, d, uuid)
    ok = not p.clashes
    if out.as_json:
        out.json(
            {
                "ok": ok,
                "matrix": uuid or None,
                "adapters": sorted(a),
                "domains": sorted(d),
                "clashes": [
                    {
                        "apqn": [x, y],
                        "owner": o,
                        "owner_name": snap.matrices[o].name if o in snap.matrices else "",
                    }
                    for (x, y), o in sorted(p.clashes.items())
                ],
            }
        )
        return 0 if ok else 1
    n = len(a) * len(d)
    what = f"adapters {format_ids(a)} x domains {format_ids(d)} ({n} APQN{'s' * (n != 1)})"
    target = f" for {snap.matrices[uuid].label}" if uuid else " for a new matrix"
    if ok:
        out.line(f"OK: {what}{target}: no clash")
    else:
        k = len(p.clashes)
        out.line(f"Refused: {what}{target}: {k} APQN{'s' * (k != 1)} clash")
        out.lines(clash_lines(snap, p))
    out.line()
    out.lines(HostPicture(snap, p).lines())
    return 0 if ok else 1


async def cmd_picture(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()
    pic: HostPicture | GuestPicture
    pic = GuestPicture(snap, snap.resolve(args.matrix)) if args.matrix else HostPicture(snap)
    if out.as_json:
        out.json(pic.json())
    else:
        out.lines(pic.lines())
    return 0
