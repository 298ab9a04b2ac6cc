"""A method call to apmatrixd from its clients (apmatrixctl, the mdevctl callout): each says
what a failure means to it; the message and the wait are the same."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageFlag
from dbus_fast.aio import MessageBus

from apmatrixd.bus import names


async def call(
    bus: MessageBus,
    path: str,
    iface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    flags: MessageFlag,
    timeout: float,
    unix_fds: Sequence[int] = (),
) -> Message | None:
    """The reply (an error reply too), or None if the connection was lost meanwhile;
    TimeoutError after ``timeout`` seconds."""
    msg = Message(
        destination=names.BUS_NAME,
        path=path,
        interface=iface,
        member=member,
        signature=signature,
        body=list(body),
        flags=flags,
        unix_fds=list(unix_fds),
    )
    return await asyncio.wait_for(bus.call(msg), timeout)


def error_text(body: Sequence[Any]) -> str:
    """An error reply's message ('' if it carries none)."""
    return str(body[0]) if body and isinstance(body[0], str) else ""
