"""One transaction shape for every change: journal, kernel steps, store steps; undone backward.

A :class:`Transaction` says what a change is to do: matrices to take from what the kernel
holds to a target, a host pool move, store records to write or remove. :meth:`execute` runs in
the worker thread:

1. the live mdevs it touches are read again, so the writes are computed from what sysfs
   holds, not from what the registry believes (a drift not yet seen is overwritten by the
   caller's explicit target, never merged into it);
2. the intent goes to the journal before the first write (made durable before the store
   writes, if there are several: see journal.py);
3. the kernel writes, under the s390 configuration lock;
4. the store writes;
5. the intent is cleared.

A change run alone whose driver allows it (``Progress.later``) is answered after 3, on a
commit record in the journal: 4 and 5 are left for when the worker is idle (the store's
checkpoint, after other such changes: see journal.py).

A failure in 3 undoes the writes done, newest first; a failure in 4 undoes the store writes
done and then the kernel writes. Either way the error is raised and nothing of the change is
left. Removing an mdev has no inverse (an mdev is never re-created to undo anything), so a
removal runs 4 before 3 (``store_first``): a store failure comes before the kernel is
touched, and start-up puts the files of a removal cut between the two back.

In a group (:mod:`apmatrixd.service.group`) 2 writes the group's intent so far, without a
sync, and 4 and 5 wait for the group's flush; the lock of 3 is taken by the first member that
writes and kept until the group is done, so a member plans from what the member before it
wrote instead of reading the mdev again in 1.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apmatrixd.core import Apqn, HostPool, Matrix
from apmatrixd.journal import Intent, JournalError
from apmatrixd.kernel import Kernel, KernelError, Write
from apmatrixd.service.executor import Progress
from apmatrixd.store import Reservations, Store, StoredMatrix, StoreError

if TYPE_CHECKING:
    from apmatrixd.service.group import Group

log = logging.getLogger(__name__)


def sets_json(m: Matrix | None) -> dict[str, list[int]] | None:
    if m is None:
        return None
    return {
        "adapters": sorted(m.adapters),
        "domains": sorted(m.domains),
        "control_domains": sorted(m.control_domains),
    }


def pool_json(p: HostPool) -> dict[str, Any]:
    if p.queues is not None:
        return {"queues": sorted([q.adapter, q.domain] for q in p.queues)}
    return {"adapters": sorted(p.adapters), "domains": sorted(p.domains)}


def narrowed(old: HostPool, new: HostPool) -> HostPool:
    """What both pools give the host: the host pool between a reserve and a release."""
    if old.queues is not None and new.queues is not None:
        return HostPool(queues=old.queues & new.queues)
    return HostPool(old.adapters & new.adapters, old.domains & new.domains)


@dataclass(frozen=True)
class MatrixStep:
    """Take the mdev of ``uuid`` from what the kernel holds to ``target`` (None: no mdev).

    ``believed``: what the registry thinks is there (None: no mdev). A live one is read again
    before anything is written; if it has come or gone meanwhile, the change is refused.
    """

    uuid: str
    believed: Matrix | None
    target: Matrix | None
    wait: float | None = None  # a forced Stop/Remove: how long the remove may block


@dataclass
class Transaction:
    what: str
    matrices: list[MatrixStep] = field(default_factory=list)
    pool: tuple[HostPool, HostPool] | None = None
    store: dict[str, StoredMatrix | None] = field(default_factory=dict)  # None: remove
    reservations: Reservations | None = None
    stored_before: Mapping[str, StoredMatrix | None] = field(default_factory=dict)
    reservations_before: Reservations | None = None
    boot: str = ""
    unclean: bool = False  # a failed store write could not be undone
    # The store first, then the kernel: a removal, whose kernel write has no inverse, so
    # that a store failure leaves it undone (start-up completes one cut between the two).
    store_first: bool = False
    # Several matrices at once (Apply): each mdev to remove is emptied first, where the
    # other steps may need its APQNs, and removed after every other write, re-created
    # (empty, then refilled) if a later write fails. Only for mdevs no guest uses: the
    # caller refuses those, so the re-created mdev is the one that was there.
    removals_last: bool = False
    # The mdevs whose guest view to read once the change is done, in the same worker step
    # (a hand-off to the worker and back costs about as much as the read); ``execute``
    # leaves each view, or the error reading it, in ``guests_read``. Not in a group: the
    # group reads each view once, after its flush.
    guests: tuple[str, ...] = ()
    guests_read: dict[str, frozenset[Apqn] | KernelError] = field(default_factory=dict)

    def store_ops(self) -> list[tuple[str, StoredMatrix | None]]:
        return [(u, r) for u, r in self.store.items() if self.stored_before.get(u) != r]

    def writes_reservations(self) -> bool:
        return self.reservations is not None and self.reservations != self.reservations_before

    def execute(
        self, kernel: Kernel, store: Store | None, progress: Progress, group: Group | None = None
    ) -> None:
        self._execute(kernel, store, progress, group)
        if group is not None:
            return
        for u in self.guests:  # the change is done and durable: a failed read undoes nothing
            progress.text = f"reading the guest view of {u}"
            try:
                self.guests_read[u] = kernel.read_guest(u)
            except KernelError as err:
                self.guests_read[u] = err

    def _execute(
        self, kernel: Kernel, store: Store | None, progress: Progress, group: Group | None
    ) -> None:
        found: dict[str, Matrix | None] = {}
        writes: list[Write] = []
        removals: list[Write] = []
        if self.pool is not None:  # reserve before any matrix takes the queues ...
            old, new = self.pool
            writes += kernel.plan_pool(old, narrowed(old, new))
        for st in self.matrices:
            now = st.believed
            if st.believed is not None and group is not None and st.uuid in group.sets:
                now = group.sets[st.uuid]  # a member before wrote it, the lock held since
            elif st.believed is not None:
                progress.text = f"reading matrix {st.uuid}"
                now = kernel.read_mdev_sets(st.uuid)
            elif st.target is not None and kernel.mdev_exists(st.uuid):
                raise KernelError(
                    17, kernel.mdev_path(st.uuid), "creating", "the mdev exists already"
                )
            if (now is None) != (st.believed is None):
                raise KernelError(
                    2, kernel.mdev_path(st.uuid), "reading", "the mdev was removed outside"
                )
            found[st.uuid] = now
            if self.removals_last and now is not None and st.target is None:
                empty = Matrix(st.uuid)
                writes += kernel.plan_matrix(st.uuid, now, empty)
                create = kernel.plan_matrix(st.uuid, None, empty)[0]
                assert create.undo_path is not None
                removals.append(Write(create.undo_path, create.undo_data, create.path, create.data))
                continue
            writes += kernel.plan_matrix(st.uuid, now, st.target, st.wait)
        if self.pool is not None:  # ... and release once no matrix holds them
            old, new = self.pool
            writes += kernel.plan_pool(narrowed(old, new), new)
        writes += removals
        ops = self.store_ops() if store is not None else []
        res = store is not None and self.writes_reservations()
        if not writes and not ops and not res:
            return
        if group is not None:
            self._join(group, kernel, store, writes, found, progress)
            return
        # Committed on its journal record, its files left to the store's checkpoint (when
        # the worker is idle): it may go behind other such changes in the journal.
        chain = progress.later and not self.store_first and bool(ops or res)
        if store is not None:
            store.finish(chain)  # else acknowledged changes' files first (journal.py)
            progress.text = "writing the intent journal"
            self.boot = kernel.boot_id()
            try:  # synced only before a write of several files (see journal.py)
                store.journal.stage(self.intent(found))
            except JournalError as err:
                raise StoreError(str(err)) from err
        clean = True  # every write of a failed change undone: nothing left for start-up
        self.unclean = False
        try:
            if self.store_first:
                undo_store = self._store(store, ops, res, progress)
                clean = not self.unclean
                try:
                    self._kernel(kernel, writes, progress)
                except Exception:
                    clean = undo_store()
                    raise
            else:
                done = self._kernel(kernel, writes, progress)
                if store is not None and chain:
                    try:  # acknowledged on the commit; the files are written later
                        store.journal.commit()
                    except JournalError as err:
                        clean = self.undo_kernel(kernel, done, progress)
                        raise StoreError(str(err)) from err
                    self._owe(store, ops, res)
                    progress.after = lambda: write_owed(store)
                    return
                try:
                    self._store(store, ops, res, progress)
                except Exception:
                    clean = self.undo_kernel(kernel, done, progress) and not self.unclean
                    raise
        except Exception:
            # A crash (anything that is not an Exception) leaves the intent for start-up, and
            # so does a failure that could not be undone completely.
            if store is not None:
                if clean:
                    store.journal.end()
                else:
                    log.error("%s: could not be undone completely; the intent is kept", self.what)
            raise
        if store is not None:
            store.journal.end()

    def _join(
        self,
        group: Group,
        kernel: Kernel,
        store: Store | None,
        writes: list[Write],
        found: Mapping[str, Matrix | None],
        progress: Progress,
    ) -> None:
        """In a group (group.py): this change's intent added to the group's in the journal,
        the kernel writes now, the store writes held for the group's flush."""
        if self.store_first or any(w.undo_path is None for w in writes):
            raise RuntimeError(f"{self.what}: a change without an inverse cannot join a group")
        mark = 0
        if store is not None:
            if not group.members:
                store.finish()  # as for one change (_execute)
            progress.text = "writing the intent journal"
            self.boot = kernel.boot_id()
            try:
                if group.members:
                    mark = store.journal.append(self.intent(found))
                else:
                    store.journal.stage(self.intent(found))
            except JournalError as err:
                raise StoreError(str(err)) from err
        try:
            if writes:  # held until the group is done: the next member plans from ours
                progress.text = "waiting for the s390 configuration lock"
                kernel.hold_lock()
            done = self._kernel(kernel, writes, progress)
        except Exception:
            for st in self.matrices:  # undone (or not quite): the next member reads again
                group.sets.pop(st.uuid, None)
            if store is not None:  # undone: the journal holds the group without it
                with contextlib.suppress(JournalError):
                    if group.members:
                        store.journal.cut(mark)
                    else:
                        store.journal.end()
            raise
        group.join(self, done)
        for st in self.matrices:
            group.sets[st.uuid] = st.target

    def _owe(self, store: Store, ops: list[tuple[str, StoredMatrix | None]], res: bool) -> None:
        pool = None
        if res:
            assert self.reservations is not None and self.reservations_before is not None
            pool = (self.reservations_before, self.reservations)
        store.owe({u: (self.stored_before.get(u), r) for u, r in ops}, pool)

    def intent(self, found: Mapping[str, Matrix | None]) -> Intent:
        intent = Intent(self.what, boot=self.boot, store_first=self.store_first)
        for st in self.matrices:
            intent.matrices[st.uuid] = {
                "kernel_before": sets_json(found.get(st.uuid)),
                "kernel_after": sets_json(st.target),
            }
        for u, rec in self.store.items():
            item = intent.matrices.setdefault(u, {})
            before = self.stored_before.get(u)
            item["stored_before"] = before.to_json() if before is not None else None
            item["stored_after"] = rec.to_json() if rec is not None else None
            item["stored"] = True
        if self.pool is not None:
            intent.pool = {"before": pool_json(self.pool[0]), "after": pool_json(self.pool[1])}
        if self.reservations is not None and self.reservations_before is not None:
            intent.reservations = {
                "before": self.reservations_before.to_json(),
                "after": self.reservations.to_json(),
            }
        return intent

    @staticmethod
    def _kernel(kernel: Kernel, writes: list[Write], progress: Progress) -> list[Write]:
        """All the writes under the lock, or none: a failure undoes the done ones and raises
        (a KernelError naming the first undo that failed too, if one did)."""
        done: list[Write] = []
        if not writes:
            return done
        progress.text = "waiting for the s390 configuration lock"
        with kernel.locked():
            try:
                for w in writes:
                    progress.text = str(w)
                    kernel.write(w)
                    done.append(w)
            except Exception as err:
                progress.text = "undoing the writes done"
                failed = kernel.undo(done)
                if failed:
                    raise KernelError(
                        failed[0].errno, failed[0].path, "undoing", f"{err}; undo failed too"
                    ) from err
                raise
        return done

    @staticmethod
    def undo_kernel(kernel: Kernel, done: list[Write], progress: Progress) -> bool:
        if not done:
            return True
        progress.text = "undoing the kernel writes (the store failed)"
        try:
            with kernel.locked():
                return not kernel.undo(done)
        except KernelError as err:
            log.error("cannot undo the kernel writes: %s", err)
            return False

    def _store(
        self,
        store: Store | None,
        ops: list[tuple[str, StoredMatrix | None]],
        res: bool,
        progress: Progress,
    ) -> Callable[[], bool]:
        """The store writes, or none (a failure undoes the done ones and raises); returns
        the undo of them all, True if it restored everything."""
        written: list[tuple[str, StoredMatrix | None]] = []

        def undo() -> bool:
            assert store is not None
            clean = True
            for u, was in reversed(written):  # the store as it was
                try:
                    if was is None:
                        store.remove_matrix(u)
                    else:
                        store.write_matrix(was)
                except StoreError as err:
                    log.error("cannot restore the stored matrix %s: %s", u, err)
                    clean = False
            if res and self.reservations_before is not None:
                try:
                    store.write_reservations(self.reservations_before)
                except StoreError as err:
                    log.error("cannot restore the stored reservations: %s", err)
                    clean = False
            return clean

        if store is None:
            return lambda: True
        try:
            # Some renames could be durable and not others, or the disk could still show
            # an earlier change committed (journal.py): the intent first.
            if len(ops) + res > 1 or store.journal.stale_commit:
                try:
                    store.journal.sync()
                except JournalError as err:
                    raise StoreError(str(err)) from err
            for u, rec in ops:
                progress.text = f"storing matrix {u}"
                # Before the write: one that fails after its rename is undone too.
                written.append((u, self.stored_before.get(u)))
                if rec is None:
                    store.remove_matrix(u)
                else:
                    store.write_matrix(rec)
            if res:
                assert self.reservations is not None
                progress.text = "storing the host reservations"
                store.write_reservations(self.reservations)
        except StoreError:
            progress.text = "undoing the change (the store failed)"
            if not undo():
                log.error("%s: the store could not be restored", self.what)
                self.unclean = True
            raise
        return undo


def write_owed(store: Store) -> None:
    """In the worker, once it has nothing else to do: the files of the changes answered on
    their commit (journal.py). What cannot be written now stays owed, for the next change
    to write first (:meth:`Store.finish`) or start-up: nothing acknowledged is lost."""
    try:
        store.checkpoint()
    except Exception as err:  # StoreError, or anything else: kept all the same
        log.error("the files of acknowledged changes are not written yet (%s); the next "
                  "change writes them first", err)  # fmt: skip
