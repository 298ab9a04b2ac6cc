"""The two libvirt XML texts for a matrix: the guest's ``<hostdev>`` and the node device.

- ``<hostdev mode='subsystem' type='mdev' model='vfio-ap'>`` goes into a domain's
  ``<devices>``: libvirt hands the mdev of that UUID to QEMU (``-device vfio-ap,sysfsdev=``).
- ``<device>`` with the ``mdev`` capability is what ``virsh nodedev-define`` takes; libvirt
  passes it on to ``mdevctl define``, so its ``<attr>`` elements become the definition's
  ``attrs``, written to sysfs in the order given when the device starts (libvirt's
  formatnode). They are the same list, in the same order and format, as the file
  ExportMdevctl writes (:func:`apmatrixd.mdevctl.assignments`).

Pure: built with ElementTree, which does the quoting; schema-checked in the tests against
libvirt's own RNG schemas (``virt-xml-validate``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from apmatrixd.core.matrix import normalize_uuid
from apmatrixd.mdevctl import TYPES, assignments

PARENT = "ap_matrix"
"""libvirt's node device name for the vfio_ap matrix device (/sys/devices/vfio_ap/matrix)."""
MDEVCTL_PARENT = "matrix"
"""The same device as mdevctl names it (libvirt's ``parent_addr``)."""


def _text(root: ET.Element) -> str:
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def hostdev_xml(uuid: str) -> str:
    """The domain's ``<hostdev>`` element for the matrix ``uuid``."""
    hostdev = ET.Element("hostdev", mode="subsystem", type="mdev", model="vfio-ap")
    source = ET.SubElement(hostdev, "source")
    ET.SubElement(source, "address", uuid=normalize_uuid(uuid))
    return _text(hostdev)


def nodedev_name(uuid: str) -> str:
    """The name libvirt gives the node device (``mdev_<uuid>_matrix``, every non-alphanumeric
    as ``_``); it makes it up itself on nodedev-define, so this is what nodedev-start takes."""
    raw = f"mdev_{normalize_uuid(uuid)}_{MDEVCTL_PARENT}"
    return "".join(c if c.isalnum() else "_" for c in raw)


def nodedev_xml(
    uuid: str,
    adapters: Iterable[int],
    domains: Iterable[int],
    control_domains: Iterable[int],
) -> str:
    """The node device XML ``virsh nodedev-define`` takes for this matrix."""
    device = ET.Element("device")
    # libvirt's schema wants a name; on define libvirt replaces it with its own, the same.
    ET.SubElement(device, "name").text = nodedev_name(uuid)
    ET.SubElement(device, "parent").text = PARENT
    cap = ET.SubElement(device, "capability", type="mdev")
    ET.SubElement(cap, "type", id=TYPES[0])
    ET.SubElement(cap, "uuid").text = normalize_uuid(uuid)
    for name, value in assignments(adapters, domains, control_domains):
        ET.SubElement(cap, "attr", name=name, value=value)
    return _text(device)
