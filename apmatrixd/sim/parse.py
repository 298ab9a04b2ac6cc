"""The kernel's text parsers and formatters, byte for byte: kstrtoul, sscanf, the mask grammar.

Every parser takes the raw bytes of one ``write(2)`` (as ``store()`` sees them) and raises
``OSError`` with the errno the kernel returns. Bitmaps are ``frozenset[int]`` of ids; on the
wire they are "left-aligned" hex (id 0 is the most significant bit), as the AP code prints them.
Sources: ``lib/kstrtox.c``, ``lib/vsprintf.c`` (vsscanf, simple_strtoull),
``drivers/s390/crypto/ap_bus.c`` (``ap_hex2bitmap``, ``modify_bitmap``); kernel-facts §1.3, §2.2.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable
from itertools import compress, count

ULONG_MAX = (1 << 64) - 1
AP_BITS = 256

_HEX = b"0123456789abcdefABCDEF"
_HEX_RUN = re.compile(rb"[0-9a-fA-F]*")
_BIT_FLAGS = bytes.maketrans(b"01", b"\x00\x01")
_ID_BIT = [1 << (AP_BITS - 1 - i) for i in range(AP_BITS)]
# Kernel ctype isspace(): the ASCII whitespace plus Latin-1 NBSP (0xa0 is _S|_SP).
_SPACE = b" \t\n\v\f\r\xa0"


def einval(what: str = "Invalid argument") -> OSError:
    """The kernel's favourite answer."""
    return OSError(errno.EINVAL, what)


def cstr(data: bytes) -> bytes:
    """What a C string sees of a sysfs buffer: everything before the first NUL."""
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]


def _digit(c: int) -> int:
    """Value of one digit as ``_parse_integer`` sees it (``_tolower`` is ``c | 0x20``)."""
    if 0x30 <= c <= 0x39:
        return c - 0x30
    low = c | 0x20
    if 0x61 <= low <= 0x66:
        return low - 0x61 + 10
    return 99


def _fixup_radix(s: bytes, pos: int, base: int) -> tuple[int, int]:
    """``_parse_integer_fixup_radix``: base 0 auto-detects 0x (hex) and leading 0 (octal)."""
    if base == 0:
        if pos < len(s) and s[pos] == 0x30:
            nxt = s[pos + 1] if pos + 1 < len(s) else 0
            after = s[pos + 2] if pos + 2 < len(s) else 0
            base = 16 if (nxt | 0x20) == 0x78 and after in _HEX else 8
        else:
            base = 10
    if base == 16 and pos + 1 < len(s) and s[pos] == 0x30 and (s[pos + 1] | 0x20) == 0x78:
        pos += 2
    return base, pos


def _parse_integer(s: bytes, pos: int, base: int) -> tuple[int, int, bool]:
    """``_parse_integer``: (value mod 2**64, end position, overflowed)."""
    value = 0
    overflow = False
    while pos < len(s):
        d = _digit(s[pos])
        if d >= base:
            break
        value = value * base + d
        if value > ULONG_MAX:
            overflow = True
            value &= ULONG_MAX
        pos += 1
    return value, pos, overflow


def kstrtoul(data: bytes, base: int = 0) -> int:
    """``kstrtoul(buf, base)`` on 64-bit: one optional ``+``, one trailing newline.

    ``"47"`` is 47, ``"0x47"`` 71, ``"047"`` octal 39; ``"08"``, ``"-1"``, ``""`` give
    ``EINVAL``; a value beyond ``ULONG_MAX`` gives ``ERANGE`` (checked before trailing junk).
    """
    s = cstr(data)
    pos = 1 if s[:1] == b"+" else 0
    base, pos = _fixup_radix(s, pos, base)
    start = pos
    value, pos, overflow = _parse_integer(s, pos, base)
    if overflow:
        raise OSError(errno.ERANGE, "Numerical result out of range")
    if pos == start:
        raise einval()
    if s[pos : pos + 1] == b"\n":
        pos += 1
    if pos != len(s):
        raise einval()
    return value


def simple_strtoul(s: bytes, pos: int, base: int = 0) -> tuple[int, int]:
    """``simple_strtoul``: no sign, no whitespace, wraps silently; returns (value, end)."""
    base, pos = _fixup_radix(s, pos, base)
    value, end, _ = _parse_integer(s, pos, base)
    return value, end


def sscanf_int(data: bytes, base: int = 10) -> int | None:
    """One ``sscanf(buf, "%d")`` (base 10) or ``"%i"`` (base 0); None when nothing matched.

    Leading whitespace is skipped, a ``-`` is allowed but not a ``+``, trailing text is
    ignored, and the value is truncated to a C ``int``, as the kernel's vsscanf does.
    """
    s = cstr(data)
    pos = 0
    while pos < len(s) and s[pos] in _SPACE:
        pos += 1
    neg = s[pos : pos + 1] == b"-"
    first = s[pos + 1 : pos + 2] if neg else s[pos : pos + 1]
    if not first or not first.isdigit():
        return None
    value, _ = simple_strtoul(s, pos + 1 if neg else pos, base)
    if neg:
        value = -value
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def kstrtobool(data: bytes) -> bool:
    """``kstrtobool``: y/Y/t/T/1/on true, n/N/f/F/0/off false, anything else EINVAL."""
    s = cstr(data)
    c = s[:1]
    if c in (b"y", b"Y", b"t", b"T", b"1"):
        return True
    if c in (b"n", b"N", b"f", b"F", b"0"):
        return False
    if c in (b"o", b"O"):
        nxt = s[1:2]
        if nxt in (b"n", b"N"):
            return True
        if nxt in (b"f", b"F"):
            return False
    raise einval()


