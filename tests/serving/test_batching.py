"""List-carrying batch calls: flatten, split back in order, count items, group mixed model versions."""

from dataclasses import dataclass

import pytest

from seqrank.serving.batching import count_items, flatten, group_by_model, split


@dataclass(frozen=True)
class Model:
    model_version: str


def test_flatten_and_split_round_trip_in_call_order():
    calls = [["a", "b"], [], ["c"], ["d", "e", "f"]]
    items = flatten(calls)
    assert items == ["a", "b", "c", "d", "e", "f"] and count_items(calls) == 6
    assert split([item.upper() for item in items], calls) == [["A", "B"], [], ["C"], ["D", "E", "F"]]


def test_split_refuses_a_result_count_that_does_not_match():
    with pytest.raises(ValueError, match="expected 3, got 2"):
        split([1, 2], [[0], [0, 0]])


def test_group_by_model_keeps_first_seen_order():
    a, b = Model("a"), Model("b")
    groups = group_by_model([a, b, a, a, b], lambda model: model)
    assert [(model.model_version, positions) for model, positions in groups] == [("a", [0, 2, 3]), ("b", [1, 4])]


# SlotBatcher: no wait when a slot is free; everything that queued while slots were busy leaves together.

import asyncio  # noqa: E402

from seqrank.serving.batching import SlotBatcher  # noqa: E402


class GatedHandler:
    """Records each batch and holds it until released, like a slow downstream call."""

    def __init__(self, fail_on=None):
        self.batches = []
        self.gates = []
        self.fail_on = fail_on

    async def __call__(self, items):
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_on in items:
            raise ValueError(f"item {self.fail_on} broke its batch")
        return [item * 10 for item in items]

    def release_all(self):
        for gate in self.gates:
            gate.set()


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_idle_batcher_starts_each_request_at_once():
    async def scenario():
        handler = GatedHandler()
        batcher = SlotBatcher(handler, max_batch_size=8, max_concurrent=2)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        assert handler.batches == [[1]]  # no wait for company
        second = asyncio.create_task(batcher.submit(2))
        await settle()
        assert handler.batches == [[1], [2]]  # a second slot was free
        handler.release_all()
        return await first, await second

    assert asyncio.run(scenario()) == (10, 20)


def test_requests_queued_while_slots_are_busy_leave_together_in_order():
    async def scenario():
        handler = GatedHandler()
        batcher = SlotBatcher(handler, max_batch_size=4, max_concurrent=1)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        for _ in range(4):
            await settle()
            handler.release_all()
        results = await asyncio.gather(*tasks)
        return handler.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]  # max_batch_size caps each batch
    assert results == [i * 10 for i in range(1, 11)]


def test_a_failing_batch_fails_only_its_own_requests():
    async def scenario():
        handler = GatedHandler(fail_on=2)
        batcher = SlotBatcher(handler, max_batch_size=8, max_concurrent=1)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        for _ in range(3):
            await settle()
            handler.release_all()
        return await asyncio.gather(*tasks, return_exceptions=True), handler.batches

    (first, second, third), batches = asyncio.run(scenario())
    assert batches == [[1], [2, 3]]
    assert first == 10 and isinstance(second, ValueError) and isinstance(third, ValueError)


def test_a_caller_that_gave_up_is_left_out_of_the_next_batch():
    async def scenario():
        handler = GatedHandler()
        batcher = SlotBatcher(handler, max_batch_size=8, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        gone = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await settle()
        gone.cancel()
        await settle()
        handler.release_all()
        await first
        await settle()
        handler.release_all()
        return await kept, handler.batches

    assert asyncio.run(scenario()) == (30, [[1], [3]])


def test_a_handler_returning_the_wrong_number_of_results_fails_the_batch():
    async def short(items):
        return items[:-1]

    async def scenario():
        return await SlotBatcher(short, max_batch_size=4, max_concurrent=1).submit(1)

    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        asyncio.run(scenario())
