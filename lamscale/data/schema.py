"""The sample format inside a shard (DESIGN.md §3): one tar group per sample.

Moment retrieval (`MomentSample`, what the trainer reads), one group per query:
    <key>.json       ids, query, duration, clip_len, relevant_windows, relevant_clip_ids, saliency_scores
    <key>.video.npy  float16 T×Dv clip features
    <key>.text.npy   float16 L×Dt query token features
Any task (`Sample`, what the builders write): `<key>.json` plus any `<key>.<name>.npy` float16 arrays
(video, audio, text) and raw files such as `<key>.jpg` / `<key>.png` (images keep their own format).
"""
from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import dataclass, field

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


_NPY_HEADER_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    # a DataLoader worker forked while the read-ahead thread held the lock would inherit it locked forever
    global _NPY_HEADER_LOCK
    _NPY_HEADER_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def load_npy(data: bytes) -> np.ndarray:
    """np.load of .npy bytes, one thread at a time: numpy parses the header with ast.literal_eval, and
    CPython 3.11 before its fix for gh-106905 can fail ast calls made from several threads at once
    ("AST constructor recursion depth mismatch") — the loader's read-ahead thread is one of them."""
    with _NPY_HEADER_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)


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
        video = load_npy(raw["video.npy"])
        text = load_npy(raw["text.npy"])
    except Exception as e:  # corrupt bytes of any kind
        raise SampleError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
    if video.ndim != 2 or text.ndim != 2:
        raise SampleError(f"{where}: expected 2-d video/text arrays, got {video.shape} / {text.shape}")
    return MomentSample(raw["__key__"], meta, video, text)


# --- generic samples (builders for every task): any named float16 arrays + raw file members ------------

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
IMAGE_MEMBER = {"JPEG": "jpg", "PNG": "png"}  # Pillow's format → the member extension an image is stored under
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Sample:
    """One tar group: `<key>.json` + `<key>.<name>.npy` per array (float16 T×D) + raw files (`<key>.jpg`)."""

    key: str
    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "video" → T×Dv, "text", "audio", …
    files: dict[str, bytes] = field(default_factory=dict)  # extension → bytes, e.g. "jpg"


def safe_key(text: str) -> str:
    """A tar-group key WebDataset splits back correctly: no dots (extension separator) or slashes."""
    return _UNSAFE_KEY_CHARS.sub("_", str(text))


def members_match(exts: list[str], members: list[str]) -> bool:
    """Whether a sample's member extensions are the manifest's `members`, where one member may list
    alternatives as WebDataset's `to_tuple("jpg;png")` does (an image dataset mixing JPEG and PNG)."""
    options = [set(m.split(";")) for m in members]
    if len(exts) != len(options):
        return False
    for ext in exts:
        slot = next((o for o in options if ext in o), None)
        if slot is None:
            return False
        options.remove(slot)
    return True


def encode_sample(sample: Sample) -> dict:
    """To the dict that webdataset's TarWriter writes; arrays are stored as float16."""
    raw = {"__key__": sample.key, "json": json.dumps(sample.meta).encode()}
    for name, array in sample.arrays.items():
        raw[f"{name}.npy"] = npy_bytes(array.astype(np.float16))
    raw.update(sample.files)
    return raw


def decode_sample(raw: dict) -> Sample:
    """From raw members (bytes per extension) back to arrays and files; images are left as bytes."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
    if "json" not in raw:
        raise SampleError(f"{where}: missing member json")
    sample = Sample(raw["__key__"], {})
    for ext, data in raw.items():
        if ext.startswith("__"):
            continue
        try:
            if ext == "json":
                sample.meta = json.loads(data)
            elif ext.endswith(".npy"):
                sample.arrays[ext[: -len(".npy")]] = load_npy(data)
            else:
                sample.files[ext] = data
        except Exception as e:  # corrupt bytes of any kind
            raise SampleError(f"{where}: cannot decode {ext} ({type(e).__name__}: {e})") from None
    if not isinstance(sample.meta, dict):
        raise SampleError(f"{where}: json is a {type(sample.meta).__name__}, expected an object")
    return sample
