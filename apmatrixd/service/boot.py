"""The host pool the host boots with (chzdev's persistent masks), as commands.

:func:`refresh` re-reads chzdev's udev rule in the worker when its stamp changed (start-up,
and every rescan) and :func:`recheck` compares it again with the stored reservations when
they changed (the listener :func:`follow` queues it): both are commands, so the state has
one writer. Where the two disagree (:func:`apmatrixd.chzdev.disagreement`), a Drift on the
Manager's path says which ids, once per distinct disagreement; nothing is ever written back,
to the rule or to the masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from apmatrixd import chzdev
from apmatrixd.service.executor import Command, Work
from apmatrixd.service.state import Changes, State
from apmatrixd.service.sync import MANAGER
from apmatrixd.store import Reservations

if TYPE_CHECKING:
    from apmatrixd.service.service import Service

log = logging.getLogger(__name__)


def disagreement(st: State) -> str:
    """Where the stored reservations and chzdev's rule disagree ('' if nowhere)."""
    pool = st.boot_pool
    if pool is None or pool.error:
        return ""
    r = st.reservations
    return chzdev.disagreement(
        pool, r.reserved_adapters, r.reserved_domains, r.released_adapters, r.released_domains
    )


def refresh(svc: Service, directory: str) -> Command[None]:
    """Re-read chzdev's rule in ``directory`` if it changed; then :func:`recheck`."""
    st = svc.state
    last = st.boot_stamp

    def read(_p: object) -> tuple[chzdev.Stamp | None, chzdev.BootPool | None]:
        return chzdev.read(directory, last)

    stamp, pool = yield Work(f"reading {directory}/{chzdev.RULE_FILE}", read)
    changes = Changes()
    if stamp != last or pool is not None:  # else: the same file as last time
        st.boot_stamp = stamp
        if pool != st.boot_pool:
            st.boot_pool = pool
            changes.host_changed = True
            if pool is not None and pool.error:
                log.warning("ignoring %s: it %s", pool.path, pool.error)
    _signal(st, changes)
    svc.emit(changes)


def recheck(svc: Service) -> Command[None]:
    """Compare the stored reservations with the rule as last read; no I/O."""
    yield from ()  # a command, with nothing for the worker
    changes = Changes()
    _signal(svc.state, changes)
    svc.emit(changes)


def _signal(st: State, changes: Changes) -> None:
    """A Drift once per distinct disagreement; BootHostPool's "drift" follows (a Reserve
    whose masks were already so changes no property, and emits nothing itself)."""
    where = disagreement(st)
    if where != st.boot_drift:
        st.boot_drift = where
        changes.host_changed = True
        if where and st.boot_pool is not None:
            path = st.boot_pool.path
            text = f"chzdev's persistent AP masks ({path}) disagree with apmatrixd's: {where}"
            log.warning("drift: %s", text)
            changes.drift.append((MANAGER, text))


def follow(svc: Service) -> Callable[[Changes], None]:
    """A change listener that queues :func:`recheck` when the reservations changed."""
    seen: list[Reservations] = [svc.state.reservations]

    def on_changes(changes: Changes) -> None:
        now = svc.state.reservations
        if now != seen[0]:
            seen[0] = now
            fut = svc.submit("comparing chzdev's persistent AP masks", recheck)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    return on_changes
