"""The service: the one state, the command queue that changes it, and the views read from it.

D-Bus calls, uevent batches, rescans, start-up and autostart all reach the state the same
way: as a command (:mod:`apmatrixd.service.ops`, :mod:`~apmatrixd.service.sync`,
:mod:`~apmatrixd.service.startup`) run by the :class:`~apmatrixd.service.executor.Executor`,
one at a time, its kernel and store I/O in a worker thread. The daemon queues them with
:meth:`Service.submit`; start-up before serving, tests and benchmarks run them inline through
the synchronous methods (``create_matrix`` ...), which drive exactly the same commands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Concatenate, ParamSpec, TypeVar

from apmatrixd import __version__
from apmatrixd.core import Apqn, Clash, InvalidArgument, NotFound, Registry
from apmatrixd.core.matrix import id_set, normalize_uuid
from apmatrixd.kernel import Kernel, KernelError
from apmatrixd.kernel.features import Features
from apmatrixd.service import apply, boot, managers, ops, startup
from apmatrixd.service.apply import Applied
from apmatrixd.service.executor import Command, Executor, Work
from apmatrixd.service.group import GroupCommit
from apmatrixd.service.state import Changes, State
from apmatrixd.service.tx import Transaction
from apmatrixd.service.views import AdapterView, HostView, MatrixView, loss_reasons
from apmatrixd.store import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Listener = Callable[[Changes], None]


class Service:
    """The daemon's state and its operations; D-Bus, udev and storage sit around it."""

    def __init__(
        self,
        kernel: Kernel,
        version: str = __version__,
        store: Store | None = None,
        pending_after: float = 2.0,
    ) -> None:
        self.kernel = kernel
        self.version = version
        self.store = store
        self.state = State(layout=kernel.layout, version=version)
        self.executor = Executor(self._on_pending, pending_after)
        self.grouping = GroupCommit(self.state, kernel, store, self._send, self.request_resync)
        self.executor.grouping = self.grouping
        self._listeners: list[Listener] = []
        self.startup_drift: list[tuple[str, str]] = []  # sent once the daemon serves
        # Asked for when a command could not read back what it did (hotplug.py answers).
        self.on_resync: Callable[[], None] | None = None
        # How long a forced Stop/Remove waits for a running guest to let go (--in-use-timeout).
        self.in_use_timeout = 30.0
        # The one mdevctl directory D-Bus callers may name by path (--mdevctl-dir).
        self.mdevctl_dir = "/etc/mdevctl.d"
        # Hold mdevctl's definitions there as mdevctl-managed matrices (the daemon sets it;
        # tests that want it say so, so none reads the host's own /etc/mdevctl.d).
        self.watch_mdevctl = False
        self._generation_learnt = False

    # -- the state, for readers -----------------------------------------------------------
    @property
    def registry(self) -> Registry:
        return self.state.registry

    @property
    def settling(self) -> bool:
        return self.state.settling

    # -- listeners ------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, changes: Changes) -> None:
        """Tell the listeners (the bus: signals); a group's members' wait for its flush."""
        if self._generation_learnt:  # said with the change that taught it
            self._generation_learnt = False
            changes.host_changed = True
        if self.grouping.held is not None:
            self.grouping.held.merge(changes)
            return
        self._send(changes)

    def _send(self, changes: Changes) -> None:
        if not changes:
            return
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # a broken listener must not undo a done change
                log.exception("change listener failed")

    def _on_pending(self, text: str) -> None:
        if text != self.state.pending:
            self.state.pending = text
            self._send(Changes(host_changed=True))  # now, even while a group holds its own

    def count_refusal(self, error: str) -> None:
        """A call was answered with the D-Bus error ``error`` (Manager.Statistics).

        On the loop, where the reply is made: see :class:`~apmatrixd.service.state.Statistics`."""
        self.state.stats.refused[error] += 1

    def set_settling(self, settling: bool) -> None:
        """The Manager's ``Settling``: true while a burst of uevents is being absorbed.

        The event pump's own state, mirrored for clients; no registry state changes."""
        if settling != self.state.settling:
            self.state.settling = settling
            self.emit(Changes(host_changed=True))

    # -- the pieces commands are made of ---------------------------------------------------
    def transact(self, tx: Transaction) -> Command[None]:
        """Run ``tx`` in the worker (see tx.py); a failure asks for a resync, as the kernel
        may hold what nobody knows yet (an mdev removed outside, a failed undo)."""
        before = self.kernel.features
        try:
            group = self.grouping.current
            yield Work(tx.what, lambda p: tx.execute(self.kernel, self.store, p, group))
        except Exception:
            self.request_resync()
            self._learnt(before)
            if self._generation_learnt:
                self.emit(Changes())
            raise
        self._learnt(before)

    def _learnt(self, before: Features) -> None:
        """The first mdev tells the generation: the registry follows, Manager says so."""
        if self.kernel.features != before:
            self.state.registry.release_all_ones = self.kernel.features.all_ones_release
            self._generation_learnt = True

    def read_guest(
        self, uuid: str, after: Transaction | None = None
    ) -> Command[tuple[Apqn, ...] | None]:
        """What the guest of ``uuid`` gets now; None (logged, resync asked) if unreadable.

        In a group it is read once per matrix, when the group is stored (group.py): until
        then the last view read stands (None for a new matrix). ``after``: the transaction
        just run, which read it already if it was asked to (``Transaction.guests``)."""
        group = self.grouping.current
        if group is not None:
            group.guests.add(uuid)
            meta = self.state.meta.get(uuid)
            return meta.guest if meta is not None else None
        try:
            if after is not None and uuid in after.guests_read:
                read = after.guests_read[uuid]
                if isinstance(read, KernelError):
                    raise read
                guest = read
            else:
                guest = yield Work(f"reading the guest view of {uuid}",
                                   lambda _p: self.kernel.read_guest(uuid))  # fmt: skip
        except KernelError as err:
            log.warning("re-reading matrix %s after a change failed: %s", uuid, err)
            self.request_resync()
            return None
        return tuple(sorted(guest))

    def request_resync(self) -> None:
        if self.on_resync is not None:
            try:
                self.on_resync()
            except Exception:
                log.exception("could not ask for a resync")

    def resolve(self, uuid: str) -> str:
        """A UUID, or a matrix's name (a courtesy to admins; objects are keyed by UUID)."""
        try:
            return normalize_uuid(uuid)
        except InvalidArgument:
            m = self.state.registry.by_name(uuid)
            if m is None:
                raise
            return m.uuid

    # -- running commands -------------------------------------------------------------------
    def run(
        self, op: Callable[Concatenate[Service, P], Command[T]], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run an operation inline, now (start-up, tests); RuntimeError if one is queued."""
        return self.executor.run_now(op(self, *args, **kw))

    def submit(
        self,
        what: str,
        op: Callable[Concatenate[Service, P], Command[T]],
        *args: P.args,
        **kw: P.kwargs,
    ) -> asyncio.Future[T]:
        """Queue an operation; the future has its result once it is committed."""
        return self.executor.submit(what, lambda: op(self, *args, **kw))

    def change(
        self,
        what: str,
        op: Callable[Concatenate[Service, P], Command[T]],
        *args: P.args,
        **kw: P.kwargs,
    ) -> asyncio.Future[T]:
        """Queue a caller's change whose kernel writes all have an inverse: it may be made
        durable together with the ones queued behind it (see group.py)."""
        return self.executor.submit(what, lambda: op(self, *args, **kw), group=True)

    # -- views ------------------------------------------------------------------------------
    @property
    def host(self) -> HostView:
        reg = self.state.registry
        pool = reg.pool
        if pool.queues is not None:
            adapters = frozenset(q.adapter for q in pool.queues)
            domains = frozenset(q.domain for q in pool.queues)
        else:
            adapters, domains = pool.adapters, pool.domains
        return HostView(
            version=self.version,
            layout=self.state.layout,
            max_adapter_id=reg.limits.max_adapter,
            max_domain_id=reg.limits.max_domain,
            host_adapters=tuple(sorted(adapters)),
            host_domains=tuple(sorted(domains)),
            settling=self.state.settling,
            pending=self.state.pending,
            kernel_generation=self.kernel.features.generation,
            kernel_features=tuple(self.kernel.features.names()),
            boot_pool=self.state.boot_pool,
            boot_drift=boot.disagreement(self.state),
        )

    def matrices(self) -> list[MatrixView]:
        return [self.matrix(u) for u in sorted(self.state.registry.matrices)]

    def matrix(self, uuid: str) -> MatrixView:
        st = self.state
        m = st.registry.get(self.resolve(uuid))
        meta = st.meta[m.uuid]
        sets = meta.truth.matrix() if meta.truth is not None and meta.live else m
        if not meta.live and meta.definition is not None:
            sets = meta.definition  # mdevctl's, held as claims: it breaks a rule
        apqns = tuple(sets.apqns())
        if not meta.live:
            state = "defined"
        elif set(meta.guest) >= set(apqns):
            state = "active"
        else:
            state = "degraded"
        return MatrixView(
            uuid=m.uuid,
            name=m.name,
            adapters=tuple(sorted(sets.adapters)),
            domains=tuple(sorted(sets.domains)),
            control_domains=tuple(sorted(sets.control_domains)),
            apqns=apqns,
            guest_apqns=meta.guest if meta.live else (),
            state=state,
            autostart=m.autostart,
            adopted=meta.adopted,
            manager=meta.manager,
            sysfs_path=self.kernel.mdev_sysfs_path(m.uuid),
            in_use=meta.in_use and meta.live,
            lost=loss_reasons(apqns, meta.guest, st.infos, self.kernel.vfio_driver)
            if meta.live
            else (),
            control_usage_domains=meta.control_usage_domains,
        )

    def adapters(self) -> list[AdapterView]:
        return [self.state.adapters[i] for i in sorted(self.state.adapters)]

    def adapter(self, id: int) -> AdapterView:
        try:
            return self.state.adapters[id]
        except KeyError:
            raise NotFound(f"no adapter {id:#04x} on this host") from None

    def check(self, adapters: Iterable[int], domains: Iterable[int], uuid: str = "") -> list[Clash]:
        """Every APQN of adapters x domains that someone else holds (a dry run)."""
        host, held = self.state.registry.clashes(*self._check_args(adapters, domains, uuid))
        return sorted(host + held)

    def check_rows(
        self, adapters: Iterable[int], domains: Iterable[int], uuid: str = ""
    ) -> list[tuple[int, int, str]]:
        """:meth:`check` as the Check method answers it: (adapter, domain, owner) rows."""
        return self.state.registry.clash_rows(*self._check_args(adapters, domains, uuid))

    def _check_args(
        self, adapters: Iterable[int], domains: Iterable[int], uuid: str
    ) -> tuple[frozenset[int], frozenset[int], str | None]:
        a, d = id_set(adapters, "adapter"), id_set(domains, "domain")
        exclude = self.resolve(uuid) if uuid else None
        if exclude is not None:
            self.state.registry.get(exclude)
        return a, d, exclude

    # -- the operations, inline (see the module docstring) ----------------------------------
    def load(self) -> None:
        """Start-up: journal recovery, registry from the kernel and the store, autostart."""
        self.run(startup.load)

    def create_matrix(self, uuid: str = "", **options: Any) -> MatrixView:
        return self.run(ops.create_matrix, uuid, **options)

    def assign(self, uuid: str, kind: ops.Kind, id: int) -> None:
        self.run(ops.change_one, uuid, kind, id, add=True)

    def unassign(self, uuid: str, kind: ops.Kind, id: int) -> None:
        self.run(ops.change_one, uuid, kind, id, add=False)

    def update(
        self,
        uuid: str,
        adapters: Iterable[int],
        domains: Iterable[int],
        control_domains: Iterable[int],
        mode: str = "set",
        sets: Iterable[str] = ops.SETS,
    ) -> None:
        self.run(ops.update, uuid, adapters, domains, control_domains, mode, sets)

    def configure(self, uuid: str, name: str | None = None, autostart: bool | None = None) -> None:
        self.run(ops.configure, uuid, name, autostart)

    def start(self, uuid: str) -> None:
        self.run(ops.start, uuid)

    def stop(self, uuid: str, force: bool = False, timeout: float | None = None) -> None:
        self.run(ops.stop, uuid, force, timeout)

    def remove(self, uuid: str, force: bool = False, timeout: float | None = None) -> None:
        self.run(ops.remove, uuid, force, timeout)

    def set_autostart(self, uuid: str, autostart: bool) -> None:
        self.run(ops.set_autostart, uuid, autostart)

    def reserve(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        self.run(ops.reserve, adapters, domains)

    def release(self, adapters: Iterable[int], domains: Iterable[int]) -> None:
        self.run(ops.release, adapters, domains)

    def start_waiting(self) -> list[str]:
        return self.run(ops.start_waiting)

    def import_mdevctl(self, config_dir: str | int) -> list[str]:
        return self.run(ops.import_mdevctl, config_dir)

    def export_mdevctl(self, config_dir: str | int) -> list[str]:
        return self.run(ops.export_mdevctl, config_dir)

    def apply(self, document: str, check: bool = False, prune: bool = False) -> Applied:
        return self.run(apply.apply, document, check, prune)

    def take_over(self, uuid: str) -> None:
        self.run(managers.take_over, uuid)

    def reload_mdevctl(self) -> Changes:
        return self.run(managers.reload)

    def propose_mdevctl(
        self,
        action: str,
        uuid: str,
        adapters: Iterable[int] = (),
        domains: Iterable[int] = (),
        control_domains: Iterable[int] = (),
        autostart: bool = False,
    ) -> None:
        self.run(managers.propose, action, uuid, list(adapters), list(domains),
                 list(control_domains), autostart)  # fmt: skip
