"""Grounding a sentence in a whole movie (MAD, Soldelli et al. 2022): movie-level shards, window training,
full-length evaluation.

Training: each visit of a movie sample draws one of its sentences and a window of `task.window` frames
that holds the sentence's moment at a random place (not always centred). Per frame the head predicts
foreground and the distances to the moment's start/end in units of the window's span (window / fps
seconds), so the same units decode a whole movie. Nothing here is T² in the number of frames.
Evaluation: every sentence against its whole movie in one forward (N = frames + tokens; the LAM
backends are O(N) in memory), or in sliding windows (`task.eval_window`); proposals from the best
frames, NMS, the top `max_proposals`, scored by MAD's official R@k×IoU (and CONE's convention).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lamscale.config import GroundingConfig
from lamscale.data.batch import LengthLimit, pad_stack
from lamscale.data.movies import MovieSample, check_dims, decode_movie
from lamscale.data.reader import DataError
from lamscale.data.schema import MomentSample
from lamscale.tasks import register
from lamscale.tasks.base import Task
from lamscale.tasks.localization import FeatureBatch, localization_losses, nms


@dataclass
class GroundingBatch(FeatureBatch):
    video: torch.Tensor  # (B, T, Dv) frames
    video_valid: torch.Tensor  # (B, T) bool
    text: torch.Tensor  # (B, L, Dt) sentence tokens
    text_valid: torch.Tensor  # (B, L) bool
    foreground: torch.Tensor  # (B, T) 1 on frames whose centre lies inside the moment
    offsets: torch.Tensor  # (B, T, 2) distances to the moment's start/end, units of the window span
    meta: list[dict]


def draw_window(n_frames: int, first: int, end: int, window: int, rng: random.Random) -> int:
    """Start frame of a training window of `window` frames holding frames [first, end) of the moment at a
    uniformly random place; a moment longer than the window gets a window inside it."""
    if n_frames <= window:
        return 0
    if end - first >= window:
        return rng.randint(first, min(end, n_frames) - window)
    return rng.randint(max(0, end - window), min(first, n_frames - window))


def sentence_item(movie: MovieSample, i: int, start: int, frames: int) -> MomentSample:
    """Sentence i against frames [start, start + frames) of its movie; times in the item are relative."""
    s = movie.meta["sentences"][i]
    fps = float(movie.meta["fps"])
    offset = start / fps
    lo, hi = s["timestamps"]
    video = movie.video[start:start + frames]
    meta = {"query_id": s["sid"], "movie": movie.meta["movie"], "sentence": s["sentence"], "fps": fps,
            "offset_s": offset, "duration": len(video) / fps, "timestamps": [lo - offset, hi - offset],
            "gt": [lo, hi], "movie_duration": float(movie.meta["duration"])}
    return MomentSample(f"{movie.key}/{s['sid']}", meta, video, movie.tokens(i))


@dataclass(frozen=True)
class GroundingOps:
    """Movie samples: decode + dims check; training draw = one sentence and its window; length limits."""

    window: int
    limit: LengthLimit
    video_dim: int
    text_dim: int

    def decode(self, raw: dict) -> MovieSample:
        movie = decode_movie(raw)
        check_dims(movie, self.video_dim, self.text_dim, str(raw.get("__url__", "?")))
        return movie

    def prepare(self, movie: MovieSample, rng: random.Random | None, where: str) -> tuple[Any, bool]:
        if rng is None:  # eval: the whole movie; its sentences become items in Grounding.eval_items
            return self._fit_sentences(movie, where)
        i = rng.randrange(len(movie.meta["sentences"]))
        fps = float(movie.meta["fps"])
        lo, hi = movie.meta["sentences"][i]["timestamps"]
        first, end = int(math.floor(lo * fps)), max(int(math.ceil(hi * fps)), int(math.floor(lo * fps)) + 1)
        start = draw_window(len(movie.video), first, end, self.window, rng)
        return self.limit.fit(sentence_item(movie, i, start, self.window), where)

    def _fit_sentences(self, movie: MovieSample, where: str) -> tuple[MovieSample, bool]:
        """A sentence with more tokens than model.max_text: an error naming it, or cut (and counted)."""
        long = [s for s in movie.meta["sentences"] if s["tokens"][1] > self.limit.max_text]
        if not long:
            return movie, False
        if not self.limit.truncate:
            raise DataError(f"{where}: movie {movie.key!r} sentence {long[0]['sid']!r} has {long[0]['tokens'][1]} "
                            f"tokens, more than model.max_text={self.limit.max_text}; raise it or set data.truncate=true")
        sentences = [{**s, "tokens": [s["tokens"][0], min(s["tokens"][1], self.limit.max_text)]}
                     for s in movie.meta["sentences"]]
        return MovieSample(movie.key, {**movie.meta, "sentences": sentences}, movie.video, movie.text), True

    def size(self, sample: Any) -> tuple[int, int]:
        if isinstance(sample, MovieSample):
            return len(sample.video), max(s["tokens"][1] for s in sample.meta["sentences"])
        return len(sample.video), len(sample.text)


def collate(items: list[MomentSample], span_frames: int) -> GroundingBatch:
    """Pads to the longest item of the batch; targets per frame from the item's relative timestamps."""
    video, video_valid = pad_stack([s.video for s in items], max(len(s.video) for s in items))
    text, text_valid = pad_stack([s.text for s in items], max(len(s.text) for s in items))
    B, T = video_valid.shape
    foreground, offsets = torch.zeros(B, T), torch.zeros(B, T, 2)
    for b, s in enumerate(items):
        fps = s.meta["fps"]
        lo, hi = s.meta["timestamps"]
        centre = (np.arange(len(s.video)) + 0.5) / fps
        inside = np.flatnonzero((centre >= lo) & (centre <= hi))
        span = span_frames / fps
        foreground[b, inside] = 1
        offsets[b, inside] = torch.from_numpy(np.stack([(centre[inside] - lo) / span, (hi - centre[inside]) / span], -1)).float()
    return GroundingBatch(video, video_valid, text, text_valid, foreground, offsets, [s.meta for s in items])


