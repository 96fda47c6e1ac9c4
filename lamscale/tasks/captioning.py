"""Captioning: a LAM encoder over a clip's frames and audio (MSR-VTT) or a movie segment and the words
before it (MADv2 audio description), and a decoder that writes the caption.

Shards: MSR-VTT-style clip samples (`<key>.json` with `captions`, `video.npy`, optional `audio.npy`) or
AD movie samples (`lamscale.data.ad_movies`: a movie's frames once, every AD with its times). Training:
teacher-forced cross-entropy with label smoothing on one reference, drawn per visit (seeded by epoch and
key: a resumed run draws the same). For an AD the draw is one of its movie's ADs; the segment is the AD's
span plus `context_s` seconds before it, and the context words are the `prev_ads` earlier ADs (and the
subtitles in the segment). Eval: greedy or beam search; BLEU/METEOR/ROUGE-L/CIDEr by pycocoevalcap.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lamscale import storage
from lamscale.data.batch import pad_stack
from lamscale.data.captions import EOS, STATS_FILE, TOKENIZER_FILE, caption_problem, decode, encode, load_tokenizer
from lamscale.data.reader import DataError
from lamscale.data.schema import Sample, SampleError, decode_sample
from lamscale.data.urls import expand_urls
from lamscale.tasks import register
from lamscale.tasks.base import Task


@dataclass
class CaptionItem:
    key: str
    meta: dict  # image_id, captions (every reference)
    video: np.ndarray  # (T, Dv)
    audio: np.ndarray | None  # (A, Da)
    context: list[int]  # context word ids (AD: earlier ADs, subtitles)
    target: list[int]  # [BOS] … [EOS] of the drawn reference (training); [] at eval


@dataclass
class CaptionBatch:
    video: torch.Tensor
    video_valid: torch.Tensor
    audio: torch.Tensor | None
    audio_valid: torch.Tensor | None
    context: torch.Tensor  # (B, Lc) ids
    context_valid: torch.Tensor
    caption: torch.Tensor  # (B, Lcap) ids, [PAD] after each caption's [EOS]
    caption_valid: torch.Tensor
    meta: list[dict]

    def inputs(self, dtype: torch.dtype = torch.float32) -> tuple:
        audio = None if self.audio is None else self.audio.to(dtype)
        return (self.video.to(dtype), self.video_valid, audio, self.audio_valid, self.context, self.context_valid,
                self.caption)

    @property
    def tokens(self) -> int:
        audio = 0 if self.audio_valid is None else int(self.audio_valid.sum())
        return int(self.video_valid.sum() + self.context_valid.sum() + self.caption_valid.sum()) + audio

    def to(self, device: torch.device) -> CaptionBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return CaptionBatch(**moved)


def _is_ad_movie(raw: dict) -> bool:
    """An AD movie sample (its json has `ads`) rather than a clip with `captions`."""
    try:
        meta = json.loads(raw.get("json", b"{}"))
    except ValueError:
        return False  # decode_sample names the broken json
    return isinstance(meta, dict) and "ads" in meta


@lru_cache(maxsize=4)
def _tokenizer(url: str):
    return load_tokenizer(url)  # once per process (loader workers each load their own)


@dataclass(frozen=True)
class CaptionOps:
    tokenizer: str  # URL of tokenizer.json
    video_dim: int
    audio_dim: int
    max_clips: int
    max_text: int
    max_caption: int
    truncate: bool
    context_s: float
    prev_ads: int
    subtitles: bool

    def decode(self, raw: dict) -> Any:
        where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
        if _is_ad_movie(raw):
            from lamscale.data.ad_movies import decode_ad_movie

            movie = decode_ad_movie(raw)
            self._check(where, movie.video, "video", self.video_dim)
            return movie
        sample = decode_sample(raw)
        if "video" not in sample.arrays:
            raise SampleError(f"{where}: no video features (video.npy)")
        self._check(where, sample.arrays["video"], "video", self.video_dim)
        if self.audio_dim:
            if "audio" not in sample.arrays:
                raise SampleError(f"{where}: no audio features (audio.npy), and model.audio_dim={self.audio_dim}")
            self._check(where, sample.arrays["audio"], "audio", self.audio_dim)
        refs = sample.meta.get("captions")
        if not isinstance(refs, list) or not refs or not all(isinstance(c, str) and c.strip() for c in refs):
            raise SampleError(f"{where}: json 'captions' must be a non-empty list of non-empty strings, got {refs!r}")
        return sample

    @staticmethod
    def _check(where: str, array: np.ndarray, name: str, dim: int) -> None:
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
            raise SampleError(f"{where}: {name} features have shape {array.shape}, expected (T>0, {dim}) "
                              f"(model.{name}_dim)")

    def prepare(self, sample: Any, rng: random.Random | None, where: str) -> tuple[Any, bool]:
        if not isinstance(sample, Sample):  # an AD movie: training draws one AD; eval expands in eval_items
            return (sample, False) if rng is None else self.ad_item(sample, rng.randrange(len(sample.meta["ads"])), where)
        refs = sample.meta["captions"]
        video, audio = sample.arrays["video"], sample.arrays.get("audio") if self.audio_dim else None
        target, cut = ([], False) if rng is None else self._target(refs[rng.randrange(len(refs))], sample.key, where)
        video, audio, over = self._fit(sample.key, video, audio, where)
        meta = {"image_id": sample.meta.get("video_id", sample.key), "captions": refs}
        return CaptionItem(sample.key, meta, video, audio, [], target), cut or over

    def _target(self, caption: str, key: str, where: str) -> tuple[list[int], bool]:
        """[BOS] ids [EOS] of a training reference, cut to task.max_caption (and counted as truncated)."""
        problem = caption_problem(_tokenizer(self.tokenizer), caption)
        if problem:  # shards built with another vocabulary (task.tokenizer): nothing to learn from it
            raise DataError(f"{where}: sample {key!r}: {problem} of {self.tokenizer}")
        ids = encode(_tokenizer(self.tokenizer), caption, 1 << 30)
        return (ids, False) if len(ids) <= self.max_caption else (ids[: self.max_caption - 1] + [EOS], True)

    def _fit(self, key: str, video: np.ndarray, audio: np.ndarray | None, where: str) -> tuple:
        longest = max(len(video), 0 if audio is None else len(audio))
        if longest <= self.max_clips:
            return video, audio, False
        if not self.truncate:
            raise DataError(f"{where}: sample {key!r} has {longest} frames, more than model.max_clips={self.max_clips}; "
                            f"raise it, or set data.truncate=true to cut such samples (counted)")
        return video[: self.max_clips], None if audio is None else audio[: self.max_clips], True

    def ad_item(self, movie: Any, i: int, where: str = "") -> tuple[CaptionItem, bool]:
        """AD i of `movie`: its segment (the last max_clips frames of [start − context_s, end]), the earlier ADs
        and the segment's subtitles as context words (the most recent model.max_text of them)."""
        from lamscale.data.ad_movies import ad_segment, previous_ads, subtitles_between

        ad, fps = movie.meta["ads"][i], float(movie.meta["fps"])
        first, end = ad_segment(movie, i, self.context_s, self.max_clips)
        texts = previous_ads(movie, i, self.prev_ads)
        if self.subtitles:
            texts += subtitles_between(movie, first / fps, end / fps)
        tok = _tokenizer(self.tokenizer)
        context = [w for t in texts for w in [*tok.encode(t).ids, EOS]][-self.max_text:] if self.max_text else []
        target, cut = self._target(ad["text"], f"{movie.key}/{ad['sid']}", where)
        meta = {"image_id": f"{movie.key}/{ad['sid']}", "captions": [ad["text"]], "movie": movie.meta["movie"],
                "timestamps": ad["timestamps"]}
        return CaptionItem(f"{movie.key}/{ad['sid']}", meta, movie.video[first:end], None, context, target), cut

    def size(self, item: Any) -> tuple[int, int]:
        if isinstance(item, CaptionItem):
            audio = 0 if item.audio is None else len(item.audio)
            return len(item.video) + audio, len(item.context) + len(item.target)
        return len(item.video), self.max_caption  # an AD movie at eval: expanded into items afterwards


