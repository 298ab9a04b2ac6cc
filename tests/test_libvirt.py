"""The libvirt XML of a matrix, checked against libvirt's own RNG schemas with Debian's
``virt-xml-validate`` (libvirt-clients; the schemas come with libvirt0, xmllint with
libxml2-utils), and against what ExportMdevctl writes for the same matrix."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from rigs import need_tool

from apmatrixd import libvirt, mdevctl

G1 = "11111111-1111-4111-8111-111111111111"

DOMAIN = """<domain type='kvm'>
  <name>guest1</name>
  <memory unit='MiB'>512</memory>
  <os><type arch='s390x' machine='s390-ccw-virtio'>hvm</type></os>
  <devices>
{devices}  </devices>
</domain>
"""
"""The smallest whole domain libvirt's schema takes: it validates domains, not elements."""

Validate = Callable[[str, str], subprocess.CompletedProcess[str]]


@pytest.fixture
def validate(tmp_path: Path) -> Validate:
    need_tool("virt-xml-validate", "libvirt-clients")
    need_tool("xmllint", "libxml2-utils")

    def run(text: str, schema: str) -> subprocess.CompletedProcess[str]:
        f = tmp_path / f"{schema}.xml"
        f.write_text(text)
        return subprocess.run(
            ["virt-xml-validate", str(f), schema], capture_output=True, text=True, timeout=60
        )

    return run


def test_hostdev_is_a_valid_device_of_a_domain(validate: Validate) -> None:
    text = libvirt.hostdev_xml(G1.upper())
    hostdev = ET.fromstring(text)
    assert hostdev.attrib == {"mode": "subsystem", "type": "mdev", "model": "vfio-ap"}
    assert [a.attrib for a in hostdev.iter("address")] == [{"uuid": G1}]
    r = validate(DOMAIN.format(devices=text), "domain")
    assert r.returncode == 0, r.stderr
    # The schema does refuse what is not a vfio-ap mdev: the check above means something.
    wrong = text.replace("vfio-ap", "vfio-apx")
    r = validate(DOMAIN.format(devices=wrong), "domain")
    assert r.returncode != 0 and "fails to validate" in r.stderr, r.stderr


def test_nodedev_is_valid_and_assigns_as_the_mdevctl_file_does(validate: Validate) -> None:
    adapters, domains, control = [6, 5], [0x47, 4], [4, 0x47, 0xAB]
    text = libvirt.nodedev_xml(G1, adapters, domains, control)
    r = validate(text, "nodedev")
    assert r.returncode == 0, r.stderr
    device = ET.fromstring(text)
    assert device.findtext("name") == "mdev_11111111_1111_4111_8111_111111111111_matrix"
    assert device.findtext("parent") == "ap_matrix"
    (cap,) = device.findall("capability")
    assert cap.get("type") == "mdev"
    assert [t.get("id") for t in cap.findall("type")] == ["vfio_ap-passthrough"]
    assert cap.findtext("uuid") == G1
    attrs = [(a.get("name"), a.get("value")) for a in cap.findall("attr")]
    assert attrs[:4] == [
        ("assign_adapter", "0x05"),
        ("assign_adapter", "0x06"),
        ("assign_domain", "0x0004"),
        ("assign_domain", "0x0047"),
    ]
    # libvirt hands these to mdevctl define as its attrs: the file ExportMdevctl writes.
    data = mdevctl.format_definition(frozenset(adapters), frozenset(domains),
                                     frozenset(control), False)  # fmt: skip
    assert [next(iter(x.items())) for x in json.loads(data)["attrs"]] == attrs
    # ... and what the daemon reads back from such a file is the same matrix.
    back = mdevctl.parse_file(Path(G1), data)
    assert (back.adapters, back.domains, back.control_domains) == (
        {5, 6}, {4, 0x47}, {4, 0x47, 0xAB})  # fmt: skip
    # A node device without its type is refused by the schema.
    r = validate(text.replace('<type id="vfio_ap-passthrough" />', ""), "nodedev")
    assert r.returncode != 0, r.stdout


def test_an_empty_matrix_is_a_device_without_attrs(validate: Validate) -> None:
    text = libvirt.nodedev_xml(G1, [], [], [])
    assert "<attr" not in text
    r = validate(text, "nodedev")
    assert r.returncode == 0, r.stderr
