"""Movie-level samples (DESIGN.md §3) for long-form grounding (MAD): one tar group per movie, never one per sentence.

    <key>.json       {"movie", "duration" (s), "fps", "sentences": [{"sid", "sentence", "timestamps": [s, e],
                      "tokens": [offset, count]}, ...]}
    <key>.video.npy  float16 T×Dv frame features at `fps`
    <key>.text.npy   float16 (Σ count)×Dt: every sentence's token features, concatenated in sentence order

A movie's frames are stored once however many sentences it has (MAD: ≈ 37 MB of frames, ≈ 590 sentences).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from lamscale.data.schema import SampleError, load_npy, npy_bytes

MEMBERS = ("json", "text.npy", "video.npy")
FRAME_SLACK = 2  # frames a movie may lack against duration·fps: feature extractors round the last frame either way


@dataclass
class MovieSample:
    key: str
    meta: dict  # movie, duration, fps, sentences: [{sid, sentence, timestamps, tokens: [offset, count]}]
    video: np.ndarray  # (T, Dv) float16 frame features at meta["fps"]
    text: np.ndarray  # (Σ count, Dt) float16 token features of every sentence, in sentence order

    def tokens(self, i: int) -> np.ndarray:
        """Sentence i's (count, Dt) token features."""
        offset, count = self.meta["sentences"][i]["tokens"]
        return self.text[offset:offset + count]


def frames_needed(duration: float, fps: float) -> int:
    """The fewest frames a movie of `duration` seconds may have at `fps` (rounding slack included)."""
    return max(1, round(duration * fps) - FRAME_SLACK)


def encode_movie(sample: MovieSample) -> dict:
    """To the dict that webdataset's TarWriter (or the project's ShardWriter) writes."""
    return {"__key__": sample.key, "json": json.dumps(sample.meta).encode(),
            "video.npy": npy_bytes(sample.video.astype(np.float16)), "text.npy": npy_bytes(sample.text.astype(np.float16))}


def decode_movie(raw: dict) -> MovieSample:
    """From webdataset's raw sample (bytes per extension, `__key__`, `__url__`); every inconsistency is
    one SampleError line naming shard, movie key and (where one is at fault) sentence id."""
    where = f"{raw.get('__url__', '?')}: movie {raw.get('__key__', '?')!r}"
    missing = [ext for ext in MEMBERS if ext not in raw]
    if missing:
        raise SampleError(f"{where}: missing member(s) {missing}")
    try:
        meta = json.loads(raw["json"])
        video, text = load_npy(raw["video.npy"]), load_npy(raw["text.npy"])
    except Exception as e:  # corrupt bytes of any kind
        raise SampleError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
    sample = MovieSample(raw["__key__"], meta, video, text)
    problem = movie_problem(sample)
    if problem:
        raise SampleError(f"{where}{problem}")
    return sample


def movie_problem(sample: MovieSample) -> str:
    """Why this movie is not a valid sample ("" when it is); starts with ": " or ", sentence …: "."""
    meta, video, text = sample.meta, sample.video, sample.text
    problem = meta_problem(meta, ("movie", "duration", "fps", "sentences"))
    if problem:
        return problem
    if video.ndim != 2 or text.ndim != 2:
        return f": expected 2-d video/text arrays, got {video.shape} / {text.shape}"
    problem = frames_problem(video, meta["duration"], meta["fps"])
    if problem:
        return problem
    if not isinstance(meta["sentences"], list) or not meta["sentences"]:
        return ": no sentences"
    for s in meta["sentences"]:
        problem = _sentence_problem(s, meta["duration"], text)
        if problem:
            sid = s.get("sid", "?") if isinstance(s, dict) else "?"
            return f", sentence {sid!r}: {problem}"
    if not np.isfinite(text).all():
        return ": text.npy holds NaN/Inf outside every sentence's tokens"
    return ""


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def meta_problem(meta: object, fields: tuple[str, ...]) -> str:
    """What every movie-level sample's json needs ("" when it holds): an object with `fields`, a positive
    duration (s) and fps. Shared with `ad_movies`."""
    if not isinstance(meta, dict):
        return f": json is a {type(meta).__name__}, expected an object"
    lacking = [f for f in fields if f not in meta]
    if lacking:
        return f": json lacks {', '.join(lacking)}"
    duration, fps = meta["duration"], meta["fps"]
    if not is_number(duration) or duration <= 0 or not is_number(fps) or fps <= 0:
        return f": duration {duration!r} s / fps {fps!r} are not positive numbers"
    return ""


def frames_problem(video: np.ndarray, duration: float, fps: float) -> str:
    """A movie's 2-d frame array covers its duration and is finite ("" when it does)."""
    if len(video) < frames_needed(duration, fps):
        return f": {len(video)} frames at {fps} fps cover {len(video) / fps:.1f} s of a {duration} s movie"
    if not np.isfinite(video).all():
        return f": video frame {int(np.argwhere(~np.isfinite(video))[0, 0])} holds NaN/Inf"
    return ""


def span_problem(ts: object, duration: float) -> str:
    """Why `ts` is not a [start, end] span (seconds) inside a movie of `duration` s; "" if it is."""
    if not (isinstance(ts, list) and len(ts) == 2 and all(map(is_number, ts))):
        return f"timestamps {ts!r} are not [start, end] seconds"
    if not 0 <= ts[0] <= duration or not 0 <= ts[1] <= duration:
        return f"timestamps {ts} outside the movie [0, {duration}]"
    if ts[1] <= ts[0]:
        return f"timestamps {ts} have end <= start"
    return ""


def _sentence_problem(s: object, duration: float, text: np.ndarray) -> str:
    if not isinstance(s, dict) or any(f not in s for f in ("sid", "sentence", "timestamps", "tokens")):
        return "not an object with sid, sentence, timestamps, tokens"
    ts, tok = s["timestamps"], s["tokens"]
    problem = span_problem(ts, duration)
    if problem:
        return problem
    if not (isinstance(tok, list) and len(tok) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in tok)):
        return f"tokens {tok!r} is not [offset, count]"
    if tok[0] < 0 or tok[1] < 1 or tok[0] + tok[1] > len(text):
        return f"tokens {tok} outside the {len(text)} token features in text.npy"
    if not np.isfinite(text[tok[0]:tok[0] + tok[1]]).all():
        return "token features hold NaN/Inf"
    return ""


def check_dims(sample: MovieSample, video_dim: int, text_dim: int, where: str) -> None:
    """Refuse features whose dims disagree with the config (`where` names it, e.g. the shard or config key)."""
    found = {"video": sample.video.shape[-1], "text": sample.text.shape[-1]}
    wrong = [f"{k} features are {found[k]}-d, expected {want}-d" for k, want in (("video", video_dim), ("text", text_dim))
             if found[k] != want]
    if wrong:
        raise SampleError(f"{where}: movie {sample.meta.get('movie', sample.key)!r}: {'; '.join(wrong)}")
