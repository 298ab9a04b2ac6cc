"""Scenario files: the LPAR an emulated host starts as (adapters, domains, limits, masks, layout).

A scenario is TOML. Top-level keys (all optional except ``adapters``)::

    name = "default"                 # defaults to the file stem
    description = "..."
    layout = "upstream"              # or "rfc2017"
    kernel = "6.19"                  # generation (sim/profile.py): 5.15 6.0 6.10 6.12 6.15 6.19
    apxa = true                      # false: limits 63/15, as without the APXA facility
    interrupts = true                # ap_interrupts (false: polled, chzcrypt -p can start it)
    max_adapter_id = 255             # QCI Na (only with apxa), default 255
    max_domain_id = 255              # QCI Nd (only with apxa), default 255
    usage_domains = [0x04, "0x40-0x4f"]   # ints, "a-b" ranges, or one such string
    control_domains = [...]          # default: the usage domains
    apmask = "0xffff"                # kernel ap.apmask= grammar from all-zero; default all ones
    aqmask = "+0-15"

    [[adapters]]
    id = 0x05                        # or ids = "0-255" for many alike
    type = "CEX5C"                   # CEX4..CEX8 + A (accelerator) | C (CCA) | P (EP11)
    online = true
    config = true

A broken file raises ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from apmatrixd.sim.parse import AP_BITS, parse_mask
from apmatrixd.sim.profile import NEWEST, profile

Layout = Literal["upstream", "rfc2017"]

_TYPE_RE = re.compile(r"^CEX([4-8])([ACP])$")
_MODES = {"A": ("Accelerator", "accel"), "C": ("CCA-Coproc", "cca"), "P": ("EP11-Coproc", "ep11")}
# ap_functions bits as lszcrypt names them: S=0x80000000 … A=0x08000000, X=0x04000000, N=APXA.
_FUNCTIONS = {"A": 0x68000000, "C": 0x90000000, "P": 0x84000000}
_APXA_BIT = 0x02000000

_TOP_KEYS = {
    "name",
    "description",
    "layout",
    "kernel",
    "apxa",
    "interrupts",
    "max_adapter_id",
    "max_domain_id",
    "usage_domains",
    "control_domains",
    "apmask",
    "aqmask",
    "adapters",
}
_ADAPTER_KEYS = {"id", "ids", "type", "online", "config", "chkstop"}


@dataclass(frozen=True)
class AdapterSpec:
    """One AP adapter of the LPAR as the scenario describes it at boot."""

    id: int
    type: str = "CEX8C"
    online: bool = True
    config: bool = True
    chkstop: bool = False

    @property
    def generation(self) -> int:
        """4..8 for CEX4..CEX8."""
        return int(self.type[3])

    @property
    def hwtype(self) -> int:
        """AP device type: CEX4 = 10 … CEX8 = 14 (``ap_bus.h``)."""
        return self.generation + 6

    @property
    def mode(self) -> str:
        """lszcrypt's MODE column: Accelerator, CCA-Coproc or EP11-Coproc."""
        return _MODES[self.type[4]][0]

    @property
    def uevent_mode(self) -> str:
        """The ``MODE=`` uevent value: accel, cca or ep11."""
        return _MODES[self.type[4]][1]

    def functions(self, apxa: bool) -> int:
        """The ``ap_functions`` word, consistent with the mode lszcrypt derives from it."""
        return _FUNCTIONS[self.type[4]] | (_APXA_BIT if apxa else 0)


def check_type(text: str) -> str:
    """Validate an adapter type string such as ``CEX8C``; ValueError otherwise."""
    if not _TYPE_RE.match(text):
        raise ValueError(f"adapter type {text!r} is not CEX4..CEX8 followed by A, C or P")
    return text


@dataclass(frozen=True)
class Scenario:
    """An emulated LPAR at boot: what the AP bus scan and vfio_ap would find."""

    name: str
    layout: Layout
    apxa: bool
    max_adapter_id: int
    max_domain_id: int
    adapters: tuple[AdapterSpec, ...]
    usage_domains: frozenset[int]
    control_domains: frozenset[int]
    apmask: frozenset[int]
    aqmask: frozenset[int]
    description: str = ""
    source: str = "<memory>"
    kernel: str = NEWEST
    interrupts: bool = True


