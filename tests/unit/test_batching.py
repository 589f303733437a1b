"""mlray.serving.batching.MicroBatcher: which requests share a call, and what each caller gets back."""

from __future__ import annotations

import asyncio
import time

import pytest

from mlray.serving.batching import MicroBatcher


class Recorder:
    """A batch function that remembers each call's items and answers item * 10."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot answer {self.fail_on}")
        return [item * 10 for item in items]


def test_requests_that_arrive_together_share_one_call_and_each_gets_its_own_answer():
    fn = Recorder()

    async def main() -> list[int]:
        batcher = MicroBatcher(fn, max_batch_size=32, wait_s=0.0)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert fn.calls == [list(range(10))]


def test_a_lone_request_does_not_wait_and_later_ones_start_a_new_batch():
    fn = Recorder()

    async def main() -> None:
        batcher = MicroBatcher(fn, max_batch_size=32, wait_s=0.0)
        assert await batcher.submit(1) == 10
        assert await batcher.submit(2) == 20
        assert await asyncio.gather(batcher.submit(3), batcher.submit(4)) == [30, 40]

    asyncio.run(main())
    assert fn.calls == [[1], [2], [3, 4]]


def test_batches_hold_at_most_max_batch_size():
    fn = Recorder()

    async def main() -> list[int]:
        batcher = MicroBatcher(fn, max_batch_size=4, wait_s=0.0)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert [len(call) for call in fn.calls] == [4, 4, 2]
    assert [item for call in fn.calls for item in call] == list(range(10))  # in arrival order


def test_a_wait_lets_requests_arriving_a_little_later_join():
    fn = Recorder()

    async def late(i: int, batcher: MicroBatcher[int, int]) -> int:
        await asyncio.sleep(0.01 * i)
        return await batcher.submit(i)

    async def main() -> float:
        batcher = MicroBatcher(fn, max_batch_size=32, wait_s=0.5)
        started = time.monotonic()
        await asyncio.gather(*(late(i, batcher) for i in range(3)))
        return time.monotonic() - started

    waited = asyncio.run(main())
    assert fn.calls == [[0, 1, 2]]
    assert waited >= 0.45  # not full, so it waited out wait_s


def test_a_full_batch_goes_without_waiting_out_the_wait():
    fn = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(fn, max_batch_size=3, wait_s=30.0)
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher.submit(1), batcher.submit(2))
        return time.monotonic() - started

    assert asyncio.run(main()) < 10
    assert fn.calls == [[0, 1, 2]]


def test_an_error_reaches_every_caller_of_that_batch_and_the_next_batch_is_answered():
    fn = Recorder(fail_on=2)

    async def main() -> None:
        batcher = MicroBatcher(fn, max_batch_size=32, wait_s=0.0)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, ValueError) and "cannot answer 2" in str(r) for r in results)
        assert await batcher.submit(5) == 50

    asyncio.run(main())


def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_answer():
    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:-1], max_batch_size=8, wait_s=0.0)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)

    asyncio.run(main())


def test_a_caller_that_gave_up_is_skipped_and_the_others_are_answered():
    fn = Recorder()

    async def main() -> None:
        batcher = MicroBatcher(fn, max_batch_size=32, wait_s=0.05)
        gave_up = asyncio.ensure_future(batcher.submit(1))
        stays = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gave_up.cancel()
        assert await stays == 20
        with pytest.raises(asyncio.CancelledError):
            await gave_up

    asyncio.run(main())
    assert fn.calls == [[1, 2]]


@pytest.mark.parametrize(("size", "wait", "message"), [(0, 0.0, "max_batch_size is 0"), (4, -1.0, "wait_s is -1.0")])
def test_bad_settings_are_refused(size, wait, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(Recorder(), max_batch_size=size, wait_s=wait)
