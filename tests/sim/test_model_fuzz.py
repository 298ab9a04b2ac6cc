"""Property tests: any bytes to any attribute, any path string, raise nothing but OSError.

After every write the kernel invariants must still hold: no APQN in two mdevs, no mdev APQN
in the host pool (upstream) or on cex4queue (rfc2017), and every readable file reads.
"""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apmatrixd.sim.model import Host

UUIDS = [f"{i}{i}{i}{i}{i}{i}{i}{i}-{i}{i}{i}{i}-{i}{i}{i}{i}-{i}{i}{i}{i}-" + f"{i}" * 12
         for i in range(1, 4)]  # fmt: skip
INTERESTING = [
    b"0",
    b"1",
    b"4",
    b"5",
    b"6",
    b"0x47",
    b"0xab\n",
    b"255",
    b"256",
    b"-5",
    b"+5",
    b"-0-255",
    b"+0-255",
    b"-4,-0x47",
    b"",
    b"\n",
    b"05.0004",
    b"06.00ff\n",
    b"card05",
    b"change",
    b"0x" + b"f" * 64,
    b"0x06,0x08,0x08\n",
    *(u.encode() for u in UUIDS),
]
DATA = st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=80))


def walk(host: Host, top: str = "") -> list[str]:
    """Every real (non-link) path below ``top``."""
    out = []
    for name in host.listdir(top):
        path = f"{top}/{name}" if top else name
        out.append(path)
        if host.kind(path) == "dir":
            out += walk(host, path)
    return out


def fresh(layout: str) -> Host:
    host = Host.from_name(layout)
    for uuid in UUIDS[:2]:
        host.write(f"{host.mdev_type_dir}/create", uuid.encode())
    return host


def check_invariants(host: Host) -> None:
    assert host.internal_errors == []
    mdevs = list(host.mdevs.values())
    for m1, m2 in itertools.combinations(mdevs, 2):
        assert not (m1.apm & m2.apm and m1.aqm & m2.aqm), (m1, m2)
    for m in mdevs:
        if host.layout == "upstream":
            assert not (m.apm & host.apmask and m.aqm & host.aqmask), m
        else:
            for a in m.apm & host.cards.keys():
                for d in m.aqm & host.usage:
                    assert host.queue_driver(a, d) != "cex4queue", (m, a, d)
    for path in walk(host):
        if host.kind(path) == "file" and host.mode(path) & 0o444:
            host.read(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(["default", "rfc2017"]),
    writes=st.lists(st.tuples(st.integers(min_value=0), DATA), min_size=1, max_size=25),
)
def test_random_writes_only_raise_oserror(layout: str, writes: list[tuple[int, bytes]]) -> None:
    host = fresh(layout)
    targets: list[str] = []
    for pick, data in writes:
        if not targets:  # the tree only changes shape after a successful write
            targets = [p for p in walk(host) if host.kind(p) == "file" and host.mode(p) & 0o200]
        path = targets[pick % len(targets)]
        try:
            host.write(path, data)
            targets = []
        except OSError:
            pass
        assert host.internal_errors == [], (path, data)
    check_invariants(host)


@settings(max_examples=200, deadline=None)
@given(path=st.text(max_size=60), data=st.binary(max_size=20))
def test_any_path_string_only_raises_oserror(path: str, data: bytes) -> None:
    host = Host.from_name("default")
    for op in (host.kind, host.mode, host.listdir, host.readlink, host.read):
        with contextlib.suppress(OSError):
            op(path)
    with contextlib.suppress(OSError):
        host.write(path, data)
    assert host.internal_errors == []


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(
            [
                "bus",
                "ap",
                "devices",
                "card05",
                "05.0004",
                "..",
                ".",
                "",
                "drivers",
                "vfio_ap",
                "matrix",
                "mdev",
                "class",
                "mdev_bus",
                "driver",
                "subsystem",
                "online",
                "x",
            ]
        ),  # fmt: skip
        max_size=8,
    )
)
def test_path_walks_with_links_only_raise_oserror(parts: list[str]) -> None:
    host = fresh("default")
    path = "/".join(parts)
    for op in (host.kind, host.mode, host.listdir, host.readlink, host.read):
        with contextlib.suppress(OSError):
            op(path)
    assert host.internal_errors == []


def test_non_bytes_and_non_str_inputs_are_oserror() -> None:
    host = Host.from_name("default")
    for bad in (None, 5, b"bus"):
        with contextlib.suppress(OSError):
            host.kind(bad)  # type: ignore[arg-type]
    for data in ("5", 5, None):
        with contextlib.suppress(OSError):
            host.write("bus/ap/apmask", data)  # type: ignore[arg-type]
    assert host.internal_errors == []


def test_threads_share_one_host_safely() -> None:
    """The FUSE face is multithreaded: every public method serialises on ``Host.lock``."""
    import threading

    host = fresh("default")
    m1, m2 = (host.mdev_dir(u) for u in UUIDS[:2])
    seen: list[int] = []
    host.subscribe(lambda e: seen.append(e.seqnum))

    def churn(n: int) -> None:
        for i in range(200):
            for path, data in (
                ("bus/ap/apmask", b"-5" if i % 2 else b"+5"),
                (f"{(m1, m2)[n % 2]}/assign_domain", b"0x47"),
                (f"{(m1, m2)[n % 2]}/assign_adapter", b"5"),
                (f"{(m1, m2)[n % 2]}/unassign_adapter", b"5"),
                ("bus/ap/drivers/cex4queue/unbind", b"06.0004"),
                ("bus/ap/drivers_probe", b"06.0004"),
            ):
                with contextlib.suppress(OSError):
                    host.write(path, data)
            host.listdir("bus/ap/drivers/vfio_ap")
            host.read(f"{m1}/guest_matrix")

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    check_invariants(host)
