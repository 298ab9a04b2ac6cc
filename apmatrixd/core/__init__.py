"""The core: APQNs, matrices, the host pool and the registry that decides every change.

No I/O here at all. Every other part of apmatrixd (kernel backends, D-Bus, udev, storage,
CLI) leans on these types and asks :class:`Registry` before it touches anything.
"""

from apmatrixd.core.apqn import MAX_ID, Apqn, cross, format_ids
from apmatrixd.core.errors import (
    AlreadyExists,
    ApmatrixError,
    Busy,
    Clash,
    Conflict,
    HostOwned,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from apmatrixd.core.matrix import HostPool, Limits, Matrix
from apmatrixd.core.registry import (
    Change,
    Decision,
    DefineMatrix,
    Registry,
    RemoveMatrix,
    SetHostPool,
    UpdateMatrix,
)

__all__ = [
    "MAX_ID",
    "AlreadyExists",
    "ApmatrixError",
    "Apqn",
    "Busy",
    "Change",
    "Clash",
    "Conflict",
    "Decision",
    "DefineMatrix",
    "HostOwned",
    "HostPool",
    "InvalidArgument",
    "Limits",
    "Matrix",
    "NotFound",
    "OutOfRange",
    "Registry",
    "RemoveMatrix",
    "SetHostPool",
    "UpdateMatrix",
    "cross",
    "format_ids",
]
