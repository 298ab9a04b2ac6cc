"""Who may change what: uid 0, or whatever polkit says. Deny by default, fail closed.

One table (:data:`ACTIONS`) maps every D-Bus method to a polkit action, or to ``None`` for the
read-only methods everyone may call. A method missing from the table is refused: a new method
cannot become public by accident.

Caller identity comes from the message being dispatched: apmatrixd dispatches its own
methods (:class:`apmatrixd.bus.base.Dispatcher`) and hands each call's message to
:meth:`Authority.authorise`, so the sender, interface and member judged are those of the call
that runs, never a remembered one.
"""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from apmatrixd.bus import names

log = logging.getLogger(__name__)

ACTIONS: dict[str, str | None] = {
    f"{names.MANAGER_IFACE}.CreateMatrix": names.ACTION_MANAGE,
    # Matrices and the host pool together: an action of its own, so that allowing `manage`
    # alone never lets a caller reserve. A check (dry run) is the same method and action: the
    # authoriser judges the method before reading any argument.
    f"{names.MANAGER_IFACE}.Apply": names.ACTION_APPLY,
    f"{names.MANAGER_IFACE}.Check": None,
    f"{names.MANAGER_IFACE}.CheckWithOptions": None,
    f"{names.MANAGER_IFACE}.Reserve": names.ACTION_RESERVE,
    f"{names.MANAGER_IFACE}.ReserveWithOptions": names.ACTION_RESERVE,
    f"{names.MANAGER_IFACE}.Release": names.ACTION_RESERVE,
    f"{names.MANAGER_IFACE}.ReleaseWithOptions": names.ACTION_RESERVE,
    f"{names.MANAGER_IFACE}.ImportMdevctl": names.ACTION_IMPORT,
    f"{names.MANAGER_IFACE}.ImportMdevctlFd": names.ACTION_IMPORT,
    f"{names.MANAGER_IFACE}.ExportMdevctl": names.ACTION_EXPORT,
    f"{names.MANAGER_IFACE}.ExportMdevctlFd": names.ACTION_EXPORT,
    # mdevctl's callout (run by mdevctl as root): what mdevctl may do is a change decision
    f"{names.MANAGER_IFACE}.ProposeMdevctl": names.ACTION_MANAGE,
    f"{names.MANAGER_IFACE}.ReloadMdevctl": names.ACTION_MANAGE,
    f"{names.MATRIX_IFACE}.LibvirtXML": None,
    **{
        f"{names.MATRIX_IFACE}.{m}": names.ACTION_MANAGE
        for m in (
            "AssignAdapter",
            "UnassignAdapter",
            "AssignDomain",
            "UnassignDomain",
            "AssignControlDomain",
            "UnassignControlDomain",
            "Update",
            "UpdateWithOptions",
            "Configure",
            "Start",
            "Stop",
            "Remove",
            "StopWithOptions",
            "RemoveWithOptions",
            "TakeOver",
        )
    },
}
"""``Interface.Member`` -> polkit action id; None: anyone; absent: refused to all, root too."""

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 1
POLKIT_TIMEOUT = 30.0
"""Seconds to wait for polkit without an agent; D-Bus callers give up after 25 s anyway."""
POLKIT_INTERACTIVE_TIMEOUT = 300.0
"""With interaction the admin may be typing a password."""

_NAME_LOST_MATCH = (
    "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg2=''"
)


_UNREACHABLE = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Timeout",
    }
)


def denied(text: str) -> DBusError:
    return DBusError(names.ACCESS_DENIED, text)


def _calls(msg: Message, member: str) -> bool:
    """``msg`` is a method call of ``member`` (``Interface.Member``; no interface: the
    member alone must match)."""
    interface, _, name = member.rpartition(".")
    return (
        msg.message_type == MessageType.METHOD_CALL
        and msg.interface in (None, interface)
        and msg.member == name
    )


class Authority:
    """Authorises method calls on one bus connection (uid cache + polkit)."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._uids: dict[str, int] = {}

    async def install(self) -> None:
        """Forget callers that leave the bus (their unique name is dead, and may be reused)."""
        self._bus.add_message_handler(self._on_message)
        reply = await self._bus_daemon("AddMatch", _NAME_LOST_MATCH)
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"AddMatch failed: {reply.error_name}: {reply.body}")

    async def _bus_daemon(self, member: str, arg: str) -> Message:
        """One call to the bus daemon itself (every one we make takes a single string)."""
        return await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature="s",
                body=[arg],
            )
        )

    def _on_message(self, msg: Message) -> bool:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and len(msg.body) == 3
            and not msg.body[2]
        ):
            self._uids.pop(msg.body[0], None)
        return False  # never swallow: normal dispatch goes on

    async def uid_of(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        reply = await self._bus_daemon("GetConnectionUnixUser", sender)
        if reply.message_type == MessageType.ERROR:
            raise denied(f"cannot tell who {sender} is")
        uid = int(reply.body[0])
        self._uids[sender] = uid
        return uid

    def allowed_now(self, msg: Message, member: str) -> bool:
        """True when :meth:`authorise` would let ``msg`` call ``member`` without asking
        anyone: the method needs no action, or its sender is root as already known. False
        says nothing: :meth:`authorise` decides (it asks, or refuses and says why)."""
        if not _calls(msg, member) or member not in ACTIONS:
            return False
        return ACTIONS[member] is None or (bool(msg.sender) and self._uids.get(msg.sender) == 0)

    async def authorise(self, msg: Message, member: str) -> None:
        """Raise AccessDenied (or InteractiveAuthorizationRequired) unless the sender of
        ``msg`` may call ``member`` (``Interface.Member``, which ``msg`` must name)."""
        if not _calls(msg, member):
            log.error("authorising %s for a message that calls %s.%s: refused", member,
                      msg.interface, msg.member)  # fmt: skip
            raise denied(f"{member}: the call does not match the method")
        if member not in ACTIONS:
            log.error("no authorisation rule for %s: refused", member)
            raise denied(f"no authorisation rule for {member}")
        action = ACTIONS[member]
        if action is None:
            return
        if msg is None or not msg.sender:
            raise denied("caller unknown")
        if await self.uid_of(msg.sender) == 0:
            return
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        await self._polkit(msg.sender, action, interactive)

    async def _polkit(self, sender: str, action: str, interactive: bool) -> None:
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        call = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, {}, CHECK_ALLOW_USER_INTERACTION if interactive else 0, ""],
        )
        timeout = POLKIT_INTERACTIVE_TIMEOUT if interactive else POLKIT_TIMEOUT
        try:
            reply = await asyncio.wait_for(self._bus.call(call), timeout)
        except (TimeoutError, OSError, DBusError) as exc:
            log.warning("polkit unreachable for %s (%s): refused", action, exc)
            raise denied(f"not authorized: {action} (polkit unreachable)") from None
        if reply.message_type == MessageType.ERROR:
            why = "unreachable" if reply.error_name in _UNREACHABLE else "error"
            log.warning("polkit %s (%s) for %s: refused", why, reply.error_name, action)
            raise denied(f"not authorized: {action} (polkit {why})")
        try:
            is_authorized, is_challenge, _details = reply.body[0]
        except (TypeError, ValueError, IndexError):
            raise denied(f"not authorized: {action} (bad polkit reply)") from None
        if is_authorized:
            return
        if is_challenge and not interactive:
            raise DBusError(
                names.INTERACTIVE_AUTH_REQUIRED,
                f"not authorized: {action} (interactive authorization required)",
            )
        raise denied(f"not authorized: {action}")
