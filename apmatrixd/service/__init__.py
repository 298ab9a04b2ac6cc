"""The service: one state, one writer, every change a command (see service.py).

``state``  the registry, per-matrix metadata, inventory, host pool, what is stored
``executor``  the command queue and the worker thread that does the blocking I/O
``tx``     one transaction shape: journal, kernel steps, store steps, undone backward
``ops``    the operations (create, assign, start, remove, reserve, mdevctl ...)
``sync``   what the kernel did on its own (hot plug, drift) as a command
``startup`` journal recovery and reconciliation before READY
``views``  what clients see
"""

from apmatrixd.service.ops import KINDS, ORDER, Kind
from apmatrixd.service.service import Listener, Service
from apmatrixd.service.state import Changes, Meta, State
from apmatrixd.service.views import AdapterView, HostView, MatrixView

_Meta = Meta

__all__ = [
    "KINDS",
    "ORDER",
    "AdapterView",
    "Changes",
    "HostView",
    "Kind",
    "Listener",
    "MatrixView",
    "Meta",
    "Service",
    "State",
]
