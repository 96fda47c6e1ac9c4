"""Moment retrieval + highlight detection (QVHighlights): targets, losses, window decoding.

Per clip the head predicts foreground, the distances from the clip centre to its moment's start and
end (in units of the padded video length L = max_clips · clip_len) and a saliency score.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lamscale.config import MomentRetrievalConfig
from lamscale.data.batch import LengthLimit, pad_stack
from lamscale.data.ops import VideoOps
from lamscale.data.schema import MomentSample
from lamscale.tasks import register
from lamscale.tasks.base import Task
from lamscale.tasks.localization import FeatureBatch, localization_losses, nms
from lamscale.tasks.qvhighlights_metrics import evaluate


@dataclass
class MomentBatch(FeatureBatch):
    video: torch.Tensor  # (B, T, Dv)
    video_valid: torch.Tensor  # (B, T) bool
    text: torch.Tensor  # (B, L, Dt)
    text_valid: torch.Tensor  # (B, L) bool
    foreground: torch.Tensor  # (B, T) 1 inside a relevant window
    offsets: torch.Tensor  # (B, T, 2) distances to the window's start/end, units of L
    saliency: torch.Tensor  # (B, T) mean annotator score 0–4 for relevant clips, −1 elsewhere
    meta: list[dict]

    def trimmed(self) -> "MomentBatch":
        """Without the padding columns no sample uses (collate pads to model.max_clips/max_text)."""
        clips, text = int(self.video_valid.sum(1).max()), int(self.text_valid.sum(1).max())
        per_clip = ("video", "video_valid", "foreground", "offsets", "saliency")
        return dataclasses.replace(self, **{k: getattr(self, k)[:, :clips] for k in per_clip},
                                   text=self.text[:, :text], text_valid=self.text_valid[:, :text])


def collate(samples: list[MomentSample], max_clips: int, max_text: int) -> MomentBatch:
    video, video_valid = pad_stack([s.video for s in samples], max_clips)
    text, text_valid = pad_stack([s.text for s in samples], max_text)
    B, T = video_valid.shape
    foreground, saliency = torch.zeros(B, T), torch.full((B, T), -1.0)
    offsets = torch.zeros(B, T, 2)
    for b, s in enumerate(samples):
        clip_len = s.meta["clip_len"]
        span = max_clips * clip_len
        for start, end in s.meta["relevant_windows"]:
            for t in range(int(start // clip_len), min(T, math.ceil(end / clip_len))):
                centre = (t + 0.5) * clip_len
                if start <= centre <= end and video_valid[b, t]:
                    foreground[b, t] = 1
                    offsets[b, t] = torch.tensor([(centre - start) / span, (end - centre) / span])
        for t, scores in zip(s.meta["relevant_clip_ids"], s.meta["saliency_scores"]):
            if t < T:
                saliency[b, t] = sum(scores) / len(scores)
    return MomentBatch(video, video_valid, text, text_valid, foreground, offsets, saliency, [s.meta for s in samples])


def losses(out: dict[str, torch.Tensor], batch: MomentBatch, cfg: MomentRetrievalConfig) -> tuple[torch.Tensor, dict[str, float]]:
    parts = localization_losses(out["fg_logits"], out["offsets"], batch.foreground, batch.offsets, batch.video_valid)
    # margin ranking: a clip annotated as more salient must score higher (unannotated clips = −1).
    # Relevant-vs-background pairs far outnumber pairs inside the moment; average each kind on its
    # own so the finer ordering that highlight detection is scored on is not drowned out.
    saliency = _ranking_loss(out["saliency"].float(), batch.saliency, batch.video_valid, cfg.saliency_margin)
    parts["saliency"] = saliency
    total = cfg.w_focal * parts["focal"] + cfg.w_l1 * parts["l1"] + cfg.w_giou * parts["giou"] + cfg.w_saliency * saliency
    return total, {k: float(v.detach()) for k, v in parts.items()}


ALL_PAIRS_UP_TO = 256  # clips: longer videos (movies) rank each clip against this many sampled partners


def _ranking_loss(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge loss over ordered pairs (i, j) with target_i > target_j. Every pair up to ALL_PAIRS_UP_TO
    clips; beyond, each clip i meets ALL_PAIRS_UP_TO partners drawn uniformly (torch's RNG, which the
    checkpoint restores), so memory is O(B·T·K), never O(B·T²)."""
    B, T = target.shape
    if T <= ALL_PAIRS_UP_TO:
        partner = torch.arange(T, device=target.device).expand(B, T, T)
    else:
        partner = torch.randint(0, T, (B, T, ALL_PAIRS_UP_TO), device=target.device)
    flat = partner.reshape(B, -1)

    def at_partners(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, flat).view(partner.shape)

    target_j = at_partners(target)
    pairs = (target[:, :, None] > target_j) & valid[:, :, None] & at_partners(valid)
    hinge = F.relu(margin - (scores[:, :, None] - at_partners(scores)))
    inside = pairs & (target_j >= 0)
    return sum((hinge * kind).sum() / kind.sum().clamp(min=1) for kind in (pairs & ~inside, inside))


