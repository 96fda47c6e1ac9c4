"""What the data path asks of a sample type: decode its tar members, prepare it (a training draw such as
a window or an augmentation, then the model's length limits) and measure it for length buckets.

The stream, the batcher and the loader are generic over `SampleOps`; each task hands its own in
(`Task.sample_ops`). `VideoOps` is the video + text feature schema (`schema.MomentSample`) that
moment retrieval and grounding shards share.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from lamscale.data import windows
from lamscale.data.batch import LengthLimit
from lamscale.data.schema import MomentSample, decode


class SampleOps(Protocol):
    def decode(self, raw: dict) -> Any:
        """Raw members (bytes per extension, `__key__`, `__url__`) → a sample; SampleError names shard and key."""

    def prepare(self, sample: Any, rng: random.Random | None, where: str) -> tuple[Any, bool]:
        """(sample, truncated). `rng` is given for training draws (seeded by seed, epoch and key, so a
        resumed run draws the same); `where` names the shard for error messages."""

    def size(self, sample: Any) -> tuple[int, ...]:
        """The sample's padded extent per axis in a batch (summed for token budgets)."""


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The training draw of sample `key` in `epoch` (the same string the window draws always used)."""
    return windows.window_rng(seed, epoch, key)


@dataclass(frozen=True)
class VideoOps:
    """MomentSample: clip features + query tokens; training windows of `window` clips; length limits."""

    window: int = 0
    limit: LengthLimit = field(default_factory=LengthLimit)

    def decode(self, raw: dict) -> MomentSample:
        return decode(raw)

    def prepare(self, sample: MomentSample, rng: random.Random | None, where: str) -> tuple[MomentSample, bool]:
        if rng is not None:
            sample = windows.crop(sample, self.window, rng)
        return self.limit.fit(sample, where)

    def size(self, sample: MomentSample) -> tuple[int, int]:
        return min(len(sample.video), self.limit.max_clips), min(len(sample.text), self.limit.max_text)
