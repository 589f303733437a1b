"""The cost of batching itself: Ray's ``@serve.batch`` against mlray's ``MicroBatcher``, in one event loop.

Concurrent callers (8 by default, about what one of two replicas holds at 16 clients) each await many
single-item calls of a batch function that does nothing, so what is measured is the batching machinery per
call. Both run in the same process, in turns, several rounds; prints a table of microseconds per call.

    python bench/batching.py            # ~10 s
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def _per_call_us(call: Callable[[int], Awaitable[int]], callers: int, calls: int) -> float:
    async def one() -> None:
        for i in range(calls):
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(callers)))
    return (time.perf_counter() - started) / (callers * calls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import ray.serve.batching as serve_batching
    from ray import serve

    from mlray.serving.batching import MicroBatcher

    # Outside a replica, @serve.batch's one start-up check (max_batch_size against the deployment's
    # max_ongoing_requests) has no replica context to read; it only logs a warning, so skip it here.
    serve_batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None

    class WithServeBatch:
        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def handle(self, items: list[int]) -> list[int]:
            return items

    batcher = MicroBatcher(lambda items: items, max_batch_size=32, wait_s=0.0)
    contenders: list[tuple[str, Callable[[int], Awaitable[int]]]] = [
        ("Ray @serve.batch", WithServeBatch().handle), ("mlray MicroBatcher", batcher.submit)]

    async def rounds() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for _, call in contenders:  # warm-up
            await _per_call_us(call, args.callers, 200)
        for _ in range(args.rounds):
            for name, call in contenders:
                out[name].append(await _per_call_us(call, args.callers, args.calls))
        return out

    results = asyncio.run(rounds())
    base = statistics.median(results["Ray @serve.batch"])
    print(f"\n# bench/batching.py: {args.callers} concurrent callers, {args.rounds} rounds of "
          f"{args.calls} calls each, in turns\n")
    print("| batcher | us per call (median) | each round | vs @serve.batch |")
    print("|---|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
