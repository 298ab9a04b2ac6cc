"""The kernel parsers, case by case from kernel-facts.md §1.3 and §2.2."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apmatrixd.sim.parse import (
    format_mask,
    hex2bitmap,
    kstrtobool,
    kstrtoul,
    parse_mask,
    sscanf_int,
    strsep,
    uuid_is_valid,
)

ALL = frozenset(range(256))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"47", 47),
        (b"0x47", 71),
        (b"0X47", 71),
        (b"047", 39),
        (b"+5", 5),
        (b"5\n", 5),
        (b"0", 0),
        (b"00", 0),
        (b"0x0", 0),
        (b"0X0", 0),
        (b"18446744073709551615", 2**64 - 1),
        (b"0xffffffffffffffff", 2**64 - 1),
        (b"5\0junk", 5),  # a C string ends at the NUL
    ],
)
def test_kstrtoul_accepts(text: bytes, value: int) -> None:
    assert kstrtoul(text) == value


@pytest.mark.parametrize(
    "text",
    [b"08", b"-1", b"", b"\n", b" 5", b"5 ", b"5\n\n", b"++5", b"+", b"0x", b"0o0", b"abc", b"5x"],
)
def test_kstrtoul_einval(text: bytes) -> None:
    with pytest.raises(OSError) as exc:
        kstrtoul(text)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "text", [b"18446744073709551616", b"0x10000000000000000", b"99999999999999999999999junk"]
)
def test_kstrtoul_erange_before_junk(text: bytes) -> None:
    with pytest.raises(OSError) as exc:
        kstrtoul(text)
    assert exc.value.errno == errno.ERANGE


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_kstrtoul_round_trips_every_form(n: int) -> None:
    assert kstrtoul(str(n).encode()) == n
    assert kstrtoul(hex(n).encode()) == n
    assert kstrtoul(b"0" + oct(n)[2:].encode()) == n


@pytest.mark.parametrize(
    ("text", "base", "value"),
    [
        (b"1", 10, 1),
        (b"  1", 10, 1),
        (b"1junk", 10, 1),
        (b"-0", 10, 0),
        (b"08", 10, 8),
        (b"0x1f", 0, 31),
        (b"010", 0, 8),
        (b"+1", 10, None),  # the kernel's vsscanf takes no '+'
        (b"x", 10, None),
        (b"", 10, None),
        (b"4294967297", 10, 1),  # truncated to a C int
    ],
)
def test_sscanf(text: bytes, base: int, value: int | None) -> None:
    assert sscanf_int(text, base) == value


def test_kstrtobool() -> None:
    assert kstrtobool(b"1") and kstrtobool(b"Y") and kstrtobool(b"on")
    assert not kstrtobool(b"0") and not kstrtobool(b"off") and not kstrtobool(b"n\n")
    with pytest.raises(OSError):
        kstrtobool(b"2")


def test_hex2bitmap_left_aligned() -> None:
    assert hex2bitmap(b"0x41") == {1, 7}
    assert hex2bitmap(b"x41") == {1, 7}
    assert hex2bitmap(b"41\n") == {1, 7}
    assert hex2bitmap(b"") == set()
    assert hex2bitmap(b"\n") == set()
    assert hex2bitmap(b"0x" + b"f" * 64) == ALL
    assert hex2bitmap(b"8" + b"0" * 62 + b"1") == {0, 255}


@given(st.integers(0, 2**256 - 1), st.integers(0, 256), st.integers(1, 64))
def test_hex2bitmap_reads_few_and_many_ids_alike(mask: int, shift: int, digits: int) -> None:
    """Few ids set and many take different steps: each against the digits themselves."""
    for value in (mask, mask >> shift):
        run = f"{value:064x}"[-digits:]
        bits = {4 * i + b for i, c in enumerate(run) for b in range(4) if int(c, 16) >> 3 - b & 1}
        assert hex2bitmap(b"0x" + run.encode()) == bits


@pytest.mark.parametrize("text", [b"0X1", b"0x" + b"0" * 65, b"0xg", b"0xx1", b"1 ", b"0x1\n\n"])
def test_hex2bitmap_einval(text: bytes) -> None:
    with pytest.raises(OSError) as exc:
        hex2bitmap(text)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("text", "current", "result"),
    [
        (b"+0-255,-128", frozenset(), ALL - {128}),
        (b"-5", ALL, ALL - {5}),
        (b"+5\n", frozenset(), {5}),
        (b"+0x10-0x12,+010", frozenset(), {16, 17, 18, 8}),
        (b"-0-255,+3", ALL, {3}),
        (b"+1,,\n,+2", frozenset(), {1, 2}),
        (b"0x41", ALL, {1, 7}),
        (b"", ALL, frozenset()),
        (b"+18446744073709551617", frozenset(), {1}),  # simple_strtoul wraps silently
    ],
)
def test_mask_grammar(text: bytes, current: frozenset[int], result: set[int]) -> None:
    assert parse_mask(text, current) == result


@pytest.mark.parametrize(
    "text", [b"+256", b"+5-4", b"+0-256", b"+ 5", b"+5 ", b"+5,6", b"+08", b"+", b"+5-", b"*5"]
)
def test_mask_grammar_einval(text: bytes) -> None:
    with pytest.raises(OSError) as exc:
        parse_mask(text, frozenset())
    assert exc.value.errno == errno.EINVAL


@given(st.frozensets(st.integers(0, 255)))
def test_format_and_parse_round_trip(ids: frozenset[int]) -> None:
    text = format_mask(ids)
    assert len(text) == 66 and text == text.lower()
    assert hex2bitmap(text.encode()) == ids


def test_format_mask_examples() -> None:
    assert format_mask({5, 6}) == "0x06" + "0" * 62
    assert format_mask({4}) == "0x08" + "0" * 62
    assert format_mask(()) == "0x" + "0" * 64


def test_strsep_like_c() -> None:
    assert strsep(b"a,d\n", b",\n") == (b"a", b"d\n")
    assert strsep(b"d\n", b",\n") == (b"d", b"")
    assert strsep(b"", b",\n") == (b"", None)
    assert strsep(None, b",\n") == (None, None)
    assert strsep(b"a\nb,c", b",\n") == (b"a", b"b,c")  # the first of any delimiter
    assert strsep(b"x]y-z^", b"^-]") == (b"x", b"y-z^")  # no delimiter is a pattern
    assert strsep(b"x.y", b"-") == (b"x.y", None)


def test_uuid_is_valid() -> None:
    assert uuid_is_valid(b"11111111-2222-3333-4444-555555555555")
    assert uuid_is_valid(b"ABCDEF01-2222-3333-4444-555555555555\n")
    assert not uuid_is_valid(b"11111111-2222-3333-4444-55555555555")
    assert not uuid_is_valid(b"11111111-2222-3333-4444+555555555555")
    assert not uuid_is_valid(b"1111111g-2222-3333-4444-555555555555")


def _hex2bitmap_digit_by_digit(text: bytes, nbits: int) -> frozenset[int] | int:
    """``ap_hex2bitmap`` as the kernel loops it, one digit at a time (the errno on EINVAL)."""
    s = text.split(b"\0")[0]
    pos = 2 if s[:2] == b"0x" else (1 if s[:1] == b"x" else 0)
    ids, i = set(), 0
    while pos < len(s) and s[pos : pos + 1] in [bytes([c]) for c in b"0123456789abcdefABCDEF"]:
        if i >= nbits:
            break
        b = int(s[pos : pos + 1], 16)
        ids |= {i + n for n in range(4) if b & (0x08 >> n)}
        i, pos = i + 4, pos + 1
    if s[pos : pos + 1] == b"\n":
        pos += 1
    return frozenset(ids) if pos == len(s) else errno.EINVAL


def test_hex2bitmap_agrees_with_the_kernels_loop() -> None:
    """The emulator parses a mask in one go; random texts answer as the digit loop does."""
    rng = random.Random(19)
    alphabet = b"0123456789abcdefABCDEFxX\n ,g\0"
    texts = [b"0x", b"x", b"0x\n", b"xx1", b"0x" + b"f" * 63 + b"\n"]
    for _ in range(3000):
        texts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 70))))
        digits = bytes(rng.choice(b"0123456789abcdef") for _ in range(rng.randint(0, 66)))
        texts.append(b"0x" + digits + rng.choice([b"", b"\n"]))
    for text in texts:
        for nbits in (256, 16):
            try:
                got: frozenset[int] | int = hex2bitmap(text, nbits)
            except OSError as err:
                got = err.errno
            assert got == _hex2bitmap_digit_by_digit(text, nbits), (text, nbits)
