"""The training data loader of one rank: `data.workers` DataLoader processes (or none), and an exact
position kept in the training process — no messages to or from the workers.

Loader worker w of a rank reads its own endless stream (`TrainStream` part w, batched by a `Batcher`)
and yields (w, batch, its position after that batch, its skip counts). The DataLoader hands batches
out round-robin in order, and the streams never end, so batch i always comes from worker i mod W: the
training process records the position attached to the last batch it took from each worker. Resuming
starts each worker at its recorded position and relabels the DataLoader's workers so that the first
batch comes from the worker whose turn was next.
"""
from __future__ import annotations

import queue
import threading

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lamscale.config import Config
from lamscale.data.bucketing import Batcher
from lamscale.data.ops import SampleOps, VideoOps
from lamscale.data.reader import COUNTED, DataError, ReadOptions
from lamscale.data.stream import TrainStream
from lamscale.storage import StorageError

Collate = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader worker needs to rebuild its stream (pickled into spawned workers)."""

    pattern: str
    seed: int
    batch_size: int
    shuffle_buffer: int = 256
    token_budget: int = 0  # > 0: length-bucketed batches of at most this many padded tokens
    bucket_pool: int = 1024
    options: ReadOptions = field(default_factory=ReadOptions)
    ops: SampleOps = field(default_factory=VideoOps)  # the task's decode / training draw / length limits / size

    @classmethod
    def from_config(cls, cfg: Config, ops: SampleOps) -> LoaderSpec:
        d = cfg.data
        return cls(d.train, cfg.train.seed, d.batch_size, d.shuffle_buffer, d.token_budget, d.bucket_pool,
                   read_options(cfg), ops)


def read_options(cfg: Config) -> ReadOptions:
    d = cfg.data
    return ReadOptions(d.on_error, d.allow_pipe, d.read_retry_s, d.read_block_kib)


def worker_batches(spec: LoaderSpec, rank: int, world: int, worker: int, workers: int, position: dict | None,
                   collate: Collate) -> Iterator[tuple]:
    """(worker, batch, position after it, skip counts) forever; a data error ends it with (worker, None, message, None)."""
    try:
        stream = TrainStream(spec.pattern, rank, world, spec.seed, spec.shuffle_buffer, worker, workers, spec.options,
                             spec.ops)
        batcher = Batcher(stream, spec.batch_size, spec.token_budget, spec.bucket_pool)
        if position is not None:
            batcher.load_state_dict(position)
        for samples in batcher:
            yield worker, collate(samples), batcher.state_dict(), stream.skipped()
    except (DataError, StorageError, OSError) as e:  # one line for the trainer, not a worker traceback
        named = isinstance(e, (DataError, StorageError))  # their messages name shard and key already
        yield worker, None, str(e) if named else f"{type(e).__name__}: {e}", None


class _Streams(IterableDataset):
    def __init__(self, spec: LoaderSpec, rank: int, world: int, positions: list, first: int, collate: Collate):
        self.spec, self.rank, self.world, self.collate = spec, rank, world, collate
        self.positions, self.first = positions, first

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        n = len(self.positions)
        worker = ((info.id if info else 0) + self.first) % n  # DataLoader worker 0 answers first: make it `first`
        return worker_batches(self.spec, self.rank, self.world, worker, n, self.positions[worker], self.collate)


def _as_is(item: tuple) -> tuple:
    return item


class TrainLoader:
    """Endless training batches of one rank; `workers=0` reads in this process (the same batches as 1)."""

    def __init__(self, spec: LoaderSpec, rank: int, world: int, workers: int, collate: Collate, prefetch: int = 2):
        self.spec, self.rank, self.world, self.collate = spec, rank, world, collate
        self.workers, self.prefetch = workers, prefetch
        self.streams = max(1, workers)
        self.positions: list[dict | None] = [None] * self.streams
        self.counts = [dict.fromkeys(COUNTED, 0) for _ in range(self.streams)]
        self.next = 0  # the stream whose batch comes next

    @classmethod
    def from_config(cls, cfg: Config, rank: int, world: int, ops: SampleOps, collate: Collate) -> TrainLoader:
        """The rank's loader over data.train; `ops` and `collate` come from the task (picklable)."""
        return cls(LoaderSpec.from_config(cfg, ops), rank, world, cfg.data.workers, collate)

    def state_dict(self) -> dict:
        return {"version": 2, "streams": self.streams, "next": self.next, "positions": list(self.positions),
                "skipped": [dict(c) for c in self.counts]}

    def load_state_dict(self, state: dict) -> None:
        if "version" not in state:  # the single-process stream's position, from before loader workers
            state = {"version": 2, "streams": 1, "next": 0, "positions": [{"stream": state, "done": 0}],
                     "skipped": [dict.fromkeys(COUNTED, 0)]}
        if state["streams"] != self.streams:
            raise DataError(f"the checkpoint's loader has {state['streams']} worker stream(s), this run "
                            f"{self.streams}: resume with data.workers={state['streams']} (0 and 1 are the same)")
        self.next, self.positions = int(state["next"]), list(state["positions"])
        self.counts = [{k: int(c.get(k, 0)) for k in COUNTED} for c in state["skipped"]]

    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped as bad (`on_error: skip`) and samples truncated, in the batches taken so far."""
        return {k: sum(c[k] for c in self.counts) for k in COUNTED}

    def _items(self) -> Iterator[tuple]:
        dataset = _Streams(self.spec, self.rank, self.world, list(self.positions), self.next, self.collate)
        if self.workers == 0:
            return _read_ahead(iter(dataset), self.prefetch)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                               prefetch_factor=self.prefetch, in_order=True))

    def __iter__(self) -> Iterator[Any]:
        for worker, batch, position, counts in self._items():
            if worker != self.next:
                raise RuntimeError(f"loader worker {worker} answered when it was worker {self.next}'s turn")
            if batch is None:
                raise DataError(position)
            self.positions[worker], self.counts[worker] = position, counts
            self.next = (worker + 1) % self.streams
            yield batch


def _read_ahead(items: Iterator[tuple], depth: int) -> Iterator[tuple]:
    """The same items, produced `depth` ahead by a thread, so reading, decoding and collating (numpy and
    torch, mostly outside the GIL) overlap the training step. Positions are still recorded when an item
    is consumed, and the data path draws only from its own seeded RNGs, so runs stay bit-exact."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((True, item), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it as if it had read itself
            box.put((False, e))

    threading.Thread(target=produce, name="lamscale-read-ahead", daemon=True).start()
    try:
        while True:
            ok, value = box.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
