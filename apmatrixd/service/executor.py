"""One queue of commands, run one at a time; their kernel and disk I/O in a worker thread.

A command is a generator: it decides on the state as it is when its turn comes, yields
:class:`Work` (blocking I/O: sysfs reads and writes, the s390 lock, fsync) and receives each
result (or the exception, thrown in), then commits to the state and returns. Two drivers run
the same generators:

- :meth:`Executor.submit` (the daemon): commands wait in a FIFO queue; each Work runs in the
  worker thread while the event loop goes on answering reads and queueing more commands.
  Work that takes longer than ``pending_after`` seconds is reported (``on_pending``: the
  Manager's ``Pending`` property, and the log) until it returns.
- :meth:`Executor.run_now` (tests, benchmarks, tools): the Work runs inline in the caller's
  thread. Refused while a queued command is in flight, so the two never interleave (it
  waits for the worker to write the files of one already answered); it may
  run ahead of queued commands that have not started (the daemon itself only queues).

Nothing else changes the state: a command's code after its last ``yield`` runs on the loop
without awaiting, so a read sees a change whole or not at all.

Commands submitted with ``group=True`` (callers' changes) that wait behind one another run
as a group (:class:`Grouping`, :mod:`apmatrixd.service.group`): one after the other as
always, but made durable together once the last has run, and answered only then. Reads are
answered all the while; they see each member's change as it is applied.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from apmatrixd.core import ApmatrixError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Stopping(ApmatrixError):
    """No more changes: the daemon is stopping (D-Bus ``Busy``)."""

    name = "Busy"


@dataclass
class Progress:
    """What the Work running now is doing; the worker updates it as it goes.

    ``after``: set by a Work whose driver allows it (``later``): what the worker is to do
    once it has nothing else to do (the files of changes already durable in the intent
    journal: see journal.py). The queue runs the latest one ``write_after`` seconds after
    it last ran dry, as a command of its own; inline, it runs before the command goes on."""

    text: str = ""
    later: bool = False
    after: Callable[[], None] | None = None

    def run_after(self) -> None:
        after, self.after = self.after, None
        if after is not None:
            after()


@dataclass
class Work(Generic[T]):
    """Blocking I/O for the worker: ``fn(progress)``."""

    what: str
    fn: Callable[[Progress], T]


Command = Generator[Work[Any], Any, T]

WRITE_AFTER = 0.05
"""Seconds the queue stays dry before what its Work left for later runs (the files of
answered changes): a change that comes meanwhile, as a client's next one does, is not kept
waiting behind them."""

MAX_GROUP = 256
"""The most changes made durable together (the journal's intent grows with each)."""


class Grouping(Protocol):
    """The service's side of a group of changes (see :mod:`apmatrixd.service.group`)."""

    def open(self) -> None:
        """Before the first member: keep what is needed to put the state back."""

    def staged(self) -> int:
        """How many members' changes the group holds."""

    def flush(self, progress: Progress) -> None:
        """In the worker: make the group durable, or undo all of it and raise."""

    def abandon(self, progress: Progress) -> None:
        """In the worker: undo every member (one failed after its change joined)."""

    def close(self, durable: bool) -> None:
        """On the loop, last: send the signals the members held back, or put the state
        back as it was before the group (nothing is sent)."""


class _Cut(Exception):
    """A member failed after its change joined the group: the whole group is undone."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Worker:
    """One daemon thread running functions in order (a stuck write never blocks exit).

    Each result goes straight to an asyncio future with one ``call_soon_threadsafe``: no
    ``concurrent.futures.Future`` in between to wrap (its lock, its callbacks and a second
    hop on the loop cost a change as much as one of its sysfs reads)."""

    def __init__(self, name: str = "apmatrixd-io") -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop, Progress]
            | None
        ] = queue.SimpleQueue()
        # Jobs handed over and not done yet, what runs after them included (see busy).
        self._open = 0
        self._count = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T], progress: Progress | None = None) -> asyncio.Future[T]:
        """``fn()`` in the thread; the future (of the running loop) has its result. A future
        cancelled before its turn comes is skipped."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._count:
            self._open += 1
        self._jobs.put((fn, fut, loop, progress or Progress()))
        return fut

    @property
    def busy(self) -> bool:
        """A job, or what runs after one (a change's files), is not done yet."""
        return self._open > 0

    def wait(self) -> None:
        """Block until no job is left (:meth:`Executor.run_now` only: never on the loop
        while a command is in flight)."""
        with self._count:
            self._count.wait_for(lambda: self._open == 0)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(*job)
            finally:
                with self._count:
                    self._open -= 1
                    self._count.notify_all()

    @staticmethod
    def _run(
        fn: Callable[[], Any],
        fut: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        progress: Progress,
    ) -> None:
        if fut.cancelled():  # read across threads: at worst it runs and is dropped
            return
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the loop, raised there
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, fut, result, error)

    def close(self) -> None:
        self._jobs.put(None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # cancelled meanwhile: the caller is gone
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


@dataclass
class _Job:
    what: str
    factory: Callable[[], Command[Any]]
    future: asyncio.Future[Any]
    queued: float = field(default_factory=time.monotonic)
    group: bool = False


def _heard(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _answer(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    if job.future.done():  # cancelled: the caller is gone
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


class Executor:
    """The command queue of one service (see the module docstring)."""

    def __init__(
        self,
        on_pending: Callable[[str], None] | None = None,
        pending_after: float = 2.0,
    ) -> None:
        self.on_pending = on_pending
        self.pending_after = pending_after
        self._jobs: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
        self._inline = False
        self._task: asyncio.Task[None] | None = None
        self._worker: Worker | None = None
        self._pending = ""
        # The Work in flight (job, work, progress, loop time it started) and the one timer
        # that watches it: armed when Work starts and none is, it re-arms itself for the
        # Work then in flight (a timer per Work cost each change a heap push and left a
        # cancelled handle behind in the loop's heap for pending_after seconds).
        self._work: tuple[_Job, Work[Any], Progress, float] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.refusing = ""
        self.grouping: Grouping | None = None  # None: every command alone
        # What a Work left for when the queue is idle (Progress.after), and its timer.
        self.write_after = WRITE_AFTER
        self._owed: Callable[[], None] | None = None
        self._owed_timer: asyncio.TimerHandle | None = None
        self.groups = 0  # groups run (more than one member), for tests and the bench

    @property
    def busy(self) -> bool:
        """A command is running or waiting in the queue, or the files of one already
        answered are not written yet."""
        worker = self._worker
        return (
            self._running is not None
            or bool(self._jobs)
            or self._inline
            or self._owed is not None
            or (worker is not None and worker.busy)
        )

    @property
    def running(self) -> str:
        """What the command in flight is ('' if none)."""
        return self._running.what if self._running is not None else ""

    # -- inline ------------------------------------------------------------------------------
    def run_now(self, command: Command[T]) -> T:
        """Drive ``command`` to its end here, its Work inline (see the module docstring)."""
        if self._running is not None or self._inline:
            command.close()
            raise RuntimeError(f"a command is in flight ({self.running or 'inline'})")
        if self._worker is not None:
            self._worker.wait()
        owed, self._owed = self._owed, None
        if owed is not None:  # the files of the changes answered, written first
            owed()
        self._inline = True
        try:
            return self._drive_inline(command)
        finally:
            self._inline = False

    @staticmethod
    def _drive_inline(command: Command[T]) -> T:
        progress = Progress(later=True)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                work = command.throw(error) if error is not None else command.send(result)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            result, error = None, None
            try:
                result = work.fn(progress)
            except Exception as exc:
                error = exc
            progress.run_after()  # here too before the command goes on, as the worker does

    # -- queued ------------------------------------------------------------------------------
    def submit(
        self, what: str, factory: Callable[[], Command[T]], group: bool = False
    ) -> asyncio.Future[T]:
        """Queue a command; its future has the result once it is committed (or its error).

        ``factory`` is called when the command's turn comes, so it decides on the state as
        the commands before it left it. ``group``: it may be made durable together with the
        commands of the same kind queued right behind it (see the module docstring).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self.refusing:
            fut.set_exception(Stopping(self.refusing))
            return fut
        self._jobs.append(_Job(what, factory, fut, group=group))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        while self._jobs:
            job = self._jobs.popleft()
            if job.future.cancelled():
                continue
            if job.group and self.grouping is not None and self._jobs and self._jobs[0].group:
                await self._run_group(job, self.grouping)
                continue
            self._running = job
            try:
                result = await self._drive(job)
            except asyncio.CancelledError:
                if not job.future.done():
                    job.future.cancel()
                raise
            except Exception as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
            except BaseException as exc:  # SystemExit and the like: its caller hears, then on
                if not job.future.done():
                    job.future.set_exception(exc)
                raise
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self._running = None
        if self._owed is not None and self._owed_timer is None:
            loop = asyncio.get_running_loop()
            self._owed_timer = loop.call_later(self.write_after, self._write_owed)

    def _write_owed(self) -> None:
        """The queue has been dry ``write_after`` seconds: what its Work left for later,
        queued (not behind a refusal: a stopping daemon writes it too). Busy again: the
        drain arms this once more when it runs dry."""
        if self._owed_timer is not None:
            self._owed_timer.cancel()  # called by idle() before its time
            self._owed_timer = None
        owed = self._owed
        if owed is None or self._running is not None or self._jobs or self._inline:
            return
        self._owed = None

        def command() -> Command[None]:
            yield Work("writing the files of answered changes", lambda _progress: owed())

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fut.add_done_callback(_heard)  # nobody waits for it: write_owed logs its failures
        self._jobs.append(_Job("storing answered changes", command, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())

    async def _run_group(self, first: _Job, g: Grouping) -> None:
        """``first`` and the grouped commands queued behind it, made durable together."""
        joined: list[tuple[_Job, Any]] = []
        error: Exception | None = None
        g.open()
        job: _Job | None = first
        try:
            while job is not None:
                self._running = job
                mark = g.staged()
                try:
                    result = await self._drive(job)
                except Exception as exc:
                    if g.staged() != mark:
                        joined.append((job, None))
                        raise _Cut(exc) from exc
                    _answer(job, error=exc)  # refused or undone: no part of the group
                else:
                    joined.append((job, result))
                job = self._next_grouped(len(joined))
            if joined:
                self._running = joined[-1][0]
                n = len(joined)
                await self._off_loop(joined[-1][0], Work(f"storing {n} changes", g.flush))
        except _Cut as cut:
            error = cut.error
            try:
                await self._off_loop(joined[-1][0], Work("undoing a group", g.abandon))
            except Exception:
                log.exception("undoing a group of %d changes failed", len(joined))
        except Exception as exc:  # the flush failed: it undid the group
            error = exc
        except BaseException as exc:  # a crash or the loop stopping: every caller hears
            g.close(False)
            running = [job] if job is not None and all(job is not j for j, _ in joined) else []
            for j in [*(j for j, _ in joined), *running]:
                if isinstance(exc, asyncio.CancelledError):
                    j.future.cancel()
                else:
                    _answer(j, error=exc)
            raise
        finally:
            self._running = None
        if len(joined) > 1:
            self.groups += 1
        g.close(error is None)
        for j, result in joined:
            _answer(j, result, error)

    def _next_grouped(self, n: int) -> _Job | None:
        while n < MAX_GROUP and self._jobs and self._jobs[0].group:
            job = self._jobs.popleft()
            if not job.future.cancelled():
                return job
        return None

    async def _drive(self, job: _Job) -> Any:
        command = job.factory()
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                work = command.throw(error) if error is not None else command.send(result)
            except StopIteration as stop:
                return stop.value
            result, error = None, None
            try:
                result = await self._off_loop(job, work)
            except asyncio.CancelledError:
                command.close()
                raise
            except Exception as exc:
                error = exc

    async def _off_loop(self, job: _Job, work: Work[Any]) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = Worker()
        progress = Progress(work.what, later=True)
        started = loop.time()
        self._work = (job, work, progress, started)
        if self._watch is None:
            self._watch = loop.call_at(started + self.pending_after, self._watchdog)
        try:
            return await self._worker.run(lambda: work.fn(progress), progress)
        finally:
            if progress.after is not None:
                self._owed, progress.after = progress.after, None
            self._work = None
            if self._pending:
                log.info("%s: done after %.1f s (%s)", job.what, loop.time() - started, work.what)
                self._set_pending("")

    def _watchdog(self) -> None:
        """Report the Work in flight once it has run ``pending_after`` seconds; else wait
        for the rest of its time (none in flight: disarmed until the next starts)."""
        self._watch = None
        if self._work is None:
            return
        job, work, progress, started = self._work
        loop = asyncio.get_running_loop()
        due = started + self.pending_after
        if loop.time() < due:
            self._watch = loop.call_at(due, self._watchdog)
        else:
            self._still_waiting(job, work, progress)

    def _still_waiting(self, job: _Job, work: Work[Any], progress: Progress) -> None:
        text = f"{job.what}: {progress.text or work.what}"
        log.warning("still waiting after %.0f s: %s", self.pending_after, text)
        self._set_pending(text)
        # Keep the text current while it waits (one write of a transaction may be stuck).
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, self._refresh_pending, job, work, progress)

    def _refresh_pending(self, job: _Job, work: Work[Any], progress: Progress) -> None:
        if not self._pending or self._running is not job:
            return
        text = f"{job.what}: {progress.text or work.what}"
        if text != self._pending:
            self._set_pending(text)
        asyncio.get_running_loop().call_later(1.0, self._refresh_pending, job, work, progress)

    def _set_pending(self, text: str) -> None:
        self._pending = text
        if self.on_pending is not None:
            try:
                self.on_pending(text)
            except Exception:
                log.exception("pending listener failed")

    async def idle(self) -> None:
        """Until every queued command has finished, and what their Work left for later
        (``Progress.after``: the files of answered changes) too."""
        while True:
            while self._running is not None or self._jobs:
                task = self._task
                if task is None or task.done():
                    if not self._jobs:
                        break
                    self._task = task = asyncio.get_running_loop().create_task(self._drain())
                await asyncio.wait([task])
            if self._owed is None:
                break
            self._write_owed()
            if not self._jobs:
                break  # run inline meanwhile: it writes them first
        if self._worker is not None:
            await self._worker.run(lambda: None)

    def refuse(self, why: str) -> None:
        """From now on every submit fails with :class:`Stopping` (the daemon is stopping)."""
        self.refusing = why

    def close(self) -> None:
        if self._owed_timer is not None:  # not written: start-up writes them from the journal
            self._owed_timer.cancel()
            self._owed_timer = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for job in self._jobs:
            if not job.future.done():
                job.future.cancel()
        self._jobs.clear()
        if self._worker is not None:
            self._worker.close()
            self._worker = None
