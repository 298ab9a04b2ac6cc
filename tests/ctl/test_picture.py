"""The grid: sparse hosts show what matters, big ones stay within 80 columns."""

from __future__ import annotations

from apmatrixd.ctl.picture import grid, pack


def test_small_grid_keeps_every_id() -> None:
    lines = grid([5, 6], [4, 0x47], lambda a, d: "A" if d == 4 else "#")
    assert lines == ["    04  47", "05   A   #", "06   A   #"]


def test_big_uniform_host_collapses_to_ranges() -> None:
    lines = grid(range(256), range(256), lambda a, d: "#")
    assert lines == ["       00-ff", "00-ff      #"]


def test_checkerboard_pages_within_80_columns() -> None:
    def cell(a: int, d: int) -> str:
        return "AB"[(a + d) % 2] + "!"

    lines = grid(range(4), range(256), cell)
    assert max(map(len, lines)) <= 80
    pages = [ln for ln in lines if ln.startswith("  ")]  # header lines
    assert len(pages) > 1
    shown = {int(x, 16) for ln in pages for x in ln.split()}
    assert shown == set(range(256))  # every domain is on some page


def test_legend_packs_to_width() -> None:
    items = [f"item number {i}" for i in range(20)]
    assert all(len(x) <= 80 for x in pack(items))
