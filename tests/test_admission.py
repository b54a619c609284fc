"""Admission control in isolation (no engine): limits, waiting order, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from probeserve.transport.admission import Admission


def test_try_acquire_refuses_beyond_limit() -> None:
    async def run() -> None:
        a = Admission(3)
        assert a.try_acquire(2) and not a.try_acquire(2) and a.try_acquire(1)
        assert not a.try_acquire()
        a.release(3)
        assert a.in_flight == 0

    asyncio.run(run())


def test_waiters_are_served_in_order_and_cancellation_frees_nothing_twice() -> None:
    async def run() -> None:
        a = Admission(1)
        await a.acquire()
        order: list[int] = []

        async def wait(i: int) -> None:
            await a.acquire()
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        for _ in range(3):
            a.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 2]
        assert a.in_flight == 0  # the first holder and both granted waiters released

    asyncio.run(run())


def test_release_more_than_taken_is_a_bug() -> None:
    async def run() -> None:
        with pytest.raises(RuntimeError):
            Admission(1).release()

    asyncio.run(run())
