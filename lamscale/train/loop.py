"""The trainer each Ray worker runs: a small stateful object over engine, data, checkpoints, monitor."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from itertools import islice
from typing import Any, Iterator

import psutil
import torch

from lamscale import storage
from lamscale.config import Config, from_dict
from lamscale.data.loader import TrainLoader, read_options
from lamscale.data.reader import COUNTED, DataError, SKIP_KINDS
from lamscale.data.stream import eval_samples
from lamscale.tasks import get_task
from lamscale.train.checkpoint import CheckpointStore
from lamscale.train.commits import committed_steps
from lamscale.train import faults
from lamscale.train.collectives import Collectives
from lamscale.train.engine import build_engine, partitioned
from lamscale.train.monitor import Monitor, RateWindow
from lamscale.train.preempt import StopFlag


class Trainer:
    def __init__(self, cfg: Config, run_url: str, rank: int, world: int, use_gpu: bool, step: int | None = None,
                 tensorboard: bool = True):
        """Restores the newest committed checkpoint (or committed `step`); `tensorboard=False` (lamscale eval)
        writes no events, so evaluating an old step never purges a run's later TensorBoard points."""
        self.cfg, self.run_url, self.rank, self.world = cfg, run_url, rank, world
        self.task = get_task(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.engine = build_engine(self.task.build_model(), cfg, world, use_gpu)
        self.comm = Collectives(self.engine.device)  # NCCL on GPUs: control values live on the engine's device
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        # data.workers processes, exact position; the task decodes, draws, limits and collates
        self.loader = TrainLoader.from_config(cfg, rank, world, self.task.sample_ops(), self.task.collate)
        self.store = CheckpointStore(run_url, rank, world, cfg.train.keep_last, self.comm)
        self.step, self.samples_seen, self.tokens_seen = 0, 0, 0
        self.chance: dict | None = None  # metrics of random predictions, computed at the first eval
        self.stop = StopFlag(run_url, rank, self.comm)
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # per-rank dropout stream
        steps = committed_steps(run_url) if step is None else [step]
        if steps:
            rank_state, trainer_state = self.store.load(self.engine, steps[-1])
            self.loader.load_state_dict(rank_state["stream"])
            self.step, self.samples_seen, self.tokens_seen = (trainer_state[k] for k in ("step", "samples", "tokens"))
        self.monitor = Monitor(run_url, self.step, cfg.train.max_steps) if rank == 0 and tensorboard else None
        verb = ("resumed at" if tensorboard else "restored") if steps else "starting at"
        self.say(f"{verb} step {self.step}/{cfg.train.max_steps} "
                 f"({world} worker{'s' if world != 1 else ''}, ZeRO-{cfg.train.zero_stage}, {cfg.train.precision})")
        if cfg.train.zero_stage == 3:
            self.say("ZeRO-3 shards {} of {} parameters across ranks".format(*partitioned(self.engine)))

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(f"[lamscale] {line}", flush=True)

    def batches(self):
        return iter(self.loader)

    def fit(self) -> None:
        t, batches = self.cfg.train, self.batches()
        window = RateWindow(self.world)
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            window.waited(time.perf_counter() - t0)
            batch = batch.to(self.engine.device)
            out = self.engine(*batch.inputs(self.dtype))
            loss, parts = self.task.loss(out, batch)
            self.engine.backward(loss)
            self.engine.step()
            window.add(len(batch.meta), batch.tokens)
            self.samples_seen += len(batch.meta) * self.world
            self.tokens_seen += batch.tokens * self.world
            if self.engine.global_steps == self.step:
                continue  # inside a gradient-accumulation window
            self.step = self.engine.global_steps
            window.steps += 1
            faults.maybe_kill("after_step", self.step, self.rank)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.log(loss, parts, window.rates())
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                self.evaluate()
            saved = self.step % t.ckpt_every == 0 or self.step == t.max_steps
            if saved:
                self.save()
            if self.step < t.max_steps and self.stop.agreed():  # every rank sees the same answer
                if not saved:
                    self.save()
                self.say(f"stopped at step {self.step} on request (SIGTERM); run the same command to resume")
                break
        if self.step == t.max_steps and not storage.exists(storage.join(self.run_url, "metrics_val.json")):
            self.evaluate()  # a run resumed from its final checkpoint before its final eval was written
        if self.monitor:
            self.monitor.close()

    def log(self, loss: torch.Tensor, parts: dict[str, float], rates: dict[str, float]) -> None:
        """Rank 0 writes the window's loss terms (averaged over ranks), rates, memory and data counts."""
        values = [v / self.world for v in self.comm.sum([float(loss.detach()), *parts.values()])]
        counted = self.loader.skipped()  # skipped bad samples / cut shards, truncated samples: every rank so far
        counts = dict(zip(COUNTED, self.comm.sum([counted[k] for k in COUNTED])))
        if self.monitor is None:
            return
        self.monitor.scalars(self.step, {"skipped": sum(counts[k] for k in SKIP_KINDS), "truncated": counts["truncated"],
                                         **{f"skipped_{k}": counts[k] for k in SKIP_KINDS}}, "data/")
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        self.monitor.scalars(self.step, {"loss": values[0], "lr": lr, "grad_norm": float(grad_norm or 0.0)}, "train/")
        self.monitor.scalars(self.step, dict(zip(parts, values[1:])), "loss/")
        self.monitor.scalars(self.step, {**rates, "tokens_seen": self.tokens_seen,
                                         "rss_gib": psutil.Process().memory_info().rss / 2**30}, "perf/")
        self.say(self.monitor.progress(self.step, values[0], lr, rates["samples_per_s"]))

    def eval_batches(self, counts: dict) -> Iterator[Any]:
        """This rank's share of the val split, streamed in batches; then None until every rank is done."""
        samples = eval_samples(self.cfg.data.val, self.rank, self.world, read_options(self.cfg), self.task.sample_ops(), counts)
        items = (item for sample in samples for item in self.task.eval_items(sample))
        while chunk := list(islice(items, self.task.eval_batch_size())):
            yield self.task.collate(chunk)
        while True:
            yield None

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict | None:
        """Predictions and official metrics of data.val, written as predictions_<split>.jsonl,
        metrics_<split>.json (+ _random: chance level) into the run; returns the metrics on rank 0."""
        self.engine.eval()
        counts = {"truncated": 0}
        predictions, truths, maps, last = [], [], [], None
        for i, batch in enumerate(self.eval_batches(counts)):
            if not self.comm.any(batch is not None):
                break
            if batch is None and last is None:
                raise DataError(f"data.val: rank {self.rank} of {self.world} got no val sample; the split needs at "
                                f"least {self.world} samples")
            # a rank whose share ran out repeats its last batch: ZeRO-3 gathers need every rank's forward
            current = (batch or last).to(self.engine.device)
            draw = i == 0 and self.rank == 0 and self.cfg.train.mask_images
            with self.task.capture_masks(self.engine.module) if draw else nullcontext([]) as captured:
                out = self.engine(*current.inputs(self.dtype))
            maps = captured if draw else maps
            if batch is not None:
                predictions += self.task.predict(out, current)
                truths += self.task.ground_truth(current)
                last = batch
        gathered = self.comm.gather((predictions, truths, counts["truncated"]), self.world)
        self.engine.train()
        if self.rank != 0:
            return None
        predictions, truths = self.task.collect([p for ps, _, _ in gathered for p in ps],
                                                [g for _, gs, _ in gathered for g in gs])
        metrics = self.task.metrics(predictions, truths)
        if self.chance is None:  # the val set never changes within a run: score chance once
            self.chance = self.task.chance_metrics(truths)
            storage.write_bytes(storage.join(self.run_url, f"metrics_{split}_random.json"), json.dumps(self.chance, indent=4).encode())
        lines = "".join(json.dumps(p) + "\n" for p in predictions)
        storage.write_bytes(storage.join(self.run_url, f"predictions_{split}.jsonl"), lines.encode())
        report = {"step": self.step, **metrics}
        storage.write_bytes(storage.join(self.run_url, f"metrics_{split}.json"), json.dumps(report, indent=4).encode())
        if self.monitor is not None:
            self.monitor.scalars(self.step, {**metrics["brief"], "truncated": sum(n for _, _, n in gathered)}, "val/")
            self.monitor.mask_images(self.step, maps)
            self.monitor.images(self.step, self.task.images(metrics))
            self.monitor.texts(self.step, self.task.texts(predictions, truths))
        label = "" if split == "val" else f" ({split})"
        self.say(f"eval{label} @ {self.step}: {self.task.eval_line(metrics, self.chance)}")
        return report

    def save(self) -> None:
        t0 = time.perf_counter()
        trainer_state = {"step": self.step, "samples": self.samples_seen, "tokens": self.tokens_seen}
        self.store.save(self.engine, self.step, {"stream": self.loader.state_dict()}, trainer_state)
        if self.monitor:
            self.monitor.scalars(self.step, {"checkpoint_save_s": time.perf_counter() - t0}, "perf/")
            self.monitor.sync()
        self.say(f"checkpoint step {self.step} committed ({time.perf_counter() - t0:.1f}s)")
        faults.maybe_kill("after_commit", self.step, self.rank)


def train_worker(payload: dict) -> None:
    """Ray Train entry point (runs in every worker)."""
    import ray.train

    ctx = ray.train.get_context()
    cfg = from_dict(payload["config"])
    faults.arm(payload.get("driver_pid"))
    Trainer(cfg, payload["run_url"], ctx.get_world_rank(), ctx.get_world_size(), cfg.cluster.use_gpu).fit()


def eval_worker(payload: dict) -> None:
    """Ray Train entry point of `lamscale eval`: restore committed `step`, evaluate data.val as `split`."""
    import ray.train

    ctx = ray.train.get_context()
    cfg = from_dict(payload["config"])
    trainer = Trainer(cfg, payload["run_url"], ctx.get_world_rank(), ctx.get_world_size(), cfg.cluster.use_gpu,
                      step=payload["step"], tensorboard=False)
    trainer.evaluate(payload["split"])
