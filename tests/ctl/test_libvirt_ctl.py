"""Matrix.LibvirtXML on the bus and ``apmatrixctl libvirt``: what a caller gets is the XML of the
matrix as its properties show it, valid for libvirt, readable by anyone."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from busrig import MATRIX, NAME, NOBODY, ROOT, Daemon, busctl, busctl_json, call_as
from ctlrig import ctl, ok
from rigs import need_tool

from apmatrixd import libvirt

G1 = "11111111-1111-4111-8111-111111111111"
P1 = f"{ROOT}/matrices/{G1.replace('-', '_')}"


def guest1(a: str) -> None:
    ok(a, "reserve", "-a", "5,6", "-d", "4,47")
    ok(a, "create", "guest1", "--uuid", G1, "-a", "5,6", "-d", "4")


def attrs(nodedev: str) -> list[tuple[str, str]]:
    return [(str(x.get("name")), str(x.get("value"))) for x in ET.fromstring(nodedev).iter("attr")]


def test_libvirt_xml_is_a_read_for_everyone_from_the_properties(daemon: Daemon) -> None:
    a = daemon.address
    guest1(a)
    # busctl, as root and as nobody (reads need no polkit): the same two texts
    out = busctl_json(a, "call", NAME, P1, MATRIX, "LibvirtXML")
    assert out["type"] == "ss"
    hostdev, nodedev = out["data"]
    assert hostdev == libvirt.hostdev_xml(G1)
    assert nodedev == libvirt.nodedev_xml(G1, [5, 6], [4], [4])
    r = call_as(NOBODY, a, P1, MATRIX, "LibvirtXML")
    assert r.get("body") == [hostdev, nodedev], r

    # a change is in the next answer: the XML follows the sets
    ok(a, "assign", "guest1", "-d", "47", "-c", "ab")
    (_, nodedev) = busctl_json(a, "call", NAME, P1, MATRIX, "LibvirtXML")["data"]
    assert attrs(nodedev) == [
        ("assign_adapter", "0x05"), ("assign_adapter", "0x06"),
        ("assign_domain", "0x0004"), ("assign_domain", "0x0047"),
        ("assign_control_domain", "0x0004"), ("assign_control_domain", "0x0047"),
        ("assign_control_domain", "0x00ab"),
    ]  # fmt: skip

    ok(a, "remove", "guest1")
    r = busctl(a, "call", NAME, P1, MATRIX, "LibvirtXML")
    assert r.returncode != 0 and "could not be found" in r.stderr, r.stderr  # object gone


def test_apmatrixctl_libvirt_prints_what_the_daemon_says(daemon: Daemon, tmp_path: Path) -> None:
    a = daemon.address
    guest1(a)
    (hostdev, nodedev) = busctl_json(a, "call", NAME, P1, MATRIX, "LibvirtXML")["data"]
    assert ok(a, "libvirt", "guest1").out == hostdev
    assert ok(a, "libvirt", "--nodedev", G1[:8]).out == nodedev
    assert ok(a, "libvirt", "guest1", "--json").json() == {
        "matrix": G1, "hostdev": hostdev, "nodedev": nodedev,
    }  # fmt: skip
    r = ctl(a, "libvirt", "nosuch")
    assert r.rc == 1 and r.err.startswith("apmatrixctl: NotFound: no matrix named 'nosuch'"), r

    # what it prints goes straight to virt-xml-validate (nodedev-define's schema)
    need_tool("virt-xml-validate", "libvirt-clients")
    f = tmp_path / "guest1-nodedev.xml"
    f.write_text(ok(a, "libvirt", "guest1", "--nodedev").out)
    v = subprocess.run(["virt-xml-validate", str(f)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and "validates" in v.stderr, v.stdout + v.stderr
