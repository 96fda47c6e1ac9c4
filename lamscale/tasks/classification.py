"""Image classification with a LAM ViT (Fashion-MNIST offline, ImageNet-1K image folders).

Shard samples are `<key>.png|jpg` + `<key>.json` with an integer `label` (the idx and image-folder
builders write them). Exact-size images (Fashion-MNIST): training draws a random crop with zero padding
and a horizontal flip per sample (seeded by seed, epoch and key, so a resumed run draws the same) and
evaluation sees the image as it is. Photos (`task.resize`): training draws a random resized crop and a
flip, evaluation takes the central 87.5 % square, both resized to `image_size`.
Predictions: one JSON line per image with its key, true label, top-5 classes and their probabilities.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lamscale.config import ClassificationConfig
from lamscale.data.schema import SampleError
from lamscale.tasks import register
from lamscale.tasks.base import Task

IMAGE_MEMBERS = ("png", "jpg", "jpeg")
MODES = {1: "L", 3: "RGB"}


@dataclass
class ImageSample:
    key: str
    meta: dict
    image: np.ndarray  # (H, W, C) uint8


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B, C, H, W) float, normalised
    labels: torch.Tensor  # (B,) int64
    meta: list[dict]
    tokens_per_image: int

    def inputs(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
        return (self.images.to(dtype),)

    def to(self, device: torch.device) -> "ImageBatch":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @property
    def tokens(self) -> int:
        return len(self.meta) * self.tokens_per_image


@dataclass(frozen=True)
class ImageOps:
    """Decode and check one image sample; the training draw is a padded random crop + flip."""

    image_size: int
    channels: int
    num_classes: int
    crop_padding: int = 0
    hflip: bool = False
    resize: bool = False

    def decode(self, raw: dict) -> ImageSample:
        from PIL import Image

        where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
        member = next((m for m in IMAGE_MEMBERS if m in raw), None)
        if member is None or "json" not in raw:
            raise SampleError(f"{where}: expected a json and an image member ({'/'.join(IMAGE_MEMBERS)}), got {sorted(k for k in raw if not k.startswith('__'))}")
        try:
            meta = json.loads(raw["json"])
            with Image.open(io.BytesIO(raw[member])) as img:
                img.load()
                if self.resize and img.mode != MODES[self.channels]:
                    img = img.convert(MODES[self.channels])  # photo collections hold a few grey or CMYK files
                mode, size = img.mode, img.size
                array = np.asarray(img)
        except Exception as e:  # corrupt bytes of any kind
            raise SampleError(f"{where}: cannot decode {member} ({type(e).__name__}: {e})") from None
        channels = {m: c for c, m in MODES.items()}.get(mode)
        if channels != self.channels:
            raise SampleError(f"{where}: image mode {mode} ({channels or '?'} channels), task.channels={self.channels}")
        if size != (self.image_size, self.image_size) and not self.resize:
            raise SampleError(f"{where}: image is {size[0]}×{size[1]}, task.image_size={self.image_size} "
                              f"(task.resize=true resizes photos of any size)")
        label = meta.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_classes:
            raise SampleError(f"{where}: label {label!r} is not a class in 0..{self.num_classes - 1} (task.num_classes)")
        return ImageSample(raw["__key__"], meta, array.reshape(size[1], size[0], self.channels))

    def prepare(self, sample: ImageSample, rng: random.Random | None, where: str) -> tuple[ImageSample, bool]:
        if self.resize:
            return ImageSample(sample.key, sample.meta, self._resized(sample.image, rng)), False
        if rng is None:
            return sample, False
        image = sample.image
        if self.crop_padding:
            p = self.crop_padding
            padded = np.pad(image, ((p, p), (p, p), (0, 0)))
            top, left = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
            image = padded[top : top + self.image_size, left : left + self.image_size]
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        return ImageSample(sample.key, sample.meta, np.ascontiguousarray(image)), False

    def _resized(self, image: np.ndarray, rng: random.Random | None) -> np.ndarray:
        """Training (rng): a random resized crop (torchvision's RandomResizedCrop draw) and a flip; evaluation:
        the central 87.5 % square. Either is resized to image_size² with bilinear filtering."""
        from PIL import Image

        h, w = image.shape[:2]
        box = None
        if rng is not None:
            for _ in range(10):
                area = h * w * rng.uniform(0.08, 1.0)
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
                if 0 < cw <= w and 0 < ch <= h:
                    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                    box = (left, top, left + cw, top + ch)
                    break
        if box is None:  # evaluation, or no draw fitted: the central square
            side = min(h, w) * (0.875 if rng is None else 1.0)
            left, top = (w - side) / 2, (h - side) / 2
            box = (left, top, left + side, top + side)
        img = Image.fromarray(image[..., 0] if self.channels == 1 else image)
        out = np.asarray(img.resize((self.image_size, self.image_size), Image.BILINEAR, box=box))
        out = out.reshape(self.image_size, self.image_size, self.channels)
        if rng is not None and self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def size(self, sample: ImageSample) -> tuple[int]:
        return (self.image_size * self.image_size,)


@register
class Classification(Task):
    name = "classification"
    primary = "top1"
    record_id = "key"

    @property
    def settings(self) -> ClassificationConfig:
        return self.cfg.task

    def sample_ops(self) -> ImageOps:
        t = self.settings
        return ImageOps(t.image_size, t.channels, t.num_classes, t.crop_padding, t.hflip, t.resize)

    def collate(self, samples: list[ImageSample]) -> ImageBatch:
        t = self.settings
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div_(255)
        images = (images - t.mean) / t.std
        labels = torch.tensor([s.meta["label"] for s in samples], dtype=torch.long)
        tokens = 1 + (t.image_size // t.patch_size) ** 2
        return ImageBatch(images, labels, [{"key": s.key, "label": s.meta["label"]} for s in samples], tokens)

    def build_model(self) -> nn.Module:
        from lamscale.model.vit import ViT

        t = self.settings
        return ViT(self.cfg.model, t.image_size, t.patch_size, t.channels, t.num_classes)

    def loss(self, out: torch.Tensor, batch: ImageBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(out.float(), batch.labels, label_smoothing=self.settings.label_smoothing)
        return loss, {"cross_entropy": float(loss.detach())}

    @torch.no_grad()
    def predict(self, out: torch.Tensor, batch: ImageBatch) -> list[dict]:
        probs = out.float().softmax(-1).cpu()
        top = probs.topk(min(5, probs.shape[1]), dim=-1)
        return [{"key": m["key"], "label": m["label"], "top5": idx.tolist(), "scores": [round(v, 5) for v in p.tolist()]}
                for m, idx, p in zip(batch.meta, top.indices, top.values)]

    def ground_truth(self, batch: ImageBatch) -> list[dict]:
        return [dict(m) for m in batch.meta]

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        return classification_metrics(predictions, truths, self.settings.num_classes)

    def chance(self, truths: list[dict]) -> list[dict]:
        g = np.random.default_rng(0)
        k = min(5, self.settings.num_classes)
        return [{"key": t["key"], "label": t["label"], "top5": g.permutation(self.settings.num_classes)[:k].tolist(),
                 "scores": [round(1 / self.settings.num_classes, 5)] * k} for t in truths]

    def headline(self) -> list[str]:
        return ["top1", "top5"]

    def images(self, metrics: dict) -> dict[str, np.ndarray]:
        from lamscale.train.monitor import heatmap

        confusion = torch.tensor(metrics["confusion"], dtype=torch.float32)
        rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)  # each true class sums to 1
        scale = max(1, 240 // len(rows))
        return {"val/confusion": np.kron(heatmap(rows), np.ones((scale, scale, 1), dtype=np.uint8))}


def classification_metrics(predictions: list[dict], truths: list[dict], num_classes: int) -> dict:
    """top-1 / top-5 accuracy (%), per-class top-1 and the confusion matrix (rows: true, cols: predicted)."""
    predicted = {p["key"]: p["top5"] for p in predictions}
    missing = [t["key"] for t in truths if t["key"] not in predicted]
    if missing:
        raise ValueError(f"predictions lack {len(missing)} of {len(truths)} keys, e.g. {missing[0]!r}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5 = 0
    for t in truths:
        top = predicted[t["key"]]
        confusion[t["label"], top[0]] += 1
        top5 += t["label"] in top[:5]
    n = max(len(truths), 1)
    per_class = {str(c): round(100 * confusion[c, c] / max(confusion[c].sum(), 1), 2) for c in range(num_classes)}
    brief = {"top1": round(100 * np.trace(confusion) / n, 2), "top5": round(100 * top5 / n, 2)}
    return {"brief": brief, "per_class_top1": per_class, "confusion": confusion.tolist(), "n": len(truths)}
