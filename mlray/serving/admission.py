"""Backpressure inside a replica: a bounded number of requests run, a bounded number wait, the rest are
refused at once with 503 and ``Retry-After``; a request that waits or runs past its deadline gets 504.

Serve has its own queue limit (``max_queued_requests``), but its refusal is a plain-text 503 from the
proxy; refusing here gives every protocol its own JSON error shape. The deployment lets a few more
requests reach the replica than run here, so that the refusal happens here (see ``app.build_app``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from mlray.errors import Overloaded, RequestTimeout

T = TypeVar("T")


class Admission:
    def __init__(self, *, max_ongoing: int, max_queued: int, timeout_s: float, retry_after_s: int) -> None:
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._running = 0
        self._waiting = 0
        self._slots = asyncio.Semaphore(max_ongoing)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[float]:
        """Hold a slot for one request; yields the seconds left before its deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._running + self._waiting >= self.max_ongoing + self.max_queued:
            raise Overloaded(
                f"the server is at capacity ({self._running} requests running, {self._waiting} queued); "
                f"retry after {self.retry_after_s} s", retry_after_s=self.retry_after_s)
        if self._slots.locked() or self._waiting:
            self._waiting += 1
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise RequestTimeout(f"the request waited {self.timeout_s} s for a free slot; "
                                     f"retry after {self.retry_after_s} s") from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()  # free: returns at once (the common case costs no timer)
        self._running += 1
        try:
            # Let the requests that arrived with this one reach admission before it holds the event loop:
            # parsing a body and a large model call do not yield, so without this turn they would wait
            # unseen behind it (and never be refused), instead of queueing or getting 503 at once.
            await asyncio.sleep(0)
            yield max(0.0, deadline - loop.time())
        finally:
            self._running -= 1
            self._slots.release()

    async def run(self, work: Awaitable[T], *, left_s: float) -> T:
        """Await ``work`` within the time the request has left."""
        try:
            async with asyncio.timeout(left_s):  # no extra task, unlike asyncio.wait_for
                return await work
        except TimeoutError:
            raise RequestTimeout(f"the request took longer than {self.timeout_s} s") from None
