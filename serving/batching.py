"""Batching across the deployments: the ingress's `SlotBatcher`, and list-carrying calls downstream.

The ingress batches concurrent Rank requests and sends each stage one list per batch, so a request costs one
deployment call per stage per batch instead of one each; at this model size a call costs far more than the
compute. `@serve.batch` cannot do that part without delaying every request: it forms a batch (waiting up to
batch_wait_timeout_s) before taking one of its max_concurrent_batches slots, so with no wait each request
becomes its own batch. `SlotBatcher` forms a batch when a slot frees: an idle service sends a request on at
once, a busy one sends everything that queued meanwhile together.

Downstream, `@serve.batch` merges the lists that arrive together (several ingress batches or replicas):
`count_items` makes its max_batch_size count histories or queries rather than calls. During a reload a
batch may mix model versions: `group_by_model`.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
ModelT = TypeVar("ModelT")


def count_items(calls: Sequence[Sequence[object]]) -> int:
    """`batch_size_fn` of list-carrying batch methods: the batch size is the number of items, not calls."""
    return sum(len(call) for call in calls)


def flatten(calls: Sequence[Sequence[ItemT]]) -> list[ItemT]:
    return [item for call in calls for item in call]


def split(results: Sequence[ResultT], calls: Sequence[Sequence[object]]) -> list[list[ResultT]]:
    """Per-call result lists for the flattened `results`, in call order."""
    if len(results) != count_items(calls):
        raise ValueError(f"results: expected {count_items(calls)}, got {len(results)}")
    out, start = [], 0
    for call in calls:
        out.append(list(results[start : start + len(call)]))
        start += len(call)
    return out


def group_by_model(items: Sequence[ItemT], model_of: Callable[[ItemT], ModelT]) -> list[tuple[ModelT, list[int]]]:
    """Positions of a batch's items per model version, first-seen order; a batch mixes versions only mid-reload."""
    groups: dict[str, tuple[ModelT, list[int]]] = {}
    for position, item in enumerate(items):
        model = model_of(item)
        groups.setdefault(model.model_version, (model, []))[1].append(position)  # type: ignore[attr-defined]
    return list(groups.values())


class SlotBatcher(Generic[ItemT, ResultT]):
    """Runs `handler(items) -> results` (same length, same order) on at most `max_concurrent` batches at a time.

    A batch starts as soon as a slot is free and takes up to `max_batch_size` queued items; nothing waits for a
    batch to fill. An exception from `handler` fails every item of its batch; a caller that gives up (cancelled)
    leaves the rest of its batch unharmed. Use from one event loop (a replica's).
    """

    def __init__(
        self, handler: Callable[[list[ItemT]], Awaitable[list[ResultT]]], max_batch_size: int, max_concurrent: int
    ) -> None:
        if max_batch_size < 1 or max_concurrent < 1:
            raise ValueError(f"max_batch_size and max_concurrent must be >= 1, got {max_batch_size}, {max_concurrent}")
        self._handler = handler
        self._max_batch_size = max_batch_size
        self._max_concurrent = max_concurrent
        self._queue: list[tuple[ItemT, asyncio.Future]] = []
        self._running = 0
        self._tasks: set[asyncio.Task] = set()  # strong references until done

    async def submit(self, item: ItemT) -> ResultT:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._running < self._max_concurrent and self._queue:
            batch = self._queue[: self._max_batch_size]
            del self._queue[: self._max_batch_size]
            batch = [(item, future) for item, future in batch if not future.done()]  # drop callers that left
            if not batch:
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[ItemT, asyncio.Future]]) -> None:
        try:
            results = await self._handler([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:  # cancelled (replica shutdown): so are its callers
            for _, future in batch:
                future.cancel()
            raise
        finally:
            self._running -= 1
            self._start_batches()