@torch.no_grad()
def decode(out: dict[str, torch.Tensor], batch: GroundingBatch, cfg: GroundingConfig) -> list[dict]:
    """Ranked proposals per sentence in CONE's prediction format (+ `tokens`: the forward's length N)."""
    scores = torch.sigmoid(out["fg_logits"].float()).cpu()
    offsets = out["offsets"].float().cpu()
    records = []
    for b, meta in enumerate(batch.meta):
        n = int(batch.video_valid[b].sum())
        fps, span = meta["fps"], cfg.window / meta["fps"]
        best = torch.topk(scores[b, :n], min(cfg.candidates, n)).indices
        centre = (best.double() + 0.5) / fps
        start = (centre - offsets[b, best, 0].double() * span).clamp(min=0) + meta["offset_s"]
        end = (centre + offsets[b, best, 1].double() * span).clamp(max=meta["duration"]) + meta["offset_s"]
        rows = [[round(s, 2), round(e, 2), round(p, 4)]
                for s, e, p in zip(start.tolist(), end.tolist(), scores[b, best].tolist()) if e > s]
        kept = nms(rows, cfg.nms_iou, cfg.max_proposals)
        records.append({"query_id": meta["query_id"], "movie": meta["movie"],
                        "predicted_times": [k[:2] for k in kept], "predicted_scores": [k[2] for k in kept],
                        "tokens": n + int(batch.text_valid[b].sum())})
    return records


