"""The uevent wire format and its sinks; libudev's own BPF filters are the final judge."""

from __future__ import annotations

import errno
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from fakesysfs import FakeTree
from hypothesis import given
from hypothesis import strategies as st
from rigs import in_netns, need_netns

from apmatrixd.sim.uevent import (
    HEADER_SIZE,
    CollectingSink,
    Sink,
    UmockdevSink,
    attach,
    decode,
    encode,
    murmur2,
    sink_from_spec,
    tag_bloom,
)
from apmatrixd.sim.vfs import Uevent

CONFIG_OFF = Uevent(
    "change",
    "/devices/ap/card05",
    "ap",
    17,
    devtype="ap_card",
    driver="cex4card",
    env={"DEV_TYPE": "000B", "MODALIAS": "ap:t0B", "MODE": "cca", "CONFIG": "0"},
)


def test_murmur2_edge_cases() -> None:
    assert murmur2(b"") == 0
    # every tail length takes its own branch; all must stay 32-bit and differ
    values = {murmur2(b"abcdefg"[:n]) for n in range(1, 8)}
    assert len(values) == 7
    assert all(0 <= v < 2**32 for v in values)


def test_header_layout() -> None:
    msg = encode(CONFIG_OFF, tags=("apmatrixd",))
    assert msg[:8] == b"libudev\0"
    assert struct.unpack_from("!I", msg, 8) == (0xFEEDCAFE,)
    header, props = decode(msg)
    assert header["header_size"] == HEADER_SIZE == header["properties_off"]
    assert header["properties_len"] == len(msg) - HEADER_SIZE
    assert header["subsystem_hash"] == murmur2(b"ap")
    assert header["devtype_hash"] == murmur2(b"ap_card")
    assert header["tag_bloom"] == tag_bloom(["apmatrixd"])
    assert bin(header["tag_bloom"]).count("1") <= 4
    assert props["TAGS"] == props["CURRENT_TAGS"] == ":apmatrixd:"


def test_properties_keep_the_kernel_order_and_add_usec_initialized() -> None:
    _, props = decode(encode(CONFIG_OFF))
    keys = list(props)
    assert keys[:5] == ["ACTION", "DEVPATH", "SUBSYSTEM", "DEVTYPE", "DRIVER"]
    assert props["SEQNUM"] == "17"
    assert props["CONFIG"] == "0"
    assert int(props["USEC_INITIALIZED"]) > 0
    assert "TAGS" not in props


def test_no_devtype_means_zero_hash() -> None:
    header, props = decode(encode(Uevent("add", "/devices/vfio_ap/matrix/x", "mdev", 1)))
    assert header["devtype_hash"] == 0
    assert "DEVTYPE" not in props


def test_mask_value_keeps_its_newline() -> None:
    mask = "0x" + "f" * 64 + "\n"
    event = Uevent("change", "/devices/ap", "ap", 3, env={"APMASK": mask})
    assert decode(encode(event))[1]["APMASK"] == mask


printable = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="="),
    min_size=1,
    max_size=12,
)


@given(
    action=st.sampled_from(["add", "remove", "change", "bind", "unbind"]),
    subsystem=printable,
    devtype=st.none() | printable,
    env=st.dictionaries(
        st.from_regex(r"[A-Z][A-Z_]{0,10}", fullmatch=True).filter(
            lambda k: k not in {"ACTION", "DEVPATH", "SUBSYSTEM", "DEVTYPE", "SEQNUM", "DRIVER"}
        ),
        st.text(st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=20),
        max_size=4,
    ),
    seqnum=st.integers(min_value=1, max_value=2**63),
)
def test_round_trip(
    action: str, subsystem: str, devtype: str | None, env: dict[str, str], seqnum: int
) -> None:
    event = Uevent(action, "/devices/ap/card05", subsystem, seqnum, devtype=devtype, env=env)
    header, props = decode(encode(event))
    expected = event.properties()
    assert {k: props[k] for k in expected} == expected
    assert header["subsystem_hash"] == murmur2(subsystem.encode())


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        decode(b"short")
    with pytest.raises(ValueError):
        decode(b"add@/devices/ap\0ACTION=add\0" + b"\0" * 40)


def test_attach_and_detach() -> None:
    tree = FakeTree()
    sink = CollectingSink()
    detach = attach(tree, sink)
    tree.write("devices/ap/card05/config", b"0\n")
    assert sink.sent == 1
    assert decode(sink.messages[0])[1]["CONFIG"] == "0"
    detach()
    tree.write("devices/ap/card05/config", b"1\n")
    assert sink.sent == 1


