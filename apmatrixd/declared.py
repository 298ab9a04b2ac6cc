"""Declared state: the YAML document that says how a host's AP configuration should look.

::

    reserve: {adapters: ["05", "06"], domains: ["04", "47"]}
    matrices:
      - name: guest1               # the key
        uuid: 0d4c...              # optional; an existing matrix keeps its own
        adapters: ["05", "06"]     # ids as apmatrixctl takes them: "05", "0x47", "4-7", or ints
        domains: ["04"]
        control_domains: ["04"]    # optional (every usage domain is one too)
        autostart: true            # optional, default false
        state: active              # optional: active (live) or defined; default: see ops

Parsing reports every problem of a document at once (one InvalidArgument), so an admin
fixing a fleet's file gets one round trip, not one per typo. JSON is YAML, so either works.
Only plain data is read (``yaml.safe_load`` semantics), no aliases (a small file must not
expand into a large one), at most :data:`MAX_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from apmatrixd.core import InvalidArgument
from apmatrixd.core.apqn import MAX_ID
from apmatrixd.core.ids import IdError, parse_ids
from apmatrixd.core.matrix import normalize_uuid

MAX_BYTES = 1 << 20
"""A host has at most 256 x 256 APQNs; a document describing it fits well within 1 MiB."""

TOP_KEYS = ("reserve", "matrices")
RESERVE_KEYS = ("adapters", "domains")
MATRIX_KEYS = ("name", "uuid", "adapters", "domains", "control_domains", "autostart", "state")
STATES = ("active", "defined")


@dataclass(frozen=True)
class DeclaredMatrix:
    name: str
    uuid: str | None
    adapters: frozenset[int]
    domains: frozenset[int]
    control_domains: frozenset[int]
    autostart: bool
    state: str | None  # "active", "defined", or None: as it is (new ones live)


@dataclass(frozen=True)
class Declaration:
    adapters: frozenset[int]  # to reserve: taken from the host's drivers
    domains: frozenset[int]
    matrices: tuple[DeclaredMatrix, ...]


class _Loader(yaml.SafeLoader):
    """safe_load without aliases: an alias bomb of a few hundred bytes is refused, not grown."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a declared document")
        return super().compose_node(parent, index)


def load(text: str) -> Any:
    """The document's data, or InvalidArgument saying where the YAML is broken."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise InvalidArgument(f"document: larger than {MAX_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader, without aliases
    except yaml.YAMLError as err:
        raise InvalidArgument(f"document: not valid YAML: {' '.join(str(err).split())}") from None


def parse(text: str) -> Declaration:
    """A document as a :class:`Declaration`; every problem named in one InvalidArgument."""
    data = load(text)
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument("document: must be a mapping with reserve and/or matrices")
    _unknown(data, TOP_KEYS, "top level", problems)
    a: frozenset[int] = frozenset()
    d: frozenset[int] = frozenset()
    reserve = data.get("reserve")
    if reserve is not None:
        if not isinstance(reserve, dict):
            problems.append("reserve: must be a mapping with adapters and/or domains")
        else:
            _unknown(reserve, RESERVE_KEYS, "reserve", problems)
            a = _ids(reserve.get("adapters"), "reserve.adapters", problems)
            d = _ids(reserve.get("domains"), "reserve.domains", problems)
    matrices: list[DeclaredMatrix] = []
    raw = data.get("matrices")
    if raw is not None and not isinstance(raw, list):
        problems.append("matrices: must be a list")
        raw = None
    seen_names: dict[str, str] = {}
    seen_uuids: dict[str, str] = {}
    for i, item in enumerate(raw or []):
        m = _matrix(item, f"matrices[{i}]", problems)
        if m is None:
            continue
        where = f"matrices[{i}]"
        if m.name in seen_names:
            problems.append(f"{where}: name {m.name!r} is declared twice ({seen_names[m.name]})")
        seen_names.setdefault(m.name, where)
        if m.uuid is not None:
            if m.uuid in seen_uuids:
                problems.append(f"{where}: uuid {m.uuid} is declared twice ({seen_uuids[m.uuid]})")
            seen_uuids.setdefault(m.uuid, where)
        matrices.append(m)
    if problems:
        raise InvalidArgument("document: " + "; ".join(problems))
    return Declaration(a, d, tuple(matrices))


def _unknown(obj: dict[Any, Any], known: tuple[str, ...], where: str, problems: list[str]) -> None:
    for key in obj:
        if key not in known:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


def _ids(value: Any, where: str, problems: list[str]) -> frozenset[int]:
    """Ids as apmatrixctl takes them: hex strings ("05", "0x47", "4-7", "4,0x47") or ints."""
    if value is None:
        return frozenset()
    items = value if isinstance(value, list) else [value]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            problems.append(f'{where}: {item!r} is not an id (write "05", "0x47" or 5)')
        elif isinstance(item, int):
            if not 0 <= item <= MAX_ID:
                problems.append(f"{where}: id {item} out of 0..{MAX_ID}")
            else:
                out.add(item)
        else:
            try:
                out |= parse_ids(item)
            except IdError as err:
                problems.append(f"{where}: {err}")
    return frozenset(out)


def _matrix(item: Any, where: str, problems: list[str]) -> DeclaredMatrix | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: must be a mapping with name, adapters, domains, ...")
        return None
    name = item.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: needs a name (a non-empty string)")
        name = None
    else:
        where = f"{where} ({name})"
    _unknown(item, MATRIX_KEYS, where, problems)
    uuid = item.get("uuid")
    if uuid is not None:
        try:
            uuid = normalize_uuid(uuid) if isinstance(uuid, str) else normalize_uuid(str(uuid))
        except InvalidArgument as err:
            problems.append(f"{where}: {err}")
            uuid = None
    autostart = item.get("autostart", False)
    if not isinstance(autostart, bool):
        problems.append(f"{where}: autostart must be true or false, not {autostart!r}")
    state = item.get("state")
    if state is not None and state not in STATES:
        problems.append(f"{where}: state must be one of {', '.join(STATES)}, not {state!r}")
    a = _ids(item.get("adapters"), f"{where}.adapters", problems)
    d = _ids(item.get("domains"), f"{where}.domains", problems)
    c = _ids(item.get("control_domains"), f"{where}.control_domains", problems)
    if name is None:
        return None
    return DeclaredMatrix(name, uuid, a, d, c, autostart is True, state)
