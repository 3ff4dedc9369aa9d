"""A micro-batcher: requests that arrive together with compatible settings share one model call.

`MicroBatcher(run_batch, ...)` queues items (`await batcher.submit(item)`). Its worker takes the oldest item, waits up
to `batch_wait_ms` for more items with the same `key(item)` (up to `max_batch_size`), and runs `run_batch(items)` in
the given executor (one thread for every model call of a server, so calls never overlap and the event loop stays
free). `run_batch` returns one result per item, in order; a result that is an `Exception` fails only its own item.
If `run_batch` raises for a batch of several items, each item is run again alone, so one bad request never fails
another. Past `max_queue` waiting items `submit` raises `Overloaded` (429); after `close()` starts it raises
`ServiceUnavailable` (503), while everything already accepted still runs. A waiting item whose `submit` is cancelled
(its client went away) leaves the queue at once and never runs (`on_drop` counts it).

The wait is only worth it when company can come: given `company` (a callable that says how many requests are on their
way, e.g. `backend.Arrivals.count`: admitted by the HTTP layer, not yet submitted), the oldest item stops waiting as soon as
none is. A lone request on an idle server then runs at once, as with `batch_wait_ms=0`, while requests that arrive
together still share a call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .backend import Arrivals, Overloaded, ServiceUnavailable


logger = logging.getLogger(__name__)

_COMPANY_POLL_S = 0.002


@dataclass
class _Pending:
    item: Any
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """
    Args:
        run_batch (`Callable[[list], list]`): runs a batch (in `executor`); one result or `Exception` per item.
        executor (`concurrent.futures.Executor`): where `run_batch` runs.
        key (`Callable[[item], Hashable]`, *optional*): items with equal keys may share a batch (default: all).
        max_batch_size (`int`): items per batch at most.
        batch_wait_ms (`float`): how long the oldest item waits for company (0: run what is there).
        max_queue (`int`): items waiting at most (the running batch not counted).
        on_batch (`Callable[[int], None]`, *optional*): called with each batch's size before it runs.
        on_drop (`Callable[[int], None]`, *optional*): called with the number of waiting items dropped because their
            `submit` was cancelled.
        company (`Callable[[], int]`, *optional*): how many more items are on their way (see `backend.Arrivals`); the wait
            ends when none is. Without it the oldest item always waits `batch_wait_ms`.
        name (`str`): for logs and error messages.
    """

    def __init__(
        self,
        run_batch: Callable[[list], list],
        executor: Executor,
        key: Callable[[Any], Hashable] | None = None,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        company: Callable[[], int] | None = None,
        name: str = "batcher",
    ):
        if max_batch_size < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise ValueError(
                f"{name}: max_batch_size and max_queue must be >= 1 and batch_wait_ms >= 0, got {max_batch_size}, "
                f"{max_queue} and {batch_wait_ms}."
            )
        self.run_batch, self.executor = run_batch, executor
        self.key = key or (lambda item: None)
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_ms / 1000.0, max_queue
        self.on_batch, self.on_drop, self.name = on_batch, on_drop, name
        self.company = company
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.running = 0  # items in the batch being run

    def depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return len(self._pending)

    async def submit(self, item):
        """Queues `item` and returns its result (raises its exception)."""
        if self._closing:
            raise ServiceUnavailable("The server is shutting down; retry on another replica.")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"The server's queue is full ({self.max_queue} waiting requests); retry later.")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, self.key(item), loop.create_future())
        self._pending.append(pending)
        Arrivals.landed()  # the request that submitted this is no longer on its way
        self._ensure_worker()
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._drop_waiting(pending)
            raise

    def _drop_waiting(self, pending: _Pending):
        """Takes a cancelled item off the queue if it is still waiting (a running one finishes in its batch)."""
        if not any(p is pending for p in self._pending):
            return
        self._pending = [p for p in self._pending if p is not pending]
        if self.on_drop is not None:
            self.on_drop(1)

    def _ensure_worker(self):
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"{self.name}-worker")

    async def _work(self):
        while self._pending:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Pending]:
        """Waits for company for the oldest item (up to `batch_wait_ms`), then takes its batch off the queue."""
        first = self._pending[0]
        deadline = first.enqueued + self.batch_wait_s
        while self._count_like(first) < self.max_batch_size and not self._closing and self._company_coming():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            if self.company is not None:  # look again soon: an arriving request may turn out bad and never come
                remaining = min(remaining, _COMPANY_POLL_S)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                continue  # the loop's checks decide: the deadline, or no company on its way
        batch = [p for p in self._pending if p.key == first.key][: self.max_batch_size]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return [p for p in batch if not p.future.done()]  # a cancelled request (client gone) is dropped

    def _company_coming(self) -> bool:
        return self.company is None or self.company() > 0

    def _count_like(self, first: _Pending) -> int:
        return sum(1 for p in self._pending if p.key == first.key)

    async def _run(self, batch: list[_Pending]):
        if self.on_batch is not None:
            self.on_batch(len(batch))
        self.running = len(batch)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._run_isolated, [p.item for p in batch]
            )
        finally:
            self.running = 0
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _run_isolated(self, items: list) -> list:
        """`run_batch(items)`; if it raises for several items, each item alone (so the faulty one alone fails)."""
        try:
            results = self.run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(items)} items")
            return results
        except Exception as error:  # noqa: BLE001 - handed to the item's request, which reports it
            if len(items) == 1:
                return [error]
            logger.warning("%s: a batch of %d failed (%s); running its items one by one", self.name, len(items), type(error).__name__)
            return [self._run_isolated([item])[0] for item in items]

    async def close(self):
        """Stops accepting, then waits until every accepted item has run."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)


__all__ = ["MicroBatcher"]
