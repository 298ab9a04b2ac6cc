"""monitor: follow the daemon's signals live, one line each, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

from dbus_fast import Message, MessageType

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError, unvariant
from apmatrixd.ctl.ids import format_apqns, format_ids
from apmatrixd.ctl.output import Output

DBUS = "org.freedesktop.DBus"


def register(cmds: DocumentedParser) -> None:
    p = cmds.command(
        "monitor",
        help="follow the daemon's signals live, one line each, until Ctrl-C",
        description="Print one line per signal apmatrixd sends (InterfacesAdded, "
        "InterfacesRemoved, PropertiesChanged, Drift) and when it starts or stops, until Ctrl-C. "
        "With --json, one JSON object per line.",
    )
    p.set_defaults(func=cmd_monitor)


def show_value(name: str, value: Any, names_of: dict[str, str] | None = None) -> str:
    if name == "Owners":  # a(us): domain, matrix UUID
        nm = names_of or {}
        return ",".join(f"{d:02x}:{nm.get(u) or u}" for d, u in sorted(value)) or "-"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return format_apqns(tuple(x) for x in value)
    if isinstance(value, list):
        return format_ids(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class Follower:
    def __init__(self, out: Output, labels: dict[str, str], names_of: dict[str, str]) -> None:
        self.out = out
        self.labels = labels  # object path -> "matrix guest1 (uuid)"
        self.names_of = names_of  # UUID -> name, for Owners

    def what(self, path: str) -> str:
        if path in self.labels:
            return self.labels[path]
        if path == names.MANAGER_PATH:
            return "host"
        if path.startswith(names.ADAPTERS_PATH + "/"):
            return "adapter " + path.rsplit("/", 1)[-1]
        uuid = names.uuid_of_path(path)
        return f"matrix {uuid}" if uuid else path

    def emit(self, kind: str, path: str, text: str, data: dict[str, Any]) -> None:
        if self.out.as_json:
            doc = {"time": time.time(), "signal": kind, "path": path, **data}
            self.out.line(json.dumps(doc, sort_keys=False))
        else:
            stamp = time.strftime("%H:%M:%S")
            self.out.line(f"{stamp} {kind:<19} {self.what(path)}{(' ' + text) if text else ''}")

    def on(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        body = [unvariant(x) for x in msg.body]
        if msg.member == "NameOwnerChanged" and msg.interface == DBUS:
            _, old, new = body
            self.emit(
                "NameOwnerChanged",
                names.MANAGER_PATH,
                "apmatrixd started" if new else "apmatrixd stopped",
                {"old_owner": old, "new_owner": new},
            )
            return
        if msg.sender == DBUS or msg.path is None:
            return
        if msg.member == "InterfacesAdded":
            path, ifaces = body
            props = ifaces.get(names.MATRIX_IFACE)
            if props is not None:
                uuid = props.get("Uuid", "")
                name = props.get("Name", "")
                self.labels[path] = f"matrix {name} ({uuid})" if name else f"matrix {uuid}"
                self.names_of[uuid] = name
            text = " ".join(sorted(i.rsplit(".", 1)[-1] for i in ifaces))
            if props is not None:
                text += f" State={props.get('State', '')}"
            self.emit("InterfacesAdded", path, text, {"object": path, "interfaces": ifaces})
            return
        if msg.member == "InterfacesRemoved":
            path, ifaces = body
            text = " ".join(sorted(i.rsplit(".", 1)[-1] for i in ifaces))
            self.emit("InterfacesRemoved", path, text, {"object": path, "interfaces": ifaces})
            self.labels.pop(path, None)
            return
        if msg.member == "PropertiesChanged":
            iface, changed, invalidated = body
            if "Name" in changed and iface == names.MATRIX_IFACE:
                uuid = names.uuid_of_path(msg.path) or ""
                nm = changed["Name"]
                self.labels[msg.path] = f"matrix {nm} ({uuid})" if nm else f"matrix {uuid}"
                self.names_of[uuid] = nm
            text = " ".join(
                f"{k}={show_value(k, v, self.names_of)}" for k, v in sorted(changed.items())
            )
            self.emit(
                "PropertiesChanged",
                msg.path,
                text,
                {"interface": iface, "changed": changed, "invalidated": invalidated},
            )
            return
        if msg.member == "Drift":
            path, what = body
            self.emit("Drift", path, what, {"object": path, "what": what})
            return
        self.emit(str(msg.member), msg.path, show_value(str(msg.member), body), {"body": body})


async def _add_match(conn: Connection, rule: str) -> None:
    reply = await conn.bus.call(
        Message(
            destination=DBUS,
            path="/org/freedesktop/DBus",
            interface=DBUS,
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    if reply is None or reply.message_type == MessageType.ERROR:
        raise CtlError(f"cannot subscribe to signals: {reply.body if reply else 'no reply'}")


async def cmd_monitor(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    snap = await conn.snapshot()  # also: is the daemon there?
    labels = {m.path: f"matrix {m.label}" for m in snap.matrices.values()}
    follower = Follower(out, labels, {m.uuid: m.name for m in snap.matrices.values()})
    await _add_match(conn, f"type='signal',sender='{names.BUS_NAME}'")
    await _add_match(
        conn,
        f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',"
        f"arg0='{names.BUS_NAME}'",
    )

    def handler(msg: Message) -> bool:
        follower.on(msg)
        return False

    conn.bus.add_message_handler(handler)
    # A round trip through the daemon: from here on no signal is missed.
    await conn.call(names.MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping")
    print(
        f"following apmatrixd on {conn.target.describe()}; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    disconnected = asyncio.ensure_future(conn.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    try:
        await asyncio.wait([stop, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        disconnected.cancel()
        with contextlib.suppress(BaseException):
            await disconnected
    if stop.done():
        return 0
    raise CtlError("the connection to the bus was lost")
