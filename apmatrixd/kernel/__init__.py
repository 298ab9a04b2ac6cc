"""The kernel backend: the one place that reads and writes sysfs (both AP layouts).

The service calls it only after the core registry has approved a change; every change made
of several writes happens all or nothing.
"""

from apmatrixd.kernel.backend import (
    KINDS,
    LAYOUTS,
    AdapterInfo,
    HostSnapshot,
    Kernel,
    Layout,
    MdevInfo,
    Write,
)
from apmatrixd.kernel.errors import KernelError
from apmatrixd.kernel.io import OsSysfs, SysfsIO, TreeSysfs

__all__ = [
    "KINDS",
    "LAYOUTS",
    "AdapterInfo",
    "HostSnapshot",
    "Kernel",
    "KernelError",
    "Layout",
    "MdevInfo",
    "OsSysfs",
    "SysfsIO",
    "TreeSysfs",
    "Write",
]