@torch.no_grad()
def decode(out: dict[str, torch.Tensor], batch: MomentBatch, cfg: MomentRetrievalConfig) -> list[dict]:
    """Predictions in the official QVHighlights submission format, one dict per sample."""
    # python floats up front: indexing a tensor per clip costs microseconds each, the whole eval seconds
    scores = torch.sigmoid(out["fg_logits"].float()).cpu().tolist()
    offsets, saliency = out["offsets"].float().cpu().tolist(), out["saliency"].float().cpu().tolist()
    T = batch.video_valid.shape[1]
    predictions = []
    for b, meta in enumerate(batch.meta):
        clip_len, duration = meta["clip_len"], float(meta["duration"])
        span = T * clip_len
        n_clips = min(T, math.ceil(duration / clip_len))
        candidates = []
        for t in range(n_clips):
            centre = (t + 0.5) * clip_len
            start = max(0.0, centre - offsets[b][t][0] * span)
            end = min(duration, centre + offsets[b][t][1] * span)
            if end > start:
                candidates.append([round(start, 2), round(end, 2), round(scores[b][t], 4)])
        predictions.append({
            "qid": meta["qid"], "query": meta["query"], "vid": meta["vid"],
            "pred_relevant_windows": nms(candidates, cfg.nms_iou, cfg.max_windows),
            "pred_saliency_scores": [round(x, 4) for x in saliency[b][:n_clips]],
        })
    return predictions


def ground_truth(meta: dict) -> dict:
    """The annotation line (official ground-truth format) stored in a sample's json."""
    keys = ("qid", "query", "duration", "vid", "relevant_windows", "relevant_clip_ids", "saliency_scores")
    return {k: meta[k] for k in keys}


def random_predictions(metas: list[dict], cfg: MomentRetrievalConfig, clip_len: float, seed: int = 0) -> list[dict]:
    """Uniformly random windows and saliency: the chance level the model must beat."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for meta in metas:
        duration = float(meta["duration"])
        bounds = torch.rand(cfg.max_windows, 2, generator=g).sort(-1).values * duration
        scores = torch.rand(cfg.max_windows, generator=g)
        windows = [[round(float(s), 2), round(float(e), 2), round(float(p), 4)] for (s, e), p in zip(bounds, scores)]
        n_clips = math.ceil(duration / clip_len)
        out.append({"qid": meta["qid"], "query": meta["query"], "vid": meta["vid"],
                    "pred_relevant_windows": sorted(windows, key=lambda w: -w[2]),
                    "pred_saliency_scores": [round(float(x), 4) for x in torch.rand(n_clips, generator=g)]})
    return out


@register
class MomentRetrieval(Task):
    """QVHighlights: moment retrieval + highlight detection over clip features and a text query."""

    name = "moment_retrieval"
    primary = "MR-full-mAP"
    record_id = "qid"

    def sample_ops(self) -> VideoOps:
        m, d = self.cfg.model, self.cfg.data
        return VideoOps(d.window, LengthLimit(m.max_clips, m.max_text, d.truncate))

    def collate(self, samples: list[MomentSample]) -> MomentBatch:
        batch = collate(samples, self.cfg.model.max_clips, self.cfg.model.max_text)
        return batch.trimmed() if self.cfg.data.token_budget > 0 else batch  # budget batches: similar lengths

    def build_model(self) -> nn.Module:
        from lamscale.model.moment import MomentModel

        return MomentModel(self.cfg.model)

    def loss(self, out: dict, batch: MomentBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return losses(out, batch, self.cfg.task)

    def predict(self, out: dict, batch: MomentBatch) -> list[dict]:
        return decode(out, batch, self.cfg.task)

    def ground_truth(self, batch: MomentBatch) -> list[dict]:
        return [ground_truth(meta) for meta in batch.meta]

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        return evaluate(predictions, truths)

    def chance(self, truths: list[dict]) -> list[dict]:
        return random_predictions(truths, self.cfg.task, self.cfg.data.clip_len)

    def headline(self) -> list[str]:
        return ["MR-full-mAP", "HL-min-VeryGood-mAP"]
