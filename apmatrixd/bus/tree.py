"""The exported object tree, kept in step with the service one Changes batch at a time.

Each batch becomes at most one signal per object: InterfacesAdded for new objects,
InterfacesRemoved for gone ones, and one PropertiesChanged with only the values that really
changed (the objects cache what clients last saw).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from apmatrixd.bus import names
from apmatrixd.bus.objects import (
    Adapter,
    Manager,
    Matrix,
    _Tree,
    adapter_values,
    manager_values,
    matrix_values,
)
from apmatrixd.core import NotFound

if TYPE_CHECKING:
    from apmatrixd.auth import Authority
    from apmatrixd.bus.base import ApmatrixBus
    from apmatrixd.service import Changes, Service

log = logging.getLogger(__name__)


class ObjectTree(_Tree):
    """Owns every exported object; the only place that exports or unexports."""

    def __init__(self, bus: ApmatrixBus, service: Service, authority: Authority) -> None:
        self._bus = bus
        self._service = service
        self._authority = authority
        self.manager = Manager(service, authority, self)
        self.matrices: dict[str, Matrix] = {}
        self.adapters: dict[int, Adapter] = {}

    def export(self) -> None:
        """Export the manager and everything the service holds now, then follow its changes."""
        self._bus.publish(names.MANAGER_PATH, self.manager)
        for m in self._service.matrices():
            self.ensure_matrix(m.uuid)
        for a in self._service.adapters():
            self._sync_adapter(a.id)
        self._service.subscribe(self.on_changes)

    def unexport(self) -> None:
        for uuid in list(self.matrices):
            self._drop_matrix(uuid)
        for aid in list(self.adapters):
            self._drop_adapter(aid)
        self._bus.withdraw(names.MANAGER_PATH)

    # -- matrices ---------------------------------------------------------------------------
    def ensure_matrix(self, uuid: str) -> str:
        """Export (or refresh) a matrix's object and return its path; idempotent."""
        self._sync_matrix(uuid)
        return names.matrix_path(uuid)

    def _sync_matrix(self, uuid: str) -> None:
        try:
            view = self._service.matrix(uuid)
        except NotFound:
            self._drop_matrix(uuid)
            return
        obj = self.matrices.get(uuid)
        if obj is None:
            obj = Matrix(self._service, self._authority, view)
            self.matrices[uuid] = obj
            self._bus.publish(names.matrix_path(uuid), obj)
        else:
            obj.refresh(matrix_values(view))

    def _drop_matrix(self, uuid: str) -> None:
        if self.matrices.pop(uuid, None) is not None:
            self._bus.withdraw(names.matrix_path(uuid))

    # -- adapters ---------------------------------------------------------------------------
    def _sync_adapter(self, aid: int) -> None:
        try:
            view = self._service.adapter(aid)
        except NotFound:
            self._drop_adapter(aid)
            return
        obj = self.adapters.get(aid)
        if obj is None:
            obj = Adapter(self._authority, view)
            self.adapters[aid] = obj
            self._bus.publish(names.adapter_path(aid), obj)
        else:
            obj.refresh(adapter_values(view))

    def _drop_adapter(self, aid: int) -> None:
        if self.adapters.pop(aid, None) is not None:
            self._bus.withdraw(names.adapter_path(aid))

    # -- the service's reports --------------------------------------------------------------
    def on_changes(self, changes: Changes) -> None:
        """One batch in, signals out. Never raises into the service."""
        try:
            self._apply(changes)
        except Exception:
            log.exception("could not publish a change batch (%s); re-syncing every object", changes)
            self._resync_all()

    def _resync_all(self) -> None:
        """Bring every exported object back in step with the service after a failed batch."""
        try:
            wanted_m = {m.uuid for m in self._service.matrices()}
            wanted_a = {a.id for a in self._service.adapters()}
            for uuid in sorted(wanted_m | self.matrices.keys()):
                self._sync_matrix(uuid)
            for aid in sorted(wanted_a | self.adapters.keys()):
                self._sync_adapter(aid)
            self.manager.refresh(manager_values(self._service.host))
        except Exception:
            log.exception("re-sync failed too; clients may see stale objects")

    def _apply(self, ch: Changes) -> None:
        # Ask the service about every object named, whatever the set: that covers a
        # matrix removed and re-created within one batch, and is idempotent.
        for uuid in sorted(ch.matrices_removed | ch.matrices_added | ch.matrices_changed):
            self._sync_matrix(uuid)
        for aid in sorted(ch.adapters_removed | ch.adapters_added | ch.adapters_changed):
            self._sync_adapter(aid)
        if ch.host_changed:
            self.manager.refresh(manager_values(self._service.host))
        for uuid, what in ch.drift:  # no uuid: the host pool drifted (see hotplug.py)
            self.manager.Drift(names.matrix_path(uuid) if uuid else names.MANAGER_PATH, what)
