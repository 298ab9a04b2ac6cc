"""Id parsing: every spelling the kernel's tools use round-trips; junk is exit 2, no traceback."""

from __future__ import annotations

import contextlib
import io
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from apmatrixd.ctl.ids import IdError, format_ids, parse_ids, runs
from apmatrixd.ctl.main import main

ids_sets = st.frozensets(st.integers(0, 255), min_size=1, max_size=40)


@st.composite
def spelled(draw: st.DrawFn, ids: frozenset[int]) -> str:
    """``ids`` written as an admin might: 5, 05, 0x5, 0X05, AB, ranges, any order."""

    def one(i: int) -> str:
        digits = draw(st.sampled_from([f"{i:x}", f"{i:02x}", f"{i:04x}", f"{i:02X}"]))
        return draw(st.sampled_from(["", "0x", "0X"])) + digits

    items = []
    for lo, hi in runs(ids):
        if hi > lo and draw(st.booleans()):
            items.append(f"{one(lo)}-{one(hi)}")
        else:
            items.extend(one(i) for i in range(lo, hi + 1))
    return ",".join(draw(st.permutations(items)))


@given(st.data())
def test_any_valid_spelling_round_trips(data: st.DataObject) -> None:
    ids = data.draw(ids_sets)
    text = data.draw(spelled(ids))
    assert parse_ids(text) == ids
    assert parse_ids(format_ids(ids)) == ids


def test_examples() -> None:
    assert parse_ids("5") == parse_ids("05") == parse_ids("0x05") == {5}
    assert parse_ids("47") == {0x47}  # hex, as lszcrypt prints it
    assert parse_ids("0b1") == {0xB1}  # hex digits, not a binary prefix
    assert parse_ids("4-7") == {4, 5, 6, 7}
    assert parse_ids("4,0x47") == {4, 0x47}
    assert parse_ids("none", allow_none=True) == frozenset()
    assert format_ids({4, 5, 6, 7, 0x47, 0xAB, 0xAC}) == "04-07,47,ab,ac"
    assert format_ids([]) == "-"
    for bad in ("", "x", "100", "7-4", "4,", "0x", "1-2-3", "none", "4 5", "-1", "0xg"):
        try:
            parse_ids(bad)
        except IdError:
            continue
        raise AssertionError(bad)


GRAMMAR = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,4}(?:-(?:0[xX])?[0-9a-fA-F]{1,4})?")


def reference(text: str) -> bool:
    """Independent judge of the grammar: syntax by regex, then values and order."""
    for item in text.split(","):
        item = item.strip()
        if not GRAMMAR.fullmatch(item):
            return False
        ends = [int(x, 16) for x in item.split("-")]
        if any(e > 255 for e in ends) or ends != sorted(ends):
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX,- gq\t", max_size=12) | st.text(max_size=8))
@example("0- 0")  # once accepted: the range's ends were stripped one by one
@example("0 -0")
def test_junk_is_exit_2_without_traceback(text: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["--address", "unix:path=/nonexistent/bus", "check", "-a", text, "-d", "4"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = int(exc.code or 0)
    assert "Traceback" not in err.getvalue()
    # Valid ids get as far as the bus (which is not there: exit 1); junk stops at exit 2.
    want = 1 if (text.strip() and not text.startswith("-") and reference(text)) else 2
    assert rc == want, (text, err.getvalue())
