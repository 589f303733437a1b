"""Requests that arrive together share one model call, in the replica's event loop.

Ray's ``@serve.batch`` does this too, at about ten times the cost per call (it rebuilds the handler's
signature with ``inspect`` on every call, and routes each request through its own queue and task machinery;
figures in ``bench/README.md``). The policy is ``@serve.batch``'s:

- the first request starts a batch; with ``wait_s == 0`` the batch takes whatever else is already queued
  when the event loop comes back to it (requests that arrived together), so a lone request never waits;
- with ``wait_s > 0`` a batch that is not full waits up to ``wait_s`` for company;
- at most ``max_batch_size`` items per call, one call at a time; the rest go in the next one.

``fn`` is called in the event loop with the items and returns one result per item, in order. If it raises,
every request of that batch gets the exception. A caller that gave up (its await was cancelled, e.g. by a
timeout) is skipped when the results are handed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, fn: Callable[[list[Item]], Sequence[Result]], *, max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size is {max_batch_size}; it must be at least 1")
        if wait_s < 0:
            raise ValueError(f"wait_s is {wait_s}; it must be 0 or more")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._full: asyncio.Event | None = None

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        elif self._full is not None and len(self._pending) >= self.max_batch_size:
            self._full.set()
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._gather()
                batch = self._pending[:self.max_batch_size]
                del self._pending[:self.max_batch_size]
                self._run(batch)
        finally:
            self._drainer = None
            for _, future in self._pending:  # only if this task itself was cancelled: nobody is left waiting
                future.cancel()
            self._pending.clear()

    async def _gather(self) -> None:
        """Let the requests that are ready in this turn of the loop (or within ``wait_s``) join the batch."""
        if self.wait_s <= 0 or len(self._pending) >= self.max_batch_size:
            await asyncio.sleep(0)
            return
        self._full = asyncio.Event()
        try:
            await asyncio.wait_for(self._full.wait(), self.wait_s)
        except TimeoutError:
            pass
        finally:
            self._full = None

    def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as err:  # noqa: BLE001 - every caller of the batch gets it, the batcher goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):  # this item's own failure: the others keep their answers
                future.set_exception(result)
            else:
                future.set_result(result)
