"""Group concurrent writes into one transaction, so many sessions share one commit.

While one batch is being committed in a thread, new submissions wait in the reactor; when
it finishes, everything that arrived meanwhile goes out as the next batch. Under load this
turns N fsyncs into one without adding latency when idle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet import defer, threads

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, run_batch: Callable[[list[T]], list[Any]], pool: Any, reactor: Any,
                 max_batch: int = 128) -> None:
        """run_batch(items) runs in a thread and returns one result (or exception) per item."""
        self._run_batch = run_batch
        self._pool = pool
        self._reactor = reactor
        self._max = max_batch
        self._pending: list[tuple[T, defer.Deferred]] = []
        self._running = False

    def submit(self, item: T) -> defer.Deferred:
        """A Deferred firing with the item's result once its transaction has committed."""
        d: defer.Deferred = defer.Deferred()
        self._pending.append((item, d))
        if not self._running:
            self._next()
        return d

    def _next(self) -> None:
        if not self._pending:
            self._running = False
            return
        self._running = True
        batch, self._pending = self._pending[: self._max], self._pending[self._max:]
        items = [item for item, _ in batch]
        run = threads.deferToThreadPool(self._reactor, self._pool, self._run_batch, items)
        run.addBoth(self._done, batch)

    def _done(self, results: Any, batch: list[tuple[T, defer.Deferred]]) -> None:
        if isinstance(results, list) and len(results) == len(batch):
            for (_, d), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    d.errback(result)
                else:
                    d.callback(result)
        else:
            for _, d in batch:
                d.errback(results if not isinstance(results, list) else RuntimeError("batch"))
        self._next()
