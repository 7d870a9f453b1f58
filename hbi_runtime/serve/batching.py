"""Dynamic batching: the requests of one lane, coalesced into one model call.

A :class:`Batcher` owns one worker thread and a bounded queue. A request handler calls :meth:`Batcher.submit`
with its item; the worker takes the first waiting item, then keeps taking more until the batch holds
``max_batch`` units (queries, videos) or ``max_delay_s`` has passed since the first, and hands the whole batch to
the lane's ``handler`` in one call. The handler returns one result (or one exception) per item, in order.

Bounds: at most ``queue_size`` items wait; :meth:`submit` on a full queue raises :class:`QueueFull` at once (the
server answers 503 with ``Retry-After``), so memory never grows with the offered load. An item whose caller gave
up (deadline passed, client gone) before the worker took it is dropped, not computed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class QueueFull(Exception):
    """The lane's queue holds ``queue_size`` items already."""

    def __init__(self, lane: str, size: int) -> None:
        super().__init__(f"the {lane} queue is full ({size} waiting requests)")
        self.lane, self.size = lane, size


class LaneStopped(Exception):
    """The server is shutting down: the lane takes no new work."""


@dataclass
class Item:
    """One request's work: ``payload`` for the handler, ``units`` it adds to a batch (its queries, videos)."""

    payload: Any
    units: int = 1
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.monotonic)


Handler = Callable[[Sequence[Any]], Sequence[Any]]


class Batcher:
    """One lane of work (text retrieval, QA, captions, ...) with its own worker thread.

    Args:
        name: the lane's name (metrics, messages).
        handler: ``handler(payloads) -> results``, one result per payload, in order; a result that is an
            ``Exception`` fails that item alone. An exception raised by the handler fails every item of the batch.
        max_batch: most units per handler call (1: no batching).
        max_delay_s: longest wait for more items after the first of a batch.
        queue_size: most items waiting.
        on_batch: called with ``(items, units)`` before each handler call (metrics).
    """

    def __init__(self, name: str, handler: Handler, *, max_batch: int, max_delay_s: float, queue_size: int,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_batch < 1 or queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1, max_delay_s >= 0")
        self.name, self.handler = name, handler
        self.max_batch, self.max_delay_s, self.queue_size = max_batch, max_delay_s, queue_size
        self.on_batch = on_batch
        self._queue: collections.deque[Item] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0  # items the worker is computing now
        self._thread = threading.Thread(target=self._run, name=f"hbi-serve-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, payload: Any, units: int = 1) -> concurrent.futures.Future:
        """Queue one item; its future gets the handler's result for it. Raises QueueFull, LaneStopped."""
        item = Item(payload, max(1, int(units)))
        with self._cond:
            if self._stopping:
                raise LaneStopped(self.name)
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.name, self.queue_size)
            self._queue.append(item)
            self._cond.notify()
        return item.future

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        return self._busy

    def stop(self, timeout: float | None = None) -> None:
        """Take no new item, finish what is queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[Item] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            units = batch[0].units
            deadline = time.monotonic() + self.max_delay_s
            while units < self.max_batch:
                if self._queue:
                    if units + self._queue[0].units > self.max_batch:
                        break
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    units += nxt.units
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            self._busy = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]
            try:
                if live:
                    self._compute(live)
            finally:
                with self._cond:
                    self._busy = 0

    def _compute(self, items: list[Item]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(items), sum(it.units for it in items))
        try:
            results = list(self.handler([it.payload for it in items]))
            if len(results) != len(items):
                raise RuntimeError(f"lane {self.name}: {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            for it in items:
                it.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for it, result in zip(items, results):
            if isinstance(result, BaseException):
                it.future.set_exception(result)
            else:
                it.future.set_result(result)
