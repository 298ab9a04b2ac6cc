"""apmatrixd-callout: mdevctl's callout for vfio_ap matrices, asking apmatrixd.

mdevctl runs every program in its callout directories (``/usr/lib/mdevctl/scripts.d/callouts``
in 1.3, ``/etc/mdevctl.d/scripts.d/callouts`` in 1.2) as
``PROG -t TYPE -e EVENT -a ACTION -s STATE -u UUID -p PARENT`` with the device's JSON on stdin,
in name order (1.3; 1.2 takes the directory's order), and the first one that does not exit 2
is the one that answers (and, in 1.3, the first that answers ``get capabilities`` is the only
one asked from then on). So this one is installed as ``00-apmatrixd-callout``, before
s390-tools' ``ap-check``, and:

- ``pre`` of ``define``, ``modify``, ``start`` and ``live`` of ``modify``: apmatrixd decides the
  proposed matrix (ProposeMdevctl) as it decides its own; a refusal is one line naming every
  clashing APQN and its owner, and exit 1 vetoes mdevctl (it writes nothing). A live modify
  is also carried out by apmatrixd: mdevctl 1.3 leaves its sysfs writes to the callout;
- ``post`` of ``define``, ``modify``, ``undefine``: apmatrixd reads the definition (ReloadMdevctl)
  and holds it as an mdevctl-managed matrix;
- ``get attributes``: the live matrix's assignments; ``get capabilities``: what this supports;
- apmatrixd not running (nobody owns its bus name; it is not started for this): exit 2, so the
  next callout (ap-check) still guards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from dbus_fast import BusType, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from apmatrixd import mdevctl
from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names, request
from apmatrixd.core import InvalidArgument
from apmatrixd.core.matrix import normalize_uuid

DEFER = 2
"""mdevctl's "not mine": the next callout is asked."""

PROPOSED = {("pre", "define"), ("pre", "modify"), ("pre", "start"), ("live", "modify")}
RELOADED = {"define", "modify", "undefine"}
CAPABILITIES = {
    "actions": ["define", "modify", "start", "stop", "undefine", "attributes", "capabilities"],
    "events": ["pre", "post", "get", "live"],
}
TIMEOUT = 30.0
NOT_RUNNING = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}


class Deferred(Exception):
    """apmatrixd cannot be asked: leave it to the next callout."""


def parser() -> DocumentedParser:
    p = DocumentedParser(
        prog="apmatrixd-callout",
        description="mdevctl callout: apmatrixd decides what mdevctl does with vfio_ap matrices",
    )
    for flag, dest in (("-t", "type"), ("-e", "event"), ("-a", "action"), ("-s", "state"),
                       ("-u", "uuid"), ("-p", "parent")):  # fmt: skip
        p.add_argument(flag, dest=dest, required=True)
    return p


async def _call(bus: MessageBus, path: str, iface: str, member: str, sig: str = "",
                body: list[Any] | None = None) -> list[Any]:  # fmt: skip
    reply = await request.call(
        bus, path, iface, member, sig, body or [],
        flags=MessageFlag.NO_AUTOSTART,  # apmatrixd not running: defer, do not start it
        timeout=TIMEOUT,
    )  # fmt: skip
    if reply is None:
        raise Deferred("the bus went away")
    if reply.message_type == MessageType.ERROR:
        if reply.error_name in NOT_RUNNING:
            raise Deferred("apmatrixd is not running")
        text = request.error_text(reply.body)
        short = str(reply.error_name).rsplit(".", 1)[-1]
        raise RuntimeError(f"apmatrixd refuses: {short}: {text}" if text else short)
    return list(reply.body)


async def _run(args: argparse.Namespace, stdin: bytes) -> str:
    """What to print on stdout; raises Deferred, RuntimeError (a refusal), InvalidArgument."""
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), TIMEOUT)
    except (OSError, EOFError, TimeoutError, ValueError) as err:
        raise Deferred(f"no system bus ({err})") from None
    try:
        mgr = (bus, names.MANAGER_PATH, names.MANAGER_IFACE)
        event, action = args.event, args.action
        if (event, action) == ("get", "capabilities"):
            await _call(bus, names.MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping")
            return _capabilities(stdin)
        if (event, action) == ("get", "attributes"):
            return await _attributes(bus, args.uuid)
        if (event, action) in PROPOSED:
            d = mdevctl.parse_definition(args.uuid, stdin, Path(f"mdevctl's {args.uuid}"))
            options = {"autostart": Variant("b", d.autostart)}
            what = "live" if event == "live" else action
            body = [what, d.uuid, sorted(d.adapters), sorted(d.domains),
                    sorted(d.control_domains), options]  # fmt: skip
            await _call(*mgr, "ProposeMdevctl", "ssauauaua{sv}", body)
        elif event == "post" and action in RELOADED and args.state == "success":
            await _call(*mgr, "ReloadMdevctl")
        return ""
    finally:
        bus.disconnect()


def _capabilities(stdin: bytes) -> str:
    """The subset of what mdevctl provides that this callout supports (as ap-check does)."""
    try:
        provides = json.loads(stdin or b"{}").get("provides") or {}
    except (ValueError, AttributeError):
        provides = {}
    supports: dict[str, Any] = {"version": 2}
    for key, ours in CAPABILITIES.items():
        theirs = provides.get(key) if isinstance(provides, dict) else None
        supports[key] = [x for x in ours if not isinstance(theirs, list) or x in theirs]
    return json.dumps({"supports": supports})


async def _attributes(bus: MessageBus, uuid: str) -> str:
    """The live matrix's assignments as mdevctl lists attributes ("[]" if none is live)."""
    path = names.matrix_path(normalize_uuid(uuid))
    try:
        (props,) = await _call(bus, path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                               [names.MATRIX_IFACE])  # fmt: skip
    except RuntimeError:
        return "[]"
    if props["State"].value == "defined":
        return "[]"
    attrs = [{"assign_adapter": f"{a}"} for a in props["Adapters"].value]
    attrs += [{"assign_domain": f"{d}"} for d in props["Domains"].value]
    attrs += [{"assign_control_domain": f"{d}"} for d in props["ControlDomains"].value]
    return json.dumps(attrs)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.type not in mdevctl.TYPES:
        return DEFER
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        out = asyncio.run(_run(args, stdin))
    except Deferred:
        return DEFER
    except (RuntimeError, InvalidArgument) as err:
        print(" ".join(str(err).split()), file=sys.stderr)
        return 1
    except Exception as err:  # a veto still, in one line: mdevctl shows it as it is
        print(f"apmatrixd-callout failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
