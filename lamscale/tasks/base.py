"""The Task interface: everything the generic trainer and data path need from one task.

A task is one module under `lamscale/tasks/` with a `Task` subclass registered by name (`task.name`).
The data path calls `sample_ops()` (decode, training draw, length limits, bucket size) and `collate`
in loader processes, so a task instance must pickle (it holds only its config). The trainer calls the
rest. Batches are any object with `inputs(dtype)` (the model's positional inputs), `to(device)`,
`meta` (one dict per sample) and `tokens` (real tokens, for throughput).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Iterable

import torch
from torch import nn

from lamscale.config import Config
from lamscale.data.ops import SampleOps


class Task:
    name = ""
    primary = ""  # the headline metric in `metrics()["brief"]` (sweeps and tables use it)
    record_id = "id"  # the field that identifies a prediction / ground-truth record

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # --- data (runs in loader processes) -----------------------------------------------------------
    def sample_ops(self) -> SampleOps:
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        raise NotImplementedError

    def eval_items(self, sample: Any) -> Iterable[Any]:
        """What one decoded val sample is evaluated as: itself, or several units (a movie → its sentences)."""
        return [sample]

    def eval_batch_size(self) -> int:
        return self.cfg.data.batch_size

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, out: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # --- evaluation -------------------------------------------------------------------------------------
    def predict(self, out: Any, batch: Any) -> list[dict]:
        """Predictions in the task's official submission format, one record per sample."""
        raise NotImplementedError

    def ground_truth(self, batch: Any) -> list[dict]:
        raise NotImplementedError

    def collect(self, predictions: list[dict], truths: list[dict]) -> tuple[list[dict], list[dict]]:
        """Every rank's records → one per id (e.g. a sentence's sliding-window pieces merged), sorted by id."""
        key = self.record_id
        return sorted(predictions, key=lambda p: p[key]), sorted(truths, key=lambda g: g[key])

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        """The official metrics; `["brief"]` holds the headline numbers (TensorBoard `val/…`)."""
        raise NotImplementedError

    def chance(self, truths: list[dict]) -> list[dict]:
        """Chance-level predictions for the same records (seeded): the level the model must beat."""
        raise NotImplementedError

    def chance_metrics(self, truths: list[dict]) -> dict:
        """The metrics of chance-level predictions: the level each eval line and table compares against."""
        return self.metrics(self.chance(truths), truths)

    def eval_line(self, metrics: dict, chance: dict) -> str:
        brief, base = metrics["brief"], chance["brief"]
        return " | ".join(f"{k} {brief[k]:.2f} (chance {base[k]:.2f})" for k in self.headline())

    def headline(self) -> list[str]:
        return [self.primary]

    def images(self, metrics: dict) -> dict[str, Any]:
        """Extra TensorBoard images from an eval ({tag: HWC uint8 array}), e.g. a confusion matrix."""
        return {}

    def texts(self, predictions: list[dict], truths: list[dict]) -> dict[str, str]:
        """Extra TensorBoard text from an eval ({tag: markdown}), e.g. generated vs reference captions."""
        return {}

    def preflight(self) -> None:
        """Checks that need more than the config (tools, files beside the shards), run before any worker
        starts; raise with one line naming what is wrong."""

    def capture_masks(self, model: nn.Module) -> ContextManager[list]:
        """Records the LAM mask maps of the next forward (see Encoder.capture_masks)."""
        capture = getattr(model, "capture_masks", None) or getattr(getattr(model, "encoder", None), "capture_masks", None)
        return capture() if capture is not None else nullcontext([])
