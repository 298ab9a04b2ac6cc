"""Unprivileged callers: as nobody (``setpriv``, Debian's python3 + dbus-fast in a separate
process), every mutating method is refused with AccessDenied and changes nothing, while every
property, GetManagedObjects, Introspect, Peer.Ping, Check and LibvirtXML work.

The methods are enumerated from the shipped introspection XML: every method there except the
read-only ones named in READ_ONLY is taken for a mutating one, so a method added to the API
is covered (and must be refused to nobody) without touching this test. The dbus-daemon loads
the shipped policy (busrig.PrivateBus) and polkit (the mock) says no to everything.
tests/bus/test_bus.py has the hand-written cases (no interface header, polkit allowing);
this one is the complete sweep.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from busrig import (
    ACCESS_DENIED,
    ADAPTER,
    MANAGER,
    MATRIX,
    NOBODY,
    ROOT,
    XML,
    Client,
    PolkitMock,
    run_client,
    spec,
    v,
)
from relrig import OURS, SimFactory, check_all, path_of

G1 = "11111111-1111-4111-8111-111111111111"
READ_ONLY = {f"{MANAGER}.Check", f"{MANAGER}.CheckWithOptions", f"{MATRIX}.LibvirtXML"}
"""The only methods of ours open to everyone (auth.ACTIONS maps them to None)."""
PATHS = {MANAGER: ROOT, MATRIX: path_of(G1), ADAPTER: f"{ROOT}/adapters/05"}
PROPS = "org.freedesktop.DBus.Properties"


def api() -> dict[str, dict[str, Any]]:
    """{interface: {"methods": {name: in-signature}, "props": [names]}} from the XML."""
    out: dict[str, dict[str, Any]] = {}
    for iface in ET.parse(XML).getroot().iter("interface"):
        out[iface.get("name", "")] = {
            "methods": {
                m.get("name"): "".join(
                    a.get("type", "") for a in m.iter("arg") if a.get("direction", "in") == "in"
                )
                for m in iface.iter("method")
            },
            "props": [p.get("name") for p in iface.iter("property")],
        }
    return out


def args_for(member: str, sig: str, tmp: Path) -> list[Any]:
    """Arguments root could use (so only authorisation stands in the way)."""
    known: dict[str, list[Any]] = {
        "CreateMatrix": ["", {"adapters": v("au", [5, 6]), "domains": v("au", [0x47])}],
        "Reserve": [[7], [8]],
        "Release": [[], [0x47]],
        "ImportMdevctl": [""],  # the daemon's own mdevctl directory
        "ExportMdevctl": [""],
        "Update": [[5], [4], []],
    }
    if member in known:
        return known[member]
    generic = {"u": 6, "s": "", "au": [6], "b": False, "a{sv}": {}, "h": 0}  # h: fd #0
    body, i = [], 0
    while i < len(sig):  # a method added later: plausible values by type
        for token in ("a{sv}", "au", "u", "s", "b", "h"):
            if sig.startswith(token, i):
                body.append(generic[token])
                i += len(token)
                break
        else:
            raise AssertionError(f"{member}: teach args_for the signature {sig!r}")
    return body


def test_nobody_is_refused_every_change_and_reads_everything(
    sim: SimFactory, polkit: PolkitMock, tmp_path: Path
) -> None:
    s = sim()
    tmp_path.chmod(0o755)
    loop = asyncio.new_event_loop()
    arun = loop.run_until_complete  # one loop: the root client lives across the steps

    async def setup() -> Client:
        c = await Client.connect(s.address)
        await c.ok(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        opts = {"adapters": v("au", [5, 6]), "domains": v("au", [4])}
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, _variants(opts)])
        return c

    c = arun(setup())
    the_api = api()
    assert set(PATHS) <= set(the_api)
    changes: list[tuple[str, str, str, str, list[Any]]] = []
    for iface, parts in the_api.items():
        for member, sig in parts["methods"].items():
            if f"{iface}.{member}" not in READ_ONLY:
                changes.append((PATHS[iface], iface, member, sig, args_for(member, sig, tmp_path)))
        for prop in parts["props"]:  # nothing of ours is writable, least of all by nobody
            changes.append((PATHS[iface], PROPS, "Set", "ssv", [iface, prop, v("s", "x")]))
    reads: list[tuple[str, str, str, str, list[Any]]] = [
        (ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", []),
        (ROOT, MANAGER, "Check", "auaus", [[6], [4, 0x47], ""]),
        (path_of(G1), MATRIX, "LibvirtXML", "", []),
        (ROOT, "org.freedesktop.DBus.Peer", "Ping", "", []),
    ]
    for iface, parts in the_api.items():
        path = PATHS[iface]
        reads.append((path, "org.freedesktop.DBus.Introspectable", "Introspect", "", []))
        reads.append((path, PROPS, "GetAll", "s", [iface]))
        reads += [(path, PROPS, "Get", "ss", [iface, p]) for p in parts["props"]]
    mutating = [c_ for c_ in changes if c_[2] != "Set"]
    assert len(mutating) >= 23, mutating  # 9 Manager methods, 14 Matrix methods (today)

    async def state() -> tuple[Any, ...]:
        problems, _ = await check_all(c, s)
        assert problems == []
        return (await c.snapshot(), s.kernel(), s.state_bytes())

    before = arun(state())
    asked = len(polkit.checks())
    # an h argument is a directory nobody opened itself (/tmp: tmp_path is below a 0700 one)
    outs = run_client(
        NOBODY, [spec(s.address, *c_, dirs=["/tmp"] * ("h" in c_[3])) for c_ in changes + reads]
    )
    for call, out in zip(changes, outs[: len(changes)], strict=True):
        assert out["error"] == ACCESS_DENIED, (call[1], call[2], out)
    for call, out in zip(reads, outs[len(changes) :], strict=True):
        assert out["error"] is None, (call[1], call[2], call[4], out)
    assert arun(state()) == before  # nothing changed: registry, kernel, state directory
    # the daemon asked polkit once per mutating method (the bus policy let them through to
    # it), and once more would be a method that reached its handler unasked
    assert len(polkit.checks()) - asked == len(mutating), polkit.checks()[asked:]
    # what nobody read is what root reads
    props = {
        (call[0], call[4][1]): out["body"][0]
        for call, out in zip(reads, outs[len(changes) :], strict=True)
        if call[2] == "Get"
    }

    async def root_reads() -> None:
        for (path, name), value in props.items():
            iface = next(i for i, p in PATHS.items() if p == path)
            got = (await c.props(path, iface))[name]
            assert got == _plain(value), (path, name)

    arun(root_reads())

    # and the same calls as root reach the methods: accepted, or refused by the daemon's rules
    async def as_root() -> None:
        # Remove last, and only one of Remove/RemoveWithOptions: the matrix is gone after it.
        kept = [call for call in mutating if call[2] != "RemoveWithOptions"]
        order = sorted(kept, key=lambda call: call[2] == "Remove")
        for path, iface, member, sig, body in order:
            reply = await c.call(path, iface, member, sig, _variants(body))
            assert reply.error_name in (None, *OURS), (member, reply.error_name, reply.body)
        c.close()

    arun(as_root())
    loop.close()


def _plain(value: Any) -> Any:
    """busclient's JSON (variants as {"$v": [sig, value]}, dict keys as strings) to plain."""
    if isinstance(value, dict):
        if set(value) == {"$v"}:
            return _plain(value["$v"][1])
        return {(int(k) if k.isdigit() else k): _plain(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_plain(x) for x in value]
    return value


def _variants(value: Any) -> Any:
    from dbus_fast import Variant

    if isinstance(value, dict):
        if set(value) == {"$v"}:
            return Variant(value["$v"][0], _variants(value["$v"][1]))
        return {k: _variants(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_variants(x) for x in value]
    return value
