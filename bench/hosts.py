"""State directories and scenarios the benchmarks start from."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

from apmatrixd.store import Reservations, Store, StoredMatrix, encode


def matrix_uuid(k: int) -> str:
    return str(uuidlib.UUID(int=(0x5EED << 96) | (0x4 << 76) | (0x8 << 60) | k))


def big_state(root: Path, n: int, autostart: bool = True) -> Path:
    """``n`` one-APQN matrices on the big host (adapter k % 256, domain k // 256), stored as
    the daemon stores them, with the domains they use reserved (taken from the host pool).

    The files are the store's own encoding, written plainly rather than durably: they are
    the bench's input, read back from the page cache either way, and 10,000 fsyncs took ~20 s
    of bench time."""
    store = Store(root)
    store.load()  # creates the layout
    used_domains = range(64)  # every size here uses fewer; 50-56 stay free for Check
    store.write_reservations(Reservations().reserve([], used_domains))
    for k in range(n):
        m = StoredMatrix(
            matrix_uuid(k),
            name=f"m{k}",
            adapters=frozenset({k % 256}),
            domains=frozenset({k // 256}),
            control_domains=frozenset({k // 256}),
            autostart=autostart,
        )
        store.matrix_path(m.uuid).write_bytes(encode(m.to_json()))
    return root


HOTPLUG85 = """# apmatrixd bench: two adapters with 85 usage domains each (85 queues a card)
name = "hotplug85"
description = "adapters 05, 06 with 85 usage domains each"
layout = "upstream"
apxa = true
usage_domains = "0-84"

[[adapters]]
id = 0x05
type = "CEX8C"

[[adapters]]
id = 0x06
type = "CEX8C"
"""


def hotplug_scenario(where: Path) -> Path:
    path = where / "hotplug85.toml"
    path.write_text(HOTPLUG85)
    return path
