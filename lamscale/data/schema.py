"""The sample format inside a shard (DESIGN.md §3): one tar group per query.

    <key>.json       ids, query, duration, clip_len, relevant_windows, relevant_clip_ids, saliency_scores
    <key>.video.npy  float16 T×Dv clip features
    <key>.text.npy   float16 L×Dt query token features
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1


class SampleError(ValueError):
    """A sample that cannot be decoded; the message names shard and key."""


@dataclass
class MomentSample:
    key: str
    meta: dict  # qid, vid, query, duration, clip_len, relevant_windows, relevant_clip_ids, saliency_scores
    video: np.ndarray  # (T, Dv) float16
    text: np.ndarray  # (L, Dt) float16


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode(sample: MomentSample) -> dict:
    """To the dict that webdataset's TarWriter writes."""
    return {
        "__key__": sample.key,
        "json": json.dumps(sample.meta).encode(),
        "video.npy": npy_bytes(sample.video.astype(np.float16)),
        "text.npy": npy_bytes(sample.text.astype(np.float16)),
    }


def decode(raw: dict) -> MomentSample:
    """From a webdataset raw sample (bytes per extension)."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
    missing = [ext for ext in ("json", "video.npy", "text.npy") if ext not in raw]
    if missing:
        raise SampleError(f"{where}: missing member(s) {missing}")
    try:
        meta = json.loads(raw["json"])
        video = np.load(io.BytesIO(raw["video.npy"]), allow_pickle=False)
        text = np.load(io.BytesIO(raw["text.npy"]), allow_pickle=False)
    except Exception as e:  # corrupt bytes of any kind
        raise SampleError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
    if video.ndim != 2 or text.ndim != 2:
        raise SampleError(f"{where}: expected 2-d video/text arrays, got {video.shape} / {text.shape}")
    return MomentSample(raw["__key__"], meta, video, text)
