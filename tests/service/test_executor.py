"""The command queue: one command at a time, in order, its Work off the loop; the loop keeps
answering meanwhile; a long wait is reported as Pending; run_now never interleaves."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from apmatrixd.service.executor import Command, Executor, Progress, Stopping, Work, Worker


def slow(log: list[str], name: str, seconds: float, off_loop: bool = False) -> Command[str]:
    log.append(f"{name} decides")
    got = yield Work(f"{name} waits", lambda p: (time.sleep(seconds), threading.get_ident())[1])
    log.append(f"{name} commits")
    if off_loop:
        assert got != threading.get_ident()  # the Work ran in the worker, not on the loop
    return name


def failing() -> Command[None]:
    try:
        yield Work("fails", lambda p: 1 / 0)
    except ZeroDivisionError:
        raise ValueError("seen by the command") from None


def test_commands_run_one_at_a_time_in_order_and_the_loop_stays_free() -> None:
    async def go() -> None:
        ex = Executor()
        log: list[str] = []
        a = ex.submit("a", lambda: slow(log, "a", 0.2, off_loop=True))
        b = ex.submit("b", lambda: slow(log, "b", 0.0, off_loop=True))
        ticks = 0
        while not a.done():
            ticks += 1  # the loop runs while a's Work sleeps in the worker
            await asyncio.sleep(0.01)
        assert await a == "a" and await b == "b"
        assert log == ["a decides", "a commits", "b decides", "b commits"]
        assert ticks > 5
        with pytest.raises(ValueError, match="seen by the command"):
            await ex.submit("f", failing)
        assert await ex.submit("c", lambda: slow(log, "c", 0)) == "c"  # not stuck
        ex.close()

    asyncio.run(go())


def test_a_long_wait_is_pending_until_it_returns() -> None:
    async def go() -> None:
        seen: list[str] = []
        ex = Executor(on_pending=seen.append, pending_after=0.1)

        def cmd() -> Command[None]:
            def work(p: Progress) -> None:
                p.text = "writing '1' to devices/vfio_ap/matrix/x/remove"
                time.sleep(0.4)

            yield Work("Remove", work)

        await ex.submit("Remove x", cmd)
        assert seen[0] == "Remove x: writing '1' to devices/vfio_ap/matrix/x/remove"
        assert seen[-1] == ""  # cleared when it returned
        ex.close()

    asyncio.run(go())


def test_a_work_starting_after_the_timer_was_armed_is_judged_by_its_own_start() -> None:
    """One timer watches a busy stretch: armed for the first Work, it finds another in flight
    when it fires (the command held the loop meanwhile), waits for that one's own time and
    reports it, by its own text; the first, long done, is never reported."""

    async def go() -> None:
        seen: list[str] = []
        ex = Executor(on_pending=seen.append, pending_after=0.2)

        def cmd() -> Command[None]:
            def first(p: Progress) -> None:
                p.text = "the first write"

            def second(p: Progress) -> None:
                p.text = "the second write"
                time.sleep(1.0)

            yield Work("first", first)
            time.sleep(0.4)  # on the loop: the timer armed for the first cannot fire yet
            yield Work("second", second)

        await ex.submit("Update x", cmd)
        assert seen[0] == "Update x: the second write" and seen[-1] == ""
        ex.close()

    asyncio.run(go())


def test_run_now_never_interleaves_with_a_queued_command() -> None:
    async def go() -> None:
        ex = Executor()
        log: list[str] = []
        fut = ex.submit("a", lambda: slow(log, "a", 0.2))
        await asyncio.sleep(0.05)  # a is in its Work
        with pytest.raises(RuntimeError, match="in flight"):
            ex.run_now(slow(log, "inline", 0))
        await fut
        assert ex.run_now(slow(log, "inline", 0)) == "inline"
        ex.refuse("stopping")
        with pytest.raises(Stopping):
            await ex.submit("late", lambda: slow(log, "late", 0))
        ex.close()

    asyncio.run(go())


def test_the_worker_answers_on_the_loop_and_skips_what_was_cancelled() -> None:
    """Results and errors reach the loop's futures; one cancelled before its turn never
    runs; one cancelled while it runs is finished and its result dropped."""

    async def go() -> None:
        worker = Worker("test-worker")
        try:
            ran: list[str] = []
            started, gate = threading.Event(), threading.Event()
            first = worker.run(lambda: (started.set(), gate.wait(5), ran.append("first"))[2])
            second = worker.run(lambda: ran.append("second"))
            second.cancel()
            third = worker.run(lambda: threading.get_ident())
            fourth = worker.run(lambda: 1 / 0)
            assert started.wait(5)
            first.cancel()  # already running: it finishes, nobody hears
            gate.set()
            assert await third != threading.get_ident()
            with pytest.raises(ZeroDivisionError):
                await fourth
            assert ran == ["first"] and first.cancelled() and second.cancelled()
        finally:
            worker.close()

    asyncio.run(go())
