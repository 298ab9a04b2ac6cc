"""Sysfs formats: exactly what the kernel prints, a missing last newline forgiven, else EIO."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apmatrixd.kernel import KernelError
from apmatrixd.kernel.formats import (
    format_id,
    format_mask,
    parse_ids,
    parse_int,
    parse_mask,
    parse_matrix,
)

P = "devices/vfio_ap/matrix/x/matrix"


def test_mask_leftmost_bit_is_id_zero() -> None:
    text = "0x" + "8" + "0" * 63 + "\n"
    assert parse_mask(text, P) == {0}
    assert parse_mask("0x06" + "0" * 62, P) == {5, 6}  # no trailing newline: fine
    assert parse_mask("0x" + "f" * 64 + "\n", P) == frozenset(range(256))


@given(st.frozensets(st.integers(0, 255)))
def test_mask_round_trip(ids: frozenset[int]) -> None:
    text = format_mask(ids)
    assert len(text) == 66
    assert parse_mask(text + "\n", P) == ids
    # Formatted again from the kept texts, whichever form the ids come in.
    assert format_mask(ids) == format_mask(frozenset(ids)) == format_mask(sorted(ids)) == text
    assert format_mask(ids | {0}) == format_mask(list(ids | {0}))


@pytest.mark.parametrize("bad", [256, -1])
def test_an_id_outside_the_mask_is_refused_every_time(bad: int) -> None:
    for ids in (frozenset({5, bad}), frozenset({5, bad}), [bad]):
        with pytest.raises(ValueError, match=f"id {bad} outside a 256-bit mask"):
            format_mask(ids)


@given(st.integers(0, 2**256 - 1), st.integers(0, 256))
def test_a_mask_reads_the_same_sparse_or_dense(mask: int, keep: int) -> None:
    """Few ids and many are read by different steps: both against the digits themselves."""
    for value in (mask, mask >> keep, mask & ((1 << keep) - 1)):  # many, fewer, few ids
        text = f"0x{value:064x}"
        want = {i for i, bit in enumerate(f"{value:0256b}") if bit == "1"}
        assert parse_mask(text, P) == want


@pytest.mark.parametrize(
    "text",
    ["0x" + "0" * 63, "0x" + "F" * 64, "0X" + "0" * 64, "0x" + "0" * 64 + "\n\n", "", "junk"],
)
def test_mask_malformed_is_eio_naming_the_file(text: str) -> None:
    with pytest.raises(KernelError) as info:
        parse_mask(text, "bus/ap/apmask")
    assert info.value.errno == errno.EIO
    assert info.value.path == "bus/ap/apmask"
    assert "bus/ap/apmask" in str(info.value)


def test_matrix_three_shapes() -> None:
    assert parse_matrix("05.0004\n05.0047\n06.0004\n06.0047\n", P) == ({5, 6}, {4, 0x47})
    assert parse_matrix("05.0004\n06.0004", P) == ({5, 6}, {4})
    assert parse_matrix("05.\n06.\n", P) == ({5, 6}, frozenset())
    assert parse_matrix(".0004\n.00ab\n", P) == (frozenset(), {4, 0xAB})
    assert parse_matrix("", P) == (frozenset(), frozenset())


@pytest.mark.parametrize(
    "text",
    [
        "05.0004\n\n",  # empty line
        "5.0004\n",  # width
        "05.00AB\n",  # upper case
        "05.0004\n06.\n",  # shapes mixed
        "05.0004\n06.0047\n",  # not a cross product
        "05.0004 \n",  # trailing blank
        "\n",
    ],
)
def test_matrix_malformed(text: str) -> None:
    with pytest.raises(KernelError) as info:
        parse_matrix(text, P)
    assert info.value.errno == errno.EIO


def test_ids_and_ints() -> None:
    assert parse_ids("0004\n00ab\n", "x/control_domains", 4) == {4, 0xAB}
    assert parse_ids("05\n06", "x/adapters", 2) == {5, 6}
    assert parse_ids("", "x/control_domains", 4) == frozenset()
    assert parse_int("255\n", "bus/ap/ap_max_domain_id") == 255
    for bad in ("04\n", "4\n0005\n"):
        with pytest.raises(KernelError):
            parse_ids(bad, "x/control_domains", 4)
    with pytest.raises(KernelError):
        parse_int("0xff\n", "bus/ap/ap_max_domain_id")


def test_ids_are_written_in_explicit_hex() -> None:
    # The kernel's kstrtoul(…, 0) would read "47" as decimal 47 and "047" as octal.
    assert format_id("adapter", 5) == "0x05"
    assert format_id("domain", 0x47) == "0x0047"
    assert format_id("control_domain", 0xFF) == "0x00ff"
