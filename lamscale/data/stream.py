"""Streaming reader: WebDataset tar shards from any fsspec URL, split by rank and loader worker, seeded
shuffle, and a position (`state_dict`) that lets a resumed run see exactly the samples it would have seen."""
from __future__ import annotations

import random
from typing import Any, Iterator

from lamscale.data.ops import SampleOps, VideoOps, sample_rng
from lamscale.data.reader import (COUNTED, DataError, ReadOptions, print_skip, read_samples, refuse_pipe,
                                   shard_samples)
from lamscale.data.urls import expand_urls


def iter_samples(urls: list[str], options: ReadOptions = ReadOptions(), ops: SampleOps = VideoOps()) -> Iterator[Any]:
    return read_samples(urls, options, decode=ops.decode)


def split(order: list[str], parts: list[tuple[int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
    """Part k of n, for each (k, n) in turn (rank of world, then worker of workers): every n-th shard,
    or — once there are fewer shards than parts — every n-th sample. Returns (shards, sample filters)."""
    shards, filters = list(order), []
    for k, n in parts:
        if filters or len(shards) < n:
            filters.append((k, n))
        else:
            shards = shards[k::n]
    return shards, filters


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


class TrainStream:
    """An endless sample stream over epochs for one (rank, loader worker).

    Epoch e: shards are permuted by Random((seed, e)); rank r takes its part, then worker w its part of
    that (`split`); a buffer shuffle seeded by (seed, e, r[, w]) follows; each sample gets its training
    draw (`ops.prepare`: a window, an augmentation) from Random((seed, e, key)). The position is (epoch,
    samples emitted this epoch); restoring it replays the epoch's reads up to there, so it is exact. The state also pins the epoch's shard list and the
    read cursor (shard index, samples read from it), checked after the replay, and the skip counts.
    """

    def __init__(self, pattern: str, rank: int, world: int, seed: int, buffer: int, worker: int = 0, workers: int = 1,
                 options: ReadOptions = ReadOptions(), ops: SampleOps = VideoOps()):
        self.urls = expand_urls(pattern)
        refuse_pipe(self.urls, "data.train", options.allow_pipe)
        self.rank, self.world, self.worker, self.workers = rank, world, worker, workers
        self.seed, self.buffer, self.options, self.ops = seed, buffer, options, ops
        self.name = f"{seed}-{rank}" if workers == 1 else f"{seed}-{rank}-{worker}"  # seeds other draws of this stream
        self.epoch, self.offset, self.cursor = 0, 0, [0, 0]
        self.skipped_before = dict.fromkeys(COUNTED, 0)  # counted in the epochs before this one
        self.skipped_now = dict.fromkeys(COUNTED, 0)  # counted in this epoch's reads so far
        self._pinned: dict | None = None  # a restored position, checked once the replay reaches it
        self._reading = [0, 0]  # the read cursor: (index in this epoch's shards, samples read from that shard)
        self._quiet = False
        self._split: tuple[int, tuple[list[str], list[tuple[int, int]]]] = (-1, ([], []))

    def epoch_split(self, epoch: int) -> tuple[list[str], list[tuple[int, int]]]:
        if self._split[0] != epoch:  # state_dict() asks once per batch: shuffle each epoch's order once
            order = list(self.urls)
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._split = (epoch, split(order, [(self.rank, self.world), (self.worker, self.workers)]))
        return self._split[1]

    def skipped(self) -> dict[str, int]:
        return {k: self.skipped_before[k] + self.skipped_now[k] for k in COUNTED}

    def state_dict(self) -> dict:
        shards = [_name(u) for u in self.epoch_split(self.epoch)[0]]
        return {"epoch": self.epoch, "offset": self.offset, "shards": shards, "cursor": list(self.cursor),
                "skipped": dict(self.skipped_before)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.skipped_before = {k: int(state.get("skipped", {}).get(k, 0)) for k in COUNTED}
        self.cursor = list(state.get("cursor", [0, 0]))
        self._pinned = state if "shards" in state else None  # states saved before the pin have none
        if self._pinned is not None:
            now = [_name(u) for u in self.epoch_split(self.epoch)[0]]
            if now != list(state["shards"]):
                raise DataError(f"{self._who()}: epoch {self.epoch} read shards {state['shards']} at the checkpoint, "
                                f"data.train now gives {now}: the shard list changed, exact resume is impossible")

    def _who(self) -> str:
        return f"rank {self.rank}" + (f" loader worker {self.worker}" if self.workers > 1 else "")

    def _skip(self, kind: str, message: str) -> None:
        self.skipped_now[kind] += 1
        if not self._quiet:  # a replay after resume meets the same bad data again: it was reported then
            print_skip(kind, message)

    def _read(self, shards: list[str], filters: list[tuple[int, int]], epoch: int) -> Iterator[Any]:
        seen = [0] * len(filters)
        for index, url in enumerate(shards):
            for n, sample in enumerate(shard_samples(url, self.options, self._skip, self.ops.decode)):
                self._reading = [index, n + 1]
                keep = True
                for f, (k, parts) in enumerate(filters):
                    keep, seen[f] = seen[f] % parts == k, seen[f] + 1
                    if not keep:
                        break
                if keep:
                    sample, cut = self.ops.prepare(sample, sample_rng(self.seed, epoch, sample.key), url)
                    if cut:
                        self._skip("truncated", f"{url}: sample {sample.key!r} cut to the model's length limits")
                    yield sample

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[Any, list[int]]]:
        worker = f"-{self.worker}" if self.workers > 1 else ""  # one worker: the seeds of the single-process stream
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}{worker}")
        pool: list[Any] = []
        for sample in self._read(*self.epoch_split(epoch), epoch):
            pool.append(sample)
            if len(pool) >= self.buffer:
                yield pool.pop(rng.randrange(len(pool))), self._reading
        rng.shuffle(pool)
        for sample in pool:
            yield sample, self._reading

    def __iter__(self) -> Iterator[Any]:
        while True:
            skip, produced = self.offset, 0
            self.skipped_now = dict.fromkeys(COUNTED, 0)
            self._quiet = skip > 0
            for i, (sample, reading) in enumerate(self._epoch_samples(self.epoch)):
                produced = i + 1
                if i < skip:
                    if i == skip - 1:
                        self._check_replay(reading)
                    continue
                self._quiet = False
                self.offset, self.cursor = i + 1, list(reading)
                yield sample
            if produced < skip or not produced:
                raise DataError(f"{self._who()}: epoch {self.epoch} has {produced} samples in its split of "
                                f"{len(self.urls)} shards" + (f", the checkpoint was at sample {skip}" if skip else ""))
            self.skipped_before = self.skipped()
            self.skipped_now = dict.fromkeys(COUNTED, 0)
            self.epoch, self.offset, self.cursor, self._pinned = self.epoch + 1, 0, [0, 0], None

    def _check_replay(self, reading: list[int]) -> None:
        pinned, self._pinned = self._pinned, None
        if pinned is not None and list(pinned["cursor"]) != list(reading):
            raise DataError(f"{self._who()}: epoch {self.epoch} sample {self.offset} was read at shard cursor "
                            f"{pinned['cursor']} at the checkpoint, now at {reading}: the shards' contents changed")


def eval_samples(pattern: str, rank: int, world: int, options: ReadOptions = ReadOptions(),
                 ops: SampleOps = VideoOps(), counts: dict | None = None) -> Iterator[Any]:
    """Every sample of the split exactly once across ranks (sample i goes to rank i % world), prepared
    without a training draw; samples cut to the model's limits are counted in `counts["truncated"]`."""
    urls = expand_urls(pattern)
    refuse_pipe(urls, "data.val", options.allow_pipe)
    i = 0
    for url in urls:
        for sample in shard_samples(url, options, print_skip, ops.decode):
            if i % world == rank:
                sample, cut = ops.prepare(sample, None, url)
                if cut and counts is not None:
                    counts["truncated"] = counts.get("truncated", 0) + 1
                yield sample
            i += 1
