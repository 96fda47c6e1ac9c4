"""The embedded sample dataset: real QVHighlights annotations + deterministically generated features.

Features are generated so that learning is possible and measurable: every query word has a fixed
random vector (the "text features"), and the clips of the query's relevant windows carry a projection
of the query's mean word vector, scaled by their annotated saliency, plus a weaker query-independent
"eventful" direction — over noise and piecewise-constant scene vectors that every clip has.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np

from lamscale.data.schema import MomentSample
from lamscale.data.writer import write_manifest, write_shards

ANNOTATIONS = Path(__file__).resolve().parents[2] / "shards" / "qvhighlights_sample"
QUERY_SIGNAL, GENERIC_SIGNAL, SCENE_STD = 4.0, 2.5, 0.7
GENERATOR_VERSION = 2  # bump when the generated features change: old shards are then rebuilt


def word_vector(word: str, dim: int) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)
    return v / np.linalg.norm(v)


def tokenize(query: str, max_tokens: int) -> list[str]:
    return re.findall(r"[a-z0-9']+", query.lower())[:max_tokens] or ["<empty>"]


class FeatureGenerator:
    def __init__(self, video_dim: int, text_dim: int, max_text: int, clip_len: float = 2.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.video_dim, self.text_dim, self.max_text, self.clip_len, self.seed = video_dim, text_dim, max_text, clip_len, seed
        self.projection = rng.standard_normal((video_dim, text_dim)) / math.sqrt(text_dim)
        generic = rng.standard_normal(video_dim)
        self.generic = generic / np.linalg.norm(generic)

    def __call__(self, ann: dict) -> MomentSample:
        rng = np.random.default_rng([self.seed, int(ann["qid"])])
        words = tokenize(ann["query"], self.max_text)
        text = np.stack([word_vector(w, self.text_dim) for w in words]) + 0.05 * rng.standard_normal((len(words), self.text_dim))
        query_dir = self.projection @ text.mean(0)
        query_dir /= np.linalg.norm(query_dir)

        n_clips = math.ceil(ann["duration"] / self.clip_len)
        video = rng.standard_normal((n_clips, self.video_dim))
        start = 0
        while start < n_clips:  # piecewise-constant scenes, 4–12 clips long
            end = start + int(rng.integers(4, 13))
            video[start:end] += SCENE_STD * rng.standard_normal(self.video_dim)
            start = end
        for clip, scores in zip(ann["relevant_clip_ids"], ann["saliency_scores"]):
            if clip < n_clips:
                strength = 0.25 + 0.75 * (float(np.mean(scores)) / 4.0) ** 2  # steeper for the most salient
                video[clip] += strength * (QUERY_SIGNAL * query_dir + GENERIC_SIGNAL * self.generic)
        meta = {k: ann[k] for k in ("qid", "vid", "query", "duration", "relevant_windows", "relevant_clip_ids", "saliency_scores")}
        meta["clip_len"] = self.clip_len
        return MomentSample(f"qid{ann['qid']}", meta, video.astype(np.float16), text.astype(np.float16))


def build_sample(out_dir: str, video_dim: int = 64, text_dim: int = 32, max_text: int = 32,
                 train_shards: int = 4, val_shards: int = 2) -> dict:
    """Write train/val shards + manifest.json into `out_dir`; returns the manifest."""
    gen = FeatureGenerator(video_dim, text_dim, max_text)
    manifest = {"dataset": "qvhighlights-sample", "generator_version": GENERATOR_VERSION, "feature_dims": {"video": video_dim, "text": text_dim}, "splits": {}}
    for split, n_shards in (("train", train_shards), ("val", val_shards)):
        anns = [json.loads(line) for line in (ANNOTATIONS / f"{split}.jsonl").read_text().splitlines() if line]
        manifest["splits"][split] = write_shards((gen(a) for a in anns), len(anns), out_dir, split, n_shards)
    write_manifest(out_dir, manifest)
    return manifest
