"""Batches from a positioned sample stream: `batch_size` samples each, or (token budget) as many samples
of similar length as fit the budget once padded — length buckets.

Budget batches are formed per pool of consecutive samples: sorted by length, cut greedily under the
budget, emitted in a seeded order. A batcher's position is therefore a cut of the sample stream (the
pool's start) plus the batches already emitted from that pool: restoring it replays the pool exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import TYPE_CHECKING, Iterator

from lamscale.data.schema import MomentSample

if TYPE_CHECKING:
    from lamscale.data.stream import TrainStream
    from lamscale.tasks.moment_retrieval import MomentBatch


def sample_size(sample: MomentSample, max_clips: int, max_text: int) -> tuple[int, int]:
    """(clips, text tokens) the sample occupies in a batch."""
    return min(len(sample.video), max_clips), min(len(sample.text), max_text)


def budget_batches(pool: list[MomentSample], budget: int, max_clips: int, max_text: int) -> list[list[MomentSample]]:
    """Split `pool` into batches of similar length whose padded size B × (clips + text) stays ≤ `budget`."""
    ordered = sorted(pool, key=lambda s: sample_size(s, max_clips, max_text))  # stable: ties keep stream order
    batches: list[list[MomentSample]] = []
    current: list[MomentSample] = []
    widest = (0, 0)
    for sample in ordered:
        clips, text = sample_size(sample, max_clips, max_text)
        wider = (max(widest[0], clips), max(widest[1], text))
        if current and (len(current) + 1) * sum(wider) > budget:
            batches.append(current)
            current, wider = [], (clips, text)
        current.append(sample)
        widest = wider
    if current:
        batches.append(current)
    return batches


class Batcher:
    """Lists of samples from `stream`, with a `state_dict()` that restores the exact next batch."""

    def __init__(self, stream: TrainStream, batch_size: int, token_budget: int = 0, pool: int = 1024,
                 max_clips: int = 1 << 30, max_text: int = 1 << 30):
        self.stream, self.batch_size, self.budget, self.pool = stream, batch_size, token_budget, pool
        self.max_clips, self.max_text = max_clips, max_text
        self.cut, self.done = stream.state_dict(), 0

    def state_dict(self) -> dict:
        return {"stream": self.cut, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.cut, self.done = self.stream.state_dict(), int(state["done"])

    def _pool_batches(self, samples: Iterator[MomentSample]) -> list[list[MomentSample]]:
        if not self.budget:
            return [list(itertools.islice(samples, self.batch_size))]
        batches = budget_batches(list(itertools.islice(samples, self.pool)), self.budget, self.max_clips, self.max_text)
        cut = self.cut
        random.Random(f"{self.stream.name}-pool-{cut['epoch']}-{cut['offset']}").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[MomentSample]]:
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


def trim_padding(batch: MomentBatch) -> MomentBatch:
    """Drop the padding columns no sample of the batch uses (collate pads to model.max_clips/max_text)."""
    clips, text = int(batch.video_valid.sum(1).max()), int(batch.text_valid.sum(1).max())
    per_clip = ("video", "video_valid", "foreground", "offsets", "saliency")
    return dataclasses.replace(batch, **{k: getattr(batch, k)[:, :clips] for k in per_clip},
                               text=batch.text[:, :text], text_valid=batch.text_valid[:, :text])
