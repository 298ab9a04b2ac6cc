"""Every name apmatrixd shows on D-Bus: bus name, object paths, interfaces, errors, actions.

Spec §2 fixes these; they are API. Extend, never rename.
"""

from __future__ import annotations

BUS_NAME = "org.apmatrix.Apmatrix1"
MANAGER_PATH = "/org/apmatrix/Apmatrix1"
MATRICES_PATH = f"{MANAGER_PATH}/matrices"
ADAPTERS_PATH = f"{MANAGER_PATH}/adapters"

MANAGER_IFACE = "org.apmatrix.Apmatrix1.Manager"
MATRIX_IFACE = "org.apmatrix.Apmatrix1.Matrix"
ADAPTER_IFACE = "org.apmatrix.Apmatrix1.Adapter"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

ERROR_PREFIX = "org.apmatrix.Apmatrix1.Error."
ERRORS = frozenset(
    {
        "Conflict",
        "HostOwned",
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "Busy",
        "Kernel",
        "Storage",
        "Unavailable",
        "DriverOverride",
        "Timeout",
        "NotManaged",
    }
)
"""The error suffixes of spec §2, and ours: ``Storage`` (the state directory could not be
written, the change was undone), ``Unavailable`` (a kernel before 6.0 assigns only bound
queues), ``DriverOverride`` (queues bound by driver_override, 6.19+), ``Timeout`` (a guest did
not let go in time), ``NotManaged`` (a matrix mdevctl or someone else manages: TakeOver
first); each core/kernel/store error class carries one as ``name``."""
FAILED = ERROR_PREFIX + "Failed"
"""Our extension: an unexpected failure inside the daemon (details go to the log, not the bus)."""

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE_AUTH_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

ACTION_MANAGE = "org.apmatrix.apmatrix1.manage"
ACTION_RESERVE = "org.apmatrix.apmatrix1.reserve"
ACTION_APPLY = "org.apmatrix.apmatrix1.apply"
"""Apply a declared document: matrices and the host pool in one call (manage + reserve)."""
ACTION_IMPORT = "org.apmatrix.apmatrix1.import-mdevctl"
ACTION_EXPORT = "org.apmatrix.apmatrix1.export-mdevctl"
"""Import/Export of mdevctl files: root reads and writes files where the caller says, so it
is asked every time (auth_admin, not _keep)."""


def error_name(suffix: str) -> str:
    return ERROR_PREFIX + suffix


def matrix_path(uuid: str) -> str:
    """UUID dashes are not allowed in object paths, so they become underscores."""
    return f"{MATRICES_PATH}/{uuid.replace('-', '_')}"


def adapter_path(adapter: int) -> str:
    return f"{ADAPTERS_PATH}/{adapter:02x}"


def uuid_of_path(path: str) -> str | None:
    """The matrix UUID an object path names, or None if it is not a matrix path."""
    prefix = MATRICES_PATH + "/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        return None
    return path[len(prefix) :].replace("_", "-")