def random_proposals(truths: list[dict], count: int, seed: int = 0) -> list[dict]:
    """Chance: `count` windows per sentence, centres uniform over its movie, lengths drawn from the ground
    truth's own moment lengths (a generous random: it knows how long moments are)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([g["timestamps"][1] - g["timestamps"][0] for g in truths])
    out = []
    for g in truths:
        centre = rng.uniform(0, g["duration"], count)
        half = rng.choice(lengths, count) / 2
        times = np.stack([np.clip(centre - half, 0, g["duration"]), np.clip(centre + half, 0, g["duration"])], 1)
        out.append({"query_id": g["query_id"], "predicted_times": np.round(times, 2).tolist(),
                    "predicted_scores": np.round(np.linspace(1, 0, count), 4).tolist()})
    return out


def _mean_tree(trees: list[dict]) -> dict:
    """Leaf-wise mean of equally shaped dicts of numbers (rounded like the metric tables: 2 decimals)."""
    return {k: _mean_tree([t[k] for t in trees]) if isinstance(v, dict) else round(sum(t[k] for t in trees) / len(trees), 2)
            for k, v in trees[0].items()}


CHANCE_DRAWS = 20


@register
class Grounding(Task):
    """A sentence's moment in a whole movie: MAD's frame features + sentence token features."""

    name = "grounding"
    primary = "R1@0.3"
    record_id = "query_id"

    def sample_ops(self) -> GroundingOps:
        m = self.cfg.model
        return GroundingOps(self.cfg.task.window, LengthLimit(m.max_clips, m.max_text, self.cfg.data.truncate),
                            m.video_dim, m.text_dim)

    def collate(self, samples: list[MomentSample]) -> GroundingBatch:
        return collate(samples, self.cfg.task.window)

    def eval_items(self, movie: MovieSample) -> Iterable[MomentSample]:
        t, frames = self.cfg.task, len(movie.video)
        if not t.eval_window:
            if frames > self.cfg.model.max_clips:
                raise DataError(f"movie {movie.key!r} has {frames} frames, more than model.max_clips="
                                f"{self.cfg.model.max_clips}: raise it, or evaluate in windows (task.eval_window)")
            starts, size = [0], frames
        else:
            stride, size = t.eval_stride or max(1, t.eval_window // 2), t.eval_window
            starts = list(range(0, max(frames - size, 0) + 1, stride))
            if starts[-1] + size < frames:
                starts.append(frames - size)  # the last window ends with the movie
        for i in range(len(movie.meta["sentences"])):
            for start in starts:
                yield sentence_item(movie, i, start, size)

    def eval_batch_size(self) -> int:
        return self.cfg.task.eval_batch

    def build_model(self) -> nn.Module:
        from lamscale.model.moment import GroundingModel

        return GroundingModel(self.cfg.model)

    def loss(self, out: dict, batch: GroundingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.cfg.task
        parts = localization_losses(out["fg_logits"], out["offsets"], batch.foreground, batch.offsets, batch.video_valid)
        total = t.w_focal * parts["focal"] + t.w_l1 * parts["l1"] + t.w_giou * parts["giou"]
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def predict(self, out: dict, batch: GroundingBatch) -> list[dict]:
        return decode(out, batch, self.cfg.task)

    def ground_truth(self, batch: GroundingBatch) -> list[dict]:
        return [{"query_id": m["query_id"], "movie": m["movie"], "timestamps": m["gt"], "duration": m["movie_duration"]}
                for m in batch.meta]

    def collect(self, predictions: list[dict], truths: list[dict]) -> tuple[list[dict], list[dict]]:
        """Sliding-window pieces of one sentence → one ranked list (NMS again over all its windows)."""
        pieces: dict[str, list[dict]] = {}
        for p in predictions:
            pieces.setdefault(p["query_id"], []).append(p)
        merged = []
        for qid, parts in sorted(pieces.items()):
            rows = [[*t, s] for p in parts for t, s in zip(p["predicted_times"], p["predicted_scores"])]
            kept = nms(rows, self.cfg.task.nms_iou, self.cfg.task.max_proposals) if len(parts) > 1 else rows
            merged.append({**parts[0], "predicted_times": [k[:2] for k in kept], "predicted_scores": [k[2] for k in kept],
                           "tokens": max(p["tokens"] for p in parts)})
        unique = {g["query_id"]: g for g in truths}
        return merged, [unique[q] for q in sorted(unique)]

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        from lamscale.tasks.mad_metrics import evaluate_both

        tables = evaluate_both(predictions, truths)
        longest = max((p.get("tokens", 0) for p in predictions), default=0)
        return {**tables, "brief": dict(tables["official"]["brief"]), "longest_forward_tokens": longest}

    def chance(self, truths: list[dict]) -> list[dict]:
        return random_proposals(truths, self.cfg.task.max_proposals)

    def chance_metrics(self, truths: list[dict]) -> dict:
        """The mean of CHANCE_DRAWS seeded random draws: with a few dozen val sentences, one draw's R@1 is
        0 or 1/n, which no model can be "3× better" than in a meaningful way."""
        draws = [self.metrics(random_proposals(truths, self.cfg.task.max_proposals, seed), truths)
                 for seed in range(CHANCE_DRAWS)]
        return _mean_tree(draws)

    def headline(self) -> list[str]:
        return ["R1@0.3", "R5@0.3"]

    def eval_line(self, metrics: dict, chance: dict) -> str:
        return f"{super().eval_line(metrics, chance)} | longest forward N={metrics['longest_forward_tokens']}"
