"""Admission control: a bounded number of items in flight, never an unbounded queue.

Unary and batch calls take slots with :meth:`Admission.try_acquire` and are refused at once when
the server is full (RESOURCE_EXHAUSTED); stream items :meth:`Admission.acquire`, which waits, so
a full server stops reading the stream and gRPC flow control holds the client back. Waiters are
served first come, first served.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    """A counter of items in flight with a hard limit."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` slots if all are free now; never waits."""
        if self.in_flight + n > self.limit:
            return False
        self.in_flight += n
        return True

    async def acquire(self) -> None:
        """Take one slot, waiting (in arrival order) until one is free."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot was handed over just as the waiter went away
            raise

    def release(self, n: int = 1) -> None:
        if n > self.in_flight:
            raise RuntimeError("released more slots than were taken")
        self.in_flight -= n
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
