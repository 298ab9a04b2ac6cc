"""Group commit: changes queued behind one another, applied one by one, made durable together.

When callers' changes wait in the queue behind one another, the executor runs them as one
group (:meth:`~apmatrixd.service.executor.Executor.submit` with ``group=True``). Each member
is decided on the state as the member before left it and its kernel writes are done at once,
as alone; what it would store is held in the :class:`Group` instead of written. The s390
lock is taken by the first member's writes and kept until the last member's are done, so no
s390-tools write comes in between and a member plans its writes from what the one before
left the mdev holding (``Group.sets``) instead of reading it back. After the
last member the group is made durable with one write per touched file and one fsync per
directory (:meth:`~apmatrixd.store.Store.write_group`), and only then are the members
answered and their signals sent. A member refused, or failing in the kernel (its own writes
undone), is answered at once and is no part of the group. A failed flush undoes every
member's kernel writes, newest first, puts the state back as it was before the group, and
every member's caller gets the error.

The intent journal holds one record per member, read back as one change
(:meth:`~apmatrixd.journal.Intent.then`), so start-up rolls a group cut by a crash back
whole, as it does one change.

Only changes whose kernel writes all have an inverse may join: a Stop or a Remove (an mdev
is never re-created to undo anything) runs alone, as does anything the daemon itself queues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apmatrixd.core import Apqn, Matrix
from apmatrixd.journal import JournalError
from apmatrixd.kernel import Kernel, KernelError, Write
from apmatrixd.service.executor import Progress
from apmatrixd.service.state import Changes, State
from apmatrixd.store import Reservations, Store, StoredMatrix, StoreError

if TYPE_CHECKING:
    from apmatrixd.service.tx import Transaction

log = logging.getLogger(__name__)


@dataclass
class Group:
    """What the members of one group did in the kernel and would store (worker side)."""

    kernel: Kernel
    store: Store | None
    writes: list[Write] = field(default_factory=list)  # every member's, in order
    matrices: dict[str, tuple[StoredMatrix | None, StoredMatrix | None]] = field(
        default_factory=dict
    )
    reservations: tuple[Reservations, Reservations] | None = None
    members: int = 0  # transactions held
    guests: set[str] = field(default_factory=set)  # guest views to read once stored
    # What the members left each mdev they wrote holding: the next one plans from it (the
    # s390 lock is held from the first member's writes until flush or abandon).
    sets: dict[str, Matrix | None] = field(default_factory=dict)

    def join(self, tx: Transaction, done: list[Write]) -> None:
        """``tx`` did ``done`` in the kernel; its store writes wait for :meth:`flush`."""
        self.writes += done
        for u, rec in tx.store_ops():
            before = self.matrices[u][0] if u in self.matrices else tx.stored_before.get(u)
            self.matrices[u] = (before, rec)
        if self.store is not None and tx.writes_reservations():
            assert tx.reservations is not None and tx.reservations_before is not None
            first = self.reservations[0] if self.reservations else tx.reservations_before
            self.reservations = (first, tx.reservations)
        self.members += 1

    def files(self) -> int:
        n = sum(1 for before, after in self.matrices.values() if before != after)
        res = self.reservations
        return n + (1 if res is not None and res[0] != res[1] else 0)

    def flush(self, progress: Progress) -> None:
        """Make the group durable, or undo all of it and raise (in the worker)."""
        self.kernel.release_lock()  # every kernel write is done
        store = self.store
        if store is None or not self.members:
            return
        progress.text = f"storing {self.members} changes"
        try:
            # Some renames could be durable and not others, or the disk could still show
            # an earlier change committed (journal.py): the intent first.
            if self.files() > 1 or store.journal.stale_commit:
                store.journal.sync()
            store.write_group(self.matrices, self.reservations)
        except (StoreError, JournalError) as err:
            clean = self.undo(progress) and (not isinstance(err, StoreError) or err.clean)
            if clean:
                store.journal.end()
            else:
                log.error("a group of %d changes could not be undone completely; the intent "
                          "is kept", self.members)  # fmt: skip
            if isinstance(err, StoreError):
                raise
            raise StoreError(str(err)) from err
        store.journal.end()

    def undo(self, progress: Progress) -> bool:
        """Every member's kernel writes back, newest first; True if all went back."""
        from apmatrixd.service.tx import Transaction

        progress.text = f"undoing a group of {self.members} changes"
        return Transaction.undo_kernel(self.kernel, self.writes, progress)

    def abandon(self, progress: Progress) -> None:
        """A member failed after it joined: nothing of the group may stay."""
        self.kernel.release_lock()  # the undo takes it again
        clean = self.undo(progress)
        if self.store is not None and self.members:
            if clean:
                self.store.journal.end()
            else:
                log.error("an abandoned group could not be undone completely; the intent is kept")


class GroupCommit:
    """The executor's side of a group (:class:`~apmatrixd.service.executor.Grouping`): the
    state as it was before, the signals held until the group is on disk."""

    def __init__(
        self,
        state: State,
        kernel: Kernel,
        store: Store | None,
        emit: Callable[[Changes], None],
        resync: Callable[[], None],
    ) -> None:
        self._state = state
        self._kernel = kernel
        self._store = store
        self._emit = emit
        self._resync = resync
        self._guests: dict[str, frozenset[Apqn]] = {}
        self._unread = False
        self.current: Group | None = None
        self.held: Changes | None = None  # the members' signals, sent once on disk
        self._before: State | None = None

    def open(self) -> None:
        self._before = self._state.snapshot()
        self.current = Group(self._kernel, self._store)
        self.held = Changes()

    def staged(self) -> int:
        return self.current.members if self.current is not None else 0

    def flush(self, progress: Progress) -> None:
        """The group stored, then the guest views of the matrices it changed, one read each
        (a member reads none: 100 changes of one matrix read it once)."""
        assert self.current is not None
        self.current.flush(progress)
        self._guests, self._unread = {}, False
        for u in sorted(self.current.guests):
            progress.text = f"reading the guest view of {u}"
            try:
                self._guests[u] = self._kernel.read_guest(u)
            except KernelError as err:  # the change stays; a resync reads it again
                log.warning("re-reading matrix %s after a group of changes failed: %s", u, err)
                self._unread = True

    def abandon(self, progress: Progress) -> None:
        assert self.current is not None
        self.current.abandon(progress)

    def close(self, durable: bool) -> None:
        self._kernel.release_lock()  # no member wrote, or the loop is stopping
        held = self.held
        if not durable and self._before is not None:
            self._state.restore(self._before)
        self.current, self.held, self._before = None, None, None
        if not durable:
            return
        assert held is not None
        for u, guest in self._guests.items():
            meta = self._state.meta.get(u)
            if meta is not None and meta.live and tuple(sorted(guest)) != meta.guest:
                meta.guest = tuple(sorted(guest))
                held.matrices_changed.add(u)
        self._guests = {}
        if held:
            self._emit(held)
        if self._unread:
            self._resync()