def hex2bitmap(text: bytes, nbits: int = AP_BITS) -> frozenset[int]:
    """``ap_hex2bitmap``: optional ``0x`` or ``x``, hex digits filled from the left.

    At most ``nbits / 4`` digits, one trailing newline; anything else is ``EINVAL``.
    ``0x41`` means ids 1 and 7. An empty string is the empty mask.
    """
    s = cstr(text)
    pos = 0
    if s[:2] == b"0x":
        pos = 1
    if s[pos : pos + 1] == b"x":
        pos += 1
    digits = _HEX_RUN.match(s, pos, min(len(s), pos + nbits // 4))
    assert digits is not None  # the pattern matches the empty run too
    run = digits.group()
    pos += len(run)
    if s[pos : pos + 1] == b"\n":
        pos += 1
    if pos != len(s):
        raise einval()
    if not run:
        return frozenset()
    value, width = int(run, 16), 4 * len(run)
    if value.bit_count() <= 24:  # an mdev's few ids: the set bits one by one, highest first
        out = set()
        while value:
            bit = value.bit_length()
            out.add(width - bit)
            value -= 1 << (bit - 1)
        return frozenset(out)
    # The digits at once as a bit string, id 0 leftmost, its 1s picked in C (no Python step
    # per id: a host pool's mask has all 256).
    bits = format(value, f"0{width}b").encode()
    return frozenset(compress(count(), bits.translate(_BIT_FLAGS)))


def modify_bitmap(text: bytes, current: Iterable[int], nbits: int = AP_BITS) -> frozenset[int]:
    """``modify_bitmap``: relative edit ``+N``, ``-N``, ``+A-B``, separated by ``,``/``\\n``.

    Numbers follow ``simple_strtoul(…, 0)`` (decimal, 0x hex, leading-0 octal, wrapping);
    an id >= ``nbits``, ``A > B`` or any stray character is ``EINVAL``; later terms win.
    """
    s = cstr(text)
    ids = set(current)
    pos = 0
    while pos < len(s):
        sign = s[pos]
        pos += 1
        if sign not in (0x2B, 0x2D):
            raise einval()
        a, end = simple_strtoul(s, pos)
        if end == pos or a >= nbits:
            raise einval()
        z = a
        pos = end
        if s[pos : pos + 1] == b"-":
            pos += 1
            z, end = simple_strtoul(s, pos)
            if end == pos or a > z or z >= nbits:
                raise einval()
            pos = end
        span = range(a, z + 1)
        if sign == 0x2B:
            ids.update(span)
        else:
            ids.difference_update(span)
        while pos < len(s) and s[pos] in b",\n":
            pos += 1
    return frozenset(ids)


def parse_mask(text: bytes, current: Iterable[int], nbits: int = AP_BITS) -> frozenset[int]:
    """``ap_parse_bitmap_str``: leading ``+``/``-`` edits ``current``, else absolute hex."""
    s = cstr(text)
    if s[:1] in (b"+", b"-"):
        return modify_bitmap(s, current, nbits)
    return hex2bitmap(s, nbits)


def strsep(rest: bytes | None, delims: bytes) -> tuple[bytes | None, bytes | None]:
    """C ``strsep``: (token, rest); the token is None once the string is used up."""
    if rest is None:
        return None, None
    found = _SEPARATORS.get(delims)
    if found is None:  # one pattern per set of delimiters: the first of any found in C
        found = _SEPARATORS[delims] = re.compile(b"[" + re.escape(delims) + b"]").search
    hit = found(rest)
    if hit is None:
        return rest, None
    cut = hit.start()
    return rest[:cut], rest[cut + 1 :]


_SEPARATORS: dict[bytes, Callable[[bytes], re.Match[bytes] | None]] = {}


def format_mask(ids: Iterable[int], nbits: int = AP_BITS) -> str:
    """``0x`` + left-aligned hex (64 digits for 256 bits), lower case: masks and ap_config."""
    ids = set(ids)
    if ids and (min(ids) < 0 or max(ids) >= nbits):
        ids = {i for i in ids if 0 <= i < nbits}
    # Each id's bit looked up and summed in C (ids are distinct): no Python step per id.
    bit = _ID_BIT.__getitem__ if nbits == AP_BITS else lambda i: 1 << (nbits - 1 - i)
    return f"0x{sum(map(bit, ids)):0{nbits // 4}x}"


def uuid_is_valid(text: bytes) -> bool:
    """``uuid_is_valid``: 36 chars, hyphens at 8/13/18/23, hex elsewhere (any case)."""
    if len(text) < 36:
        return False
    for i in range(36):
        c = text[i]
        if i in (8, 13, 18, 23):
            if c != 0x2D:
                return False
        elif c not in _HEX:
            return False
    return True


def sysfs_streq(data: bytes, name: str) -> bool:
    """``sysfs_streq``: equal, allowing one trailing newline on either side."""
    s = cstr(data)
    if s.endswith(b"\n"):
        s = s[:-1]
    try:
        return s.decode("ascii") == name.removesuffix("\n")
    except UnicodeDecodeError:
        return False