def builtin_names() -> list[str]:
    """Names of the scenarios shipped in ``apmatrixd/sim/scenarios``."""
    folder = resources.files("apmatrixd.sim").joinpath("scenarios")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name (``default``, ``rfc2017``, ``big``) or a ``.toml`` file."""
    if name_or_path in builtin_names():
        res = resources.files("apmatrixd.sim").joinpath("scenarios", f"{name_or_path}.toml")
        return parse_scenario(res.read_text("utf-8"), name_or_path, f"<builtin {name_or_path}>")
    path = Path(name_or_path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        known = ", ".join(builtin_names())
        raise ValueError(
            f"{name_or_path}: not a built-in scenario ({known}) nor a readable file: {exc}"
        ) from exc
    return parse_scenario(text, path.stem, str(path))


def parse_scenario(text: str, default_name: str, source: str) -> Scenario:
    """Parse scenario TOML; every problem becomes ``ValueError("<source>: <problem>")``."""
    try:
        return _build(tomllib.loads(text), default_name, source)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _ids(value: Any, what: str, limit: int) -> frozenset[int]:
    """Ids from an int, an ``"a-b"``/``"n"`` string, or a list of those; each <= limit."""
    items = value if isinstance(value, list) else [value]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{what}: {item!r} is not an id")
        if isinstance(item, int):
            lo = hi = item
        elif isinstance(item, str):
            parts = item.split("-")
            if len(parts) not in (1, 2):
                raise ValueError(f"{what}: {item!r} is not an id or a range a-b")
            try:
                lo = int(parts[0].strip(), 0)
                hi = int(parts[-1].strip(), 0)
            except ValueError:
                raise ValueError(f"{what}: {item!r} is not an id or a range a-b") from None
            if lo > hi:
                raise ValueError(f"{what}: range {item!r} runs backwards")
        else:
            raise ValueError(f"{what}: {item!r} is not an id or a range")
        if lo < 0 or hi > limit:
            raise ValueError(f"{what}: {item!r} is outside 0..{limit}")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def _bool(table: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}{key} must be true or false, not {value!r}")
    return value


def _build(data: dict[str, Any], default_name: str, source: str) -> Scenario:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(sorted(unknown))}")
    layout = data.get("layout", "upstream")
    if layout not in ("upstream", "rfc2017"):
        raise ValueError(f"layout must be 'upstream' or 'rfc2017', not {layout!r}")
    kernel = data.get("kernel", NEWEST)
    profile(kernel)  # ValueError naming the generations
    if layout == "rfc2017" and "kernel" in data:
        raise ValueError("kernel applies to the upstream layout only (rfc2017 is its own era)")
    apxa = _bool(data, "apxa", True, "")
    limits = []
    for key, plain in (("max_adapter_id", 63), ("max_domain_id", 15)):
        value = data.get(key, 255 if apxa else plain)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, not {value!r}")
        if apxa and not 0 < value < AP_BITS:
            raise ValueError(f"{key} must be within 1..255, not {value}")
        if not apxa and value != plain:
            raise ValueError(f"{key} is {plain} without APXA (apxa = false), not {value}")
        limits.append(value)
    max_a, max_d = limits

    raw_adapters = data.get("adapters", [])
    if not isinstance(raw_adapters, list):
        raise ValueError("adapters must be an array of tables ([[adapters]])")
    adapters: dict[int, AdapterSpec] = {}
    for n, entry in enumerate(raw_adapters, 1):
        where = f"adapters #{n}: "
        if not isinstance(entry, dict):
            raise ValueError(f"{where}not a table")
        bad = set(entry) - _ADAPTER_KEYS
        if bad:
            raise ValueError(f"{where}unknown key(s): {', '.join(sorted(bad))}")
        if ("id" in entry) == ("ids" in entry):
            raise ValueError(f"{where}give exactly one of id or ids")
        ids = _ids(entry.get("id", entry.get("ids")), f"{where}id", max_a)
        kind = entry.get("type", "CEX8C")
        if not isinstance(kind, str):
            raise ValueError(f"{where}type must be a string")
        try:
            check_type(kind)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        for i in sorted(ids):
            if i in adapters:
                raise ValueError(f"{where}adapter {i:#04x} is listed twice")
            adapters[i] = AdapterSpec(
                id=i,
                type=kind,
                online=_bool(entry, "online", True, where),
                config=_bool(entry, "config", True, where),
                chkstop=_bool(entry, "chkstop", False, where),
            )

    usage = _ids(data.get("usage_domains", []), "usage_domains", max_d)
    control = (
        _ids(data["control_domains"], "control_domains", max_d)
        if "control_domains" in data
        else usage
    )
    masks = []
    for key in ("apmask", "aqmask"):
        if key not in data:
            masks.append(frozenset(range(AP_BITS)))
            continue
        value = data[key]
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string in the ap.{key}= grammar")
        try:
            masks.append(parse_mask(value.encode(), ()))
        except OSError:
            raise ValueError(f"{key} {value!r} is not valid ap.{key}= syntax") from None
    name = data.get("name", default_name)
    description = data.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ValueError("name and description must be strings")
    return Scenario(
        name=name,
        layout=layout,
        apxa=apxa,
        max_adapter_id=max_a,
        max_domain_id=max_d,
        adapters=tuple(adapters[i] for i in sorted(adapters)),
        usage_domains=usage,
        control_domains=control,
        apmask=masks[0],
        aqmask=masks[1],
        description=description,
        source=source,
        kernel=kernel,
        interrupts=_bool(data, "interrupts", True, ""),
    )
