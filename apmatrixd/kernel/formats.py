"""The text formats of AP and vfio_ap sysfs attributes, parsed strictly and written exactly.

Tolerant only of a missing trailing newline: anything else that does not look like what the
kernel prints means we are not talking to the kernel we think, so it raises
:class:`KernelError` with ``EIO`` naming the file, never a bare ``ValueError``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from itertools import compress

from apmatrixd.core.apqn import MAX_ID, Apqn, cross
from apmatrixd.kernel.errors import KernelError

MASK_BITS = MAX_ID + 1
_ID_BIT = [1 << (MASK_BITS - 1 - i) for i in range(MASK_BITS)]
_MASK_RE = re.compile(r"0x[0-9a-f]{64}")
_APQN_RE = re.compile(r"([0-9a-f]{2})\.([0-9a-f]{4})")
_ADAPTER_RE = re.compile(r"([0-9a-f]{2})\.")
_DOMAIN_RE = re.compile(r"\.([0-9a-f]{4})")
_INT_RE = re.compile(r"-?[0-9]+")
_BINARY = f"0{MASK_BITS}b"
_IDS = range(MASK_BITS)
_SPARSE = 24  # up to this many ids set, a step per id is faster than one per bit in C
_BIT_BYTES = bytes.maketrans(b"01", b"\x00\x01")


def malformed(path: str, why: str) -> KernelError:
    return KernelError(errno.EIO, path, "parsing", f"malformed {why}")


def lines_of(text: str, path: str) -> list[str]:
    """Newline-terminated lines; the last newline may be missing, no line may be empty."""
    if text == "":
        return []
    body = text[:-1] if text.endswith("\n") else text
    lines = body.split("\n")
    for n, line in enumerate(lines, 1):
        if not line:
            raise malformed(path, f"empty line {n}")
    return lines


def single_line(text: str, path: str) -> str:
    lines = lines_of(text, path)
    if len(lines) != 1:
        raise malformed(path, f"content (want one line, got {len(lines)})")
    return lines[0]


def parse_int(text: str, path: str) -> int:
    """``"%d\\n"`` attributes (``ap_max_domain_id``, ``config``, ``online``)."""
    line = single_line(text, path)
    if not _INT_RE.fullmatch(line):
        raise malformed(path, f"number {line!r}")
    return int(line)


def parse_bool(text: str, path: str) -> bool:
    value = parse_int(text, path)
    if value not in (0, 1):
        raise malformed(path, f"flag {value} (want 0 or 1)")
    return value == 1


def parse_mask(text: str, path: str) -> frozenset[int]:
    """``0x`` + 64 lower-case hex digits; id 0 is the leftmost bit."""
    return _mask(single_line(text, path), path)


def _mask(word: str, path: str) -> frozenset[int]:
    if not _MASK_RE.fullmatch(word):
        raise malformed(path, f"mask {word!r} (want 0x and 64 hex digits)")
    return mask_ids(int(word[2:], 16))


def mask_ids(mask: int) -> frozenset[int]:
    """The ids of a 256-bit mask as a number (id 0 the most significant bit)."""
    if mask.bit_count() <= _SPARSE:  # an mdev's few: one step per id set
        ids = []
        while mask:
            low = mask & -mask
            ids.append(MASK_BITS - low.bit_length())
            mask ^= low
        return frozenset(ids)
    # Many (a host pool's all 256): printed in binary, its 1s picked in C, no step per id.
    return frozenset(compress(_IDS, format(mask, _BINARY).encode().translate(_BIT_BYTES)))


def parse_ap_config(text: str, path: str) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """An mdev's ``ap_config`` (6.10+): its adapters, domains and control domains, three
    masks on one line, comma-separated."""
    words = single_line(text, path).split(",")
    if len(words) != 3:
        raise malformed(path, f"ap_config (want 3 masks, got {len(words)})")
    a, d, c = (_mask(w, path) for w in words)
    return a, d, c


def format_mask(ids: Iterable[int]) -> str:
    """The absolute form ``apmask``/``aqmask`` take: all 64 digits, so nothing is implied."""
    kept = isinstance(ids, frozenset)
    if kept:
        known = _MASK_TEXT.get(frozenset(ids))  # no copy: frozenset() of one is itself
        if known is not None:
            return known
    unique = frozenset(ids)
    if unique and (min(unique) < 0 or max(unique) > MAX_ID):
        bad = min(unique) if min(unique) < 0 else max(unique)
        raise ValueError(f"id {bad} outside a 256-bit mask")
    # Each id's bit looked up and summed in C (ids are distinct): a host pool's has 256 ids.
    text = f"0x{sum(map(_ID_BIT.__getitem__, unique)):064x}"
    if kept:
        if len(_MASK_TEXT) >= _MASK_TEXTS:
            _MASK_TEXT.clear()
        _MASK_TEXT[unique] = text
    return text


_MASK_TEXT: dict[frozenset[int], str] = {}
"""The text of masks formatted lately: a change formats each of an mdev's three masks before
and after, and two of the three (or, in a group, the member before's) are the same sets."""
_MASK_TEXTS = 128


def parse_ids(text: str, path: str, width: int) -> frozenset[int]:
    """One id per line, ``width`` lower-case hex digits (``control_domains``: ``%04x``)."""
    pattern = re.compile(f"[0-9a-f]{{{width}}}")
    out: set[int] = set()
    for line in lines_of(text, path):
        if not pattern.fullmatch(line):
            raise malformed(path, f"line {line!r} (want {width} hex digits)")
        out.add(int(line, 16))
    return frozenset(out)


def parse_matrix(text: str, path: str) -> tuple[frozenset[int], frozenset[int]]:
    """``matrix`` / ``guest_matrix``: (adapters, domains).

    The kernel prints the full cross product as ``%02x.%04x`` lines, or ``%02x.`` lines when
    only adapters are set, or ``.%04x`` lines when only domains are; never a mixture.
    """
    adapters: set[int] = set()
    domains: set[int] = set()
    apqns: set[Apqn] = set()
    shapes: set[str] = set()
    for line in lines_of(text, path):
        if m := _APQN_RE.fullmatch(line):
            a, d = int(m[1], 16), int(m[2], 16)
            apqns.add(Apqn(a, d))
            adapters.add(a)
            domains.add(d)
            shapes.add("apqn")
        elif m := _ADAPTER_RE.fullmatch(line):
            adapters.add(int(m[1], 16))
            shapes.add("adapter")
        elif m := _DOMAIN_RE.fullmatch(line):
            domains.add(int(m[1], 16))
            shapes.add("domain")
        else:
            raise malformed(path, f"line {line!r} (want AA.DDDD, AA. or .DDDD)")
    if len(shapes) > 1:
        raise malformed(path, "matrix (APQN, adapter-only and domain-only lines mixed)")
    if shapes == {"apqn"} and apqns != set(cross(adapters, domains)):
        raise malformed(path, "matrix (the APQNs are not a full cross product)")
    return frozenset(adapters), frozenset(domains)


def format_id(kind: str, value: int) -> str:
    """Ids for assign_*/unassign_*: explicit hex, since the kernel reads ``47`` as decimal."""
    return f"0x{value:02x}" if kind == "adapter" else f"0x{value:04x}"
