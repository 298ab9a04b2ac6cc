"""D-Bus method calls from a separate process, as any user: JSON in (argv[1]), JSON out.

Runs under Debian's /usr/bin/python3 with a world-readable copy of dbus-fast on PYTHONPATH, so that
``setpriv`` can run it as nobody (the pyenv interpreter under /root is unreadable to nobody).
Variants travel as ``{"$v": [signature, value]}``; ``"dirs"`` lists directories the client
opens itself (as its user) and passes as descriptors, ``h`` values in the body indexing them.
Prints ``{"error": name-or-null, "body": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$v"}:
            sig, inner = value["$v"]
            return Variant(sig, decode(inner))
        return {(int(k) if k.isdigit() else k): decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def encode(value: Any) -> Any:
    if isinstance(value, Variant):
        return {"$v": [value.signature, encode(value.value)]}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


async def call(spec: dict[str, Any]) -> dict[str, Any]:
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in spec.get("dirs", [])]
    bus = await MessageBus(bus_address=spec["address"], negotiate_unix_fd=True).connect()
    try:
        msg = Message(
            destination=spec.get("dest", "org.apmatrix.Apmatrix1"),
            path=spec["path"],
            interface=spec.get("iface"),
            member=spec["member"],
            signature=spec.get("signature", ""),
            body=decode(spec.get("body", [])),
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
            if spec.get("interactive")
            else MessageFlag.NONE,
            unix_fds=fds,
        )
        reply = await bus.call(msg)
        if reply.message_type == MessageType.ERROR:
            return {"error": reply.error_name, "body": encode(reply.body)}
        return {"error": None, "body": encode(reply.body)}
    finally:
        bus.disconnect()
        for fd in fds:
            os.close(fd)


async def main(arg: Any) -> Any:
    """One spec, or a list of them (one process for many calls: python start-up is the cost)."""
    if isinstance(arg, list):
        return [await call(spec) for spec in arg]
    return await call(arg)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
