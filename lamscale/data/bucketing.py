"""Batches from a positioned sample stream: `batch_size` samples each, or (token budget) as many samples
of similar length as fit the budget once padded — length buckets.

Budget batches are formed per pool of consecutive samples: sorted by length, cut greedily under the
budget, emitted in a seeded order. A batcher's position is therefore a cut of the sample stream (the
pool's start) plus the batches already emitted from that pool: restoring it replays the pool exactly.
"""
from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from lamscale.data.stream import TrainStream

Size = Callable[[Any], tuple[int, ...]]  # a sample's padded extent per axis (SampleOps.size)


def budget_batches(pool: list[Any], budget: int, size: Size) -> list[list[Any]]:
    """Split `pool` into batches of similar length whose padded size B × (sum of axes) stays ≤ `budget`."""
    ordered = sorted(pool, key=size)  # stable: ties keep stream order
    batches: list[list[Any]] = []
    current: list[Any] = []
    widest: tuple[int, ...] = ()
    for sample in ordered:
        extent = size(sample)
        wider = tuple(max(a, b) for a, b in zip(widest, extent)) if widest else extent
        if current and (len(current) + 1) * sum(wider) > budget:
            batches.append(current)
            current, wider = [], extent
        current.append(sample)
        widest = wider
    if current:
        batches.append(current)
    return batches


class Batcher:
    """Lists of samples from `stream`, with a `state_dict()` that restores the exact next batch."""

    def __init__(self, stream: TrainStream, batch_size: int, token_budget: int = 0, pool: int = 1024):
        self.stream, self.batch_size, self.budget, self.pool = stream, batch_size, token_budget, pool
        self.cut, self.done = stream.state_dict(), 0

    def state_dict(self) -> dict:
        return {"stream": self.cut, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.cut, self.done = self.stream.state_dict(), int(state["done"])

    def _pool_batches(self, samples: Iterator[Any]) -> list[list[Any]]:
        if not self.budget:
            return [list(itertools.islice(samples, self.batch_size))]
        batches = budget_batches(list(itertools.islice(samples, self.pool)), self.budget, self.stream.ops.size)
        cut = self.cut
        random.Random(f"{self.stream.name}-pool-{cut['epoch']}-{cut['offset']}").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[Any]]:
        samples = iter(self.stream)
        while True:
            self.cut = self.stream.state_dict()
            batches = self._pool_batches(samples)
            for i in range(self.done, len(batches)):
                # the position after this batch: a pool fully emitted is a clean cut of the stream
                if i + 1 == len(batches):
                    self.cut, self.done = self.stream.state_dict(), 0
                else:
                    self.done = i + 1
                yield batches[i]
            self.done = 0
