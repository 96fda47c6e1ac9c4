"""Streaming reader: WebDataset tar shards from any fsspec URL, split by rank, seeded shuffle, and a
position (`state_dict`) that lets a resumed run see exactly the samples it would have seen."""
from __future__ import annotations

import random
from typing import Iterator

import braceexpand
import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from lamscale import storage
from lamscale.data.schema import MomentSample, decode


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    # fsspec keeps one filesystem per process, so forked loader workers each make their own client.
    return fsspec.open(url, mode).open()


def register_fsspec_schemes() -> None:
    """WebDataset 1.0 has no s3/gcs opener; route those URLs through fsspec."""
    for scheme in ("s3", "gs", "gcs", "az", "abfs", "memory"):
        gopen_schemes[scheme] = _gopen_fsspec


def expand_urls(pattern: str) -> list[str]:
    """`dir/train-{000000..000003}.tar` (and comma- or space-separated lists) → absolute URLs."""
    urls = [u for part in pattern.replace(",", " ").split() for u in braceexpand.braceexpand(part)]
    return [storage.normalize(u) for u in urls]


def absolute_pattern(pattern: str) -> str:
    """The same shard pattern with local paths made absolute (Ray workers run in other folders)."""
    return " ".join(storage.normalize(part) for part in pattern.replace(",", " ").split())


def check_shards(pattern: str, key: str) -> list[str]:
    """Raise StorageError naming the first shard URL that does not exist."""
    urls = expand_urls(pattern)
    if not urls:
        raise storage.StorageError(f"{key}: no shard URLs in {pattern!r}")
    for url in urls:
        try:
            found = storage.exists(url)
        except Exception as e:  # unreachable endpoint, bad credentials…
            raise storage.StorageError(f"{key}: cannot reach shard {url}: {type(e).__name__}: {e}") from None
        if not found:
            raise storage.StorageError(f"{key}: shard not found: {url}")
    return urls


def iter_samples(urls: list[str]) -> Iterator[MomentSample]:
    register_fsspec_schemes()
    for raw in wds.tarfile_samples([{"url": u} for u in urls]):
        yield decode(raw)


class TrainStream:
    """An endless per-rank sample stream over epochs.

    Epoch e: shards are permuted by Random((seed, e)), rank r takes every world-th shard (or every
    world-th sample when there are fewer shards than ranks), then a buffer shuffle seeded by
    (seed, e, r). The position is (epoch, samples taken this epoch): replaying it is exact.
    """

    def __init__(self, pattern: str, rank: int, world: int, seed: int, buffer: int):
        self.urls, self.rank, self.world, self.seed, self.buffer = expand_urls(pattern), rank, world, seed, buffer
        self.epoch, self.offset = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def _epoch_samples(self, epoch: int) -> Iterator[MomentSample]:
        order = list(self.urls)
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        if len(order) >= self.world:
            mine = iter_samples(order[self.rank :: self.world])
        else:
            mine = (s for i, s in enumerate(iter_samples(order)) if i % self.world == self.rank)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        pool: list[MomentSample] = []
        for sample in mine:
            pool.append(sample)
            if len(pool) >= self.buffer:
                yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool

    def __iter__(self) -> Iterator[MomentSample]:
        while True:
            skip, produced = self.offset, False
            for i, sample in enumerate(self._epoch_samples(self.epoch)):
                produced = True
                if i < skip:
                    continue
                self.offset = i + 1
                yield sample
            if not produced:
                raise RuntimeError(f"rank {self.rank}: no samples in its split of {self.urls}")
            self.epoch, self.offset = self.epoch + 1, 0


def eval_samples(pattern: str, rank: int, world: int) -> Iterator[MomentSample]:
    """Every sample of the split exactly once across ranks (sample i goes to rank i % world)."""
    for i, sample in enumerate(iter_samples(expand_urls(pattern))):
        if i % world == rank:
            yield sample