def test_a_failing_sink_never_raises_into_the_model() -> None:
    class Broken(Sink):
        def _deliver(self, data: bytes) -> None:
            raise OSError(errno.ENOBUFS, "full")

    sink = Broken()
    sink.send(CONFIG_OFF)
    sink.send(CONFIG_OFF)
    assert (sink.sent, sink.failed) == (0, 2)


def test_umockdev_sink_reaches_live_sockets_and_drops_stale_ones(tmp_path: Path) -> None:
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(str(tmp_path / "event5"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "event7"))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    (tmp_path / "other").write_text("not a socket, not matched")
    sink = UmockdevSink(tmp_path)
    try:
        sink.send(CONFIG_OFF)
        assert decode(live.recv(65536))[1]["CONFIG"] == "0"
        assert not (tmp_path / "event7").exists()
        assert (sink.sent, sink.failed) == (1, 0)
    finally:
        live.close()


def test_umockdev_sink_drops_when_a_reader_is_full(tmp_path: Path) -> None:
    full = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    full.bind(str(tmp_path / "event3"))
    sink = UmockdevSink(tmp_path)
    try:
        for _ in range(200):  # must neither block nor raise
            sink.send(CONFIG_OFF)
        assert sink.failed > 0
        assert sink.sent + sink.failed == 200
    finally:
        full.close()


def test_sink_from_spec(tmp_path: Path) -> None:
    assert sink_from_spec("none") is None
    umock = sink_from_spec(f"umockdev:{tmp_path}")
    assert isinstance(umock, UmockdevSink) and umock.directory == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        sink_from_spec(f"umockdev:{tmp_path}/missing")
    for bad in ("kernel", "umockdev:", "netlink:2", ""):
        with pytest.raises(ValueError):
            sink_from_spec(bad)


# -- real libudev, real netlink, private network namespace -----------------------------------

MONITOR_SCRIPT = r"""
import json, sys, pyudev
from apmatrixd.sim.uevent import NetlinkSink
from apmatrixd.sim.vfs import Uevent

ctx = pyudev.Context()
def monitor(**kw):
    mon = pyudev.Monitor.from_netlink(ctx, source="udev")
    tag = kw.pop("tag", None)
    if kw:
        mon.filter_by(**kw)
    if tag:
        mon.filter_by_tag(tag)
    mon.start()
    return mon

mons = {
    "ap": monitor(subsystem="ap"),
    "ap_queue": monitor(subsystem="ap", device_type="ap_queue"),
    "mdev": monitor(subsystem="mdev"),
    "tagged": monitor(tag="apmatrixd"),
}
sink = NetlinkSink(tags=sys.argv[1:])
events = [
    Uevent("add", "/devices/usb1", "usb", 1),
    Uevent("change", "/devices/ap/card05", "ap", 2, devtype="ap_card", driver="cex4card",
           env={"CONFIG": "0", "MODE": "cca"}),
    Uevent("change", "/devices/ap/card05/05.0004", "ap", 3, devtype="ap_queue",
           env={"ONLINE": "0"}),
    Uevent("add", "/devices/vfio_ap/matrix/6c3e0a7b-6e8c-4cd4-9b3e-6f1b1f6a2f10", "mdev", 4),
]
for ev in events:
    sink.send(ev)
out = {"sent": sink.sent, "failed": sink.failed}
for name, mon in mons.items():
    got = []
    while (dev := mon.poll(0.05)) is not None:
        got.append([dev.action, dev.device_path, dev.properties.get("SEQNUM"),
                    dev.properties.get("CONFIG"), dev.device_type])
    out[name] = got
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def in_private_netns() -> None:
    need_netns()


def _run_monitor(*tags: str) -> dict[str, Any]:
    done = in_netns(MONITOR_SCRIPT, *tags)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.e2e
@pytest.mark.usefixtures("in_private_netns")
def test_pyudev_filters_accept_exactly_the_matching_events() -> None:
    out = _run_monitor()
    assert out["sent"] == 4 and out["failed"] == 0
    assert out["ap"] == [
        ["change", "/devices/ap/card05", "2", "0", "ap_card"],
        ["change", "/devices/ap/card05/05.0004", "3", None, "ap_queue"],
    ]
    assert out["ap_queue"] == [["change", "/devices/ap/card05/05.0004", "3", None, "ap_queue"]]
    assert [e[1] for e in out["mdev"]] == [
        "/devices/vfio_ap/matrix/6c3e0a7b-6e8c-4cd4-9b3e-6f1b1f6a2f10"
    ]
    assert out["tagged"] == []


@pytest.mark.e2e
@pytest.mark.usefixtures("in_private_netns")
def test_tag_bloom_passes_the_tag_filter() -> None:
    out = _run_monitor("apmatrixd", "systemd")
    assert len(out["tagged"]) == 4
