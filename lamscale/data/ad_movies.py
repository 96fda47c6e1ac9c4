"""Movie-level audio-description samples (DESIGN.md §2–3, captioning on MADv2 in the AutoAD layout): one tar
group per movie, holding its frames once and every AD of it, plus its subtitles as context.

    <key>.json       {"movie", "duration" (s), "fps", "ads": [{"sid", "text", "timestamps": [s, e]}, ...] sorted by
                      start, "subtitles": [{"text", "timestamps": [s, e]}, ...] (may be empty)}
    <key>.video.npy  float16 T×Dv frame features at `fps`; frame f covers [f/fps, (f+1)/fps)

A captioning example is one AD: the frames around it (`ad_segment`), the ADs before it (`previous_ads`) and the
subtitles near it (`subtitles_between`) — AutoAD's context — all cut from the one movie sample.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from lamscale.data.movies import frames_problem, meta_problem, span_problem
from lamscale.data.schema import SampleError, load_npy, npy_bytes

MEMBERS = ("json", "video.npy")
_EPS = 1e-6  # seconds·fps: 2.2 s × 5 fps is 11.000000000000002, still frame 11's start


@dataclass
class ADMovie:
    key: str
    meta: dict  # movie, duration, fps, ads: [{sid, text, timestamps}] by start, subtitles: [{text, timestamps}]
    video: np.ndarray  # (T, Dv) float16 frame features at meta["fps"]


def encode_ad_movie(sample: ADMovie) -> dict:
    """To the dict that webdataset's TarWriter (or the project's ShardWriter) writes."""
    return {"__key__": sample.key, "json": json.dumps(sample.meta).encode(),
            "video.npy": npy_bytes(sample.video.astype(np.float16))}


def decode_ad_movie(raw: dict) -> ADMovie:
    """From webdataset's raw sample (bytes per extension, `__key__`, `__url__`); every inconsistency is one
    SampleError line naming shard, movie key and (where one is at fault) the AD's sid."""
    where = f"{raw.get('__url__', '?')}: movie {raw.get('__key__', '?')!r}"
    missing = [ext for ext in MEMBERS if ext not in raw]
    if missing:
        raise SampleError(f"{where}: missing member(s) {missing}")
    try:
        meta, video = json.loads(raw["json"]), load_npy(raw["video.npy"])
    except Exception as e:  # corrupt bytes of any kind
        raise SampleError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
    sample = ADMovie(raw["__key__"], meta, video)
    problem = ad_movie_problem(sample)
    if problem:
        raise SampleError(f"{where}{problem}")
    return sample


def ad_movie_problem(sample: ADMovie) -> str:
    """Why this movie is not a valid sample ("" when it is); starts with ": " or ", AD …: "."""
    meta, video = sample.meta, sample.video
    problem = meta_problem(meta, ("movie", "duration", "fps", "ads", "subtitles"))
    if problem:
        return problem
    duration = meta["duration"]
    if video.ndim != 2 or video.shape[0] == 0:
        return f": expected a 2-d (T>0, D) video array, got {video.shape}"
    problem = frames_problem(video, duration, meta["fps"])
    if problem:
        return problem
    if not isinstance(meta["ads"], list) or not meta["ads"]:
        return ": no ADs"
    previous = -math.inf
    for ad in meta["ads"]:
        sid = ad.get("sid", "?") if isinstance(ad, dict) else "?"
        problem = _entry_problem(ad, ("sid", "text", "timestamps"), duration)
        if not problem and ad["timestamps"][0] < previous:
            problem = f"starts at {ad['timestamps'][0]}, before the AD ahead of it (ADs are sorted by start)"
        if problem:
            return f", AD {sid!r}: {problem}"
        previous = ad["timestamps"][0]
    if not isinstance(meta["subtitles"], list):
        return f": subtitles is a {type(meta['subtitles']).__name__}, expected a list"
    for i, sub in enumerate(meta["subtitles"]):
        problem = _entry_problem(sub, ("text", "timestamps"), duration)
        if problem:
            return f", subtitle {i}: {problem}"
    return ""


def _entry_problem(entry: object, fields: tuple[str, ...], duration: float) -> str:
    if not isinstance(entry, dict) or any(f not in entry for f in fields):
        return f"not an object with {', '.join(fields)}"
    text = entry["text"]
    if not isinstance(text, str) or not text.strip():
        return f"text {json.dumps(text)} is empty"
    return span_problem(entry["timestamps"], duration)


def ad_segment(movie: ADMovie, i: int, context_s: float, max_frames: int) -> tuple[int, int]:
    """Frames [first, end) covering AD i's [start − context_s, end], clipped to the movie; when longer than
    `max_frames`, the last `max_frames` of them (those nearest the AD). Never empty."""
    if context_s < 0 or max_frames < 1:
        raise ValueError(f"ad_segment: context_s {context_s} must be >= 0 and max_frames {max_frames} >= 1")
    start, end = movie.meta["ads"][i]["timestamps"]
    fps, frames = movie.meta["fps"], len(movie.video)
    first = math.floor(max(0.0, start - context_s) * fps + _EPS)
    last = math.ceil(min(end, movie.meta["duration"]) * fps - _EPS)  # exclusive: the first frame starting at/after end
    first = min(first, frames - 1)  # an AD in the last rounding slack still gets the last frame
    last = max(min(last, frames), first + 1)
    return max(first, last - max_frames), last


def previous_ads(movie: ADMovie, i: int, k: int) -> list[str]:
    """The texts of the k ADs before AD i in time order, oldest first (fewer near the movie's start)."""
    return [ad["text"] for ad in movie.meta["ads"][max(0, i - k):i]] if k > 0 else []


def subtitles_between(movie: ADMovie, start_s: float, end_s: float) -> list[str]:
    """The texts of the subtitles overlapping (start_s, end_s), in time order."""
    subs = sorted(movie.meta["subtitles"], key=lambda s: s["timestamps"][0])
    return [s["text"] for s in subs if s["timestamps"][0] < end_s and s["timestamps"][1] > start_s]