def _ids(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max([len(r) for r in rows] + [0])
    ids, valid = torch.zeros(len(rows), length, dtype=torch.long), torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], valid[i, : len(r)] = torch.tensor(r, dtype=torch.long), True
    return ids, valid


def collate(items: list[CaptionItem]) -> CaptionBatch:
    video, video_valid = pad_stack([s.video for s in items], max(len(s.video) for s in items))
    audio = audio_valid = None
    if items[0].audio is not None:
        audio, audio_valid = pad_stack([s.audio for s in items], max(len(s.audio) for s in items))
    context, context_valid = _ids([s.context for s in items])
    caption, caption_valid = _ids([s.target for s in items])
    return CaptionBatch(video, video_valid, audio, audio_valid, context, context_valid, caption, caption_valid,
                        [s.meta for s in items])


def caption_loss(logits: torch.Tensor, caption: torch.Tensor, caption_valid: torch.Tensor,
                 label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy of each real next token; a padded position is never a target."""
    target = caption[:, 1:].masked_fill(~caption_valid[:, 1:], -100)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the softmax in float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)


@register
class Captioning(Task):
    name = "captioning"
    primary = "CIDEr"
    record_id = "image_id"

    def tokenizer_url(self) -> str:
        if self.cfg.task.tokenizer:
            return self.cfg.task.tokenizer
        return storage.join(expand_urls(self.cfg.data.train)[0].rsplit("/", 1)[0], TOKENIZER_FILE)

    def preflight(self) -> None:
        from lamscale.tasks.caption_metrics import require_java

        try:
            require_java()
        except RuntimeError as e:  # a missing tool, reported like bad input: one line, before any worker
            raise FileNotFoundError(str(e)) from None
        _tokenizer(self.tokenizer_url())
        self.baseline_caption()

    def baseline_caption(self) -> str:
        """The most frequent training caption, from caption_stats.json beside the tokenizer."""
        url = self.tokenizer_url().rsplit("/", 1)[0] + "/" + STATS_FILE
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: missing (the shard build writes it beside tokenizer.json: the most "
                                    f"frequent training caption, the baseline evals are compared to)")
        return json.loads(storage.read_bytes(url))["most_frequent"]

    def sample_ops(self) -> CaptionOps:
        m, t = self.cfg.model, self.cfg.task
        return CaptionOps(self.tokenizer_url(), m.video_dim, m.audio_dim, m.max_clips, m.max_text, t.max_caption,
                          self.cfg.data.truncate, t.context_s, t.prev_ads, t.subtitles)

    def collate(self, samples: list[CaptionItem]) -> CaptionBatch:
        return collate(samples)

    def eval_items(self, sample: Any) -> Iterable[CaptionItem]:
        if isinstance(sample, CaptionItem):
            return [sample]
        ops = self.sample_ops()
        return [ops.ad_item(sample, i)[0] for i in range(len(sample.meta["ads"]))]

    def eval_batch_size(self) -> int:
        return self.cfg.task.eval_batch

    def build_model(self) -> nn.Module:
        from lamscale.model.captioner import CaptionModel

        t = self.cfg.task
        return CaptionModel(self.cfg.model, _tokenizer(self.tokenizer_url()).get_vocab_size(), t.decoder_layers,
                            t.max_caption, t.cross_lam, t.beam_size, t.length_penalty)

    def loss(self, out: torch.Tensor, batch: CaptionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = caption_loss(out, batch.caption, batch.caption_valid, self.cfg.task.label_smoothing)
        return loss, {"ce": float(loss.detach())}

    def predict(self, out: torch.Tensor, batch: CaptionBatch) -> list[dict]:
        tok = _tokenizer(self.tokenizer_url())
        return [{"image_id": m["image_id"], "caption": decode(tok, ids)} for m, ids in zip(batch.meta, out.tolist())]

    def ground_truth(self, batch: CaptionBatch) -> list[dict]:
        return [{"image_id": m["image_id"], "captions": m["captions"]} for m in batch.meta]

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        from lamscale.tasks.caption_metrics import evaluate, shared_meteor

        return evaluate(predictions, truths, meteor=shared_meteor())

    def chance(self, truths: list[dict]) -> list[dict]:
        caption = self.baseline_caption()
        return [{"image_id": g["image_id"], "caption": caption} for g in truths]

    def headline(self) -> list[str]:
        return ["CIDEr", "BLEU-4"]

    def eval_line(self, metrics: dict, chance: dict) -> str:
        return super().eval_line(metrics, chance).replace("chance", "most frequent caption")

    def texts(self, predictions: list[dict], truths: list[dict]) -> dict[str, str]:
        shown = min(self.cfg.task.show_captions, len(predictions))
        if not shown:
            return {}
        refs = {g["image_id"]: g["captions"] for g in truths}
        rows = [f"| {p['image_id']} | {p['caption']} | {' / '.join(refs[p['image_id']][:3])} |" for p in predictions[:shown]]
        return {"captions/val": "| video | generated | reference(s) |\n|---|---|---|\n" + "\n".join(rows)}
