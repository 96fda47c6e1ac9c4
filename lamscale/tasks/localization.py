"""What moment retrieval and grounding share: the per-frame localisation losses and 1-D NMS.

Per frame (clip) the head predicts a foreground logit and the distances from the frame's centre to its
moment's start and end, in units of a fixed span (so targets lie in [0, ~1]).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.nn import functional as F


class FeatureBatch:
    """Base of the video + text feature batches (a dataclass with video, video_valid, text, text_valid,
    per-frame targets and `meta`): the model's inputs, the real token count, the move to a device."""

    def inputs(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        return self.video.to(dtype), self.video_valid, self.text.to(dtype), self.text_valid

    @property
    def tokens(self) -> int:
        return int(self.video_valid.sum() + self.text_valid.sum())

    def to(self, device: torch.device):
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if f.name != "meta"})


def giou_1d(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of (start, end) intervals, elementwise over the leading dims."""
    inter = (torch.minimum(pred[..., 1], target[..., 1]) - torch.maximum(pred[..., 0], target[..., 0])).clamp(min=0)
    union = (pred[..., 1] - pred[..., 0]) + (target[..., 1] - target[..., 0]) - inter
    hull = torch.maximum(pred[..., 1], target[..., 1]) - torch.minimum(pred[..., 0], target[..., 0])
    iou = inter / union.clamp(min=1e-6)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def localization_losses(fg_logits: torch.Tensor, offsets: torch.Tensor, foreground: torch.Tensor,
                        target_offsets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Focal loss (alpha 0.25, gamma 2) on every real frame, and L1 + gIoU of the offsets on foreground
    frames; each normalised by the foreground count."""
    valid, fg = valid.float(), foreground
    n_fg = fg.sum().clamp(min=1)
    logits = fg_logits.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, fg, reduction="none")
    p_t = p * fg + (1 - p) * (1 - fg)
    alpha = 0.25 * fg + 0.75 * (1 - fg)
    focal = (alpha * (1 - p_t) ** 2 * ce * valid).sum() / n_fg
    offsets = offsets.float()
    l1 = ((offsets - target_offsets).abs().sum(-1) * fg).sum() / n_fg
    pred_win = torch.stack([-offsets[..., 0], offsets[..., 1]], -1)
    true_win = torch.stack([-target_offsets[..., 0], target_offsets[..., 1]], -1)
    giou = ((1 - giou_1d(pred_win, true_win)) * fg).sum() / n_fg
    return {"focal": focal, "l1": l1, "giou": giou}


def iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def nms(windows: list[list[float]], iou_threshold: float, keep: int) -> list[list[float]]:
    """Greedy 1-D NMS over [start, end, score] rows: the best-scoring first, dropping any row that
    overlaps a kept one by more than `iou_threshold`; at most `keep` rows."""
    if not windows:
        return []
    rows = np.asarray(windows, dtype=np.float64)
    order = np.argsort(-rows[:, 2], kind="stable")  # ties keep their input order
    starts, ends = rows[:, 0], rows[:, 1]
    lengths = ends - starts
    # each kept row suppresses its overlaps in one vector op: O(keep · n), and no python work per pair
    suppressed = np.zeros(len(rows), dtype=bool)
    kept: list[int] = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) == keep:
            break
        inter = np.clip(np.minimum(ends, ends[i]) - np.maximum(starts, starts[i]), 0, None)
        union = lengths + lengths[i] - inter
        suppressed |= np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0) > iou_threshold
    return [list(windows[i]) for i in kept]
