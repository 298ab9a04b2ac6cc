"""Introspection served from the shipped API description, argument names and all.

dbus-fast builds introspection data from the Python signatures: out arguments and signal
arguments come out unnamed (``arg_0``), so ``gdbus introspect`` and ``busctl introspect``
showed less than ``org.apmatrix.Apmatrix1.xml`` says. The XML is the API's one description;
the daemon answers Introspect on its objects with it (a test checks that the code implements
exactly what it describes).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from importlib import resources

from apmatrixd.bus import names

API_XML = "org.apmatrix.Apmatrix1.xml"

DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)

STANDARD = {
    "org.freedesktop.DBus.Introspectable": """\
<interface name="org.freedesktop.DBus.Introspectable">
<method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>
</interface>""",
    "org.freedesktop.DBus.Peer": """\
<interface name="org.freedesktop.DBus.Peer">
<method name="Ping"/>
<method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
</interface>""",
    "org.freedesktop.DBus.Properties": """\
<interface name="org.freedesktop.DBus.Properties">
<method name="Get"><arg name="interface_name" type="s" direction="in"/>\
<arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="out"/>\
</method>
<method name="GetAll"><arg name="interface_name" type="s" direction="in"/>\
<arg name="props" type="a{sv}" direction="out"/></method>
<method name="Set"><arg name="interface_name" type="s" direction="in"/>\
<arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="in"/>\
</method>
<signal name="PropertiesChanged"><arg name="interface_name" type="s"/>\
<arg name="changed_properties" type="a{sv}"/><arg name="invalidated_properties" type="as"/>\
</signal>
</interface>""",
}
OBJECT_MANAGER = """\
<interface name="org.freedesktop.DBus.ObjectManager">
<method name="GetManagedObjects">\
<arg name="objpath_interfaces_and_properties" type="a{oa{sa{sv}}}" direction="out"/></method>
<signal name="InterfacesAdded"><arg name="object_path" type="o"/>\
<arg name="interfaces_and_properties" type="a{sa{sv}}"/></signal>
<signal name="InterfacesRemoved"><arg name="object_path" type="o"/>\
<arg name="interfaces" type="as"/></signal>
</interface>"""


def api_text() -> str:
    """The shipped API description (package data)."""
    return resources.files("apmatrixd.bus").joinpath(API_XML).read_text(encoding="utf-8")


@functools.cache
def interfaces() -> dict[str, str]:
    """Interface name -> its ``<interface>`` element as text (comments dropped)."""
    root = ET.fromstring(api_text())
    out: dict[str, str] = {}
    for iface in root.iter("interface"):
        ET.indent(iface)
        out[iface.get("name", "")] = ET.tostring(iface, encoding="unicode").strip()
    return out


def introspect(path: str, ifaces: Iterable[str], children: Iterable[str]) -> str:
    """The introspection document of an object at ``path`` with ``ifaces``."""
    parts = [DOCTYPE, "<node>"]
    parts += STANDARD.values()
    if path == names.MANAGER_PATH:
        parts.append(OBJECT_MANAGER)
    ours = interfaces()
    parts += [ours[i] for i in sorted(ifaces)]
    parts += [f'<node name="{c}"/>' for c in sorted(set(children))]
    parts.append("</node>")
    return "\n".join(parts) + "\n"


__all__ = ["API_XML", "api_text", "interfaces", "introspect"]
