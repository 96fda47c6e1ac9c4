"""Random training windows over long videos: `window` consecutive clips that contain a target moment.

Evaluation sees the whole video; training sees a window. The window is drawn from
Random((seed, epoch, key)), so it depends on nothing but the epoch: a resumed run draws the same ones.
"""
from __future__ import annotations

import math
import random

from lamscale.data.schema import MomentSample


def window_rng(seed: int, epoch: int, key: str) -> random.Random:
    return random.Random(f"{seed}-window-{epoch}-{key}")


def start_range(n_clips: int, window: int, moment: tuple[int, int] | None) -> tuple[int, int]:
    """Inclusive range of first clips for a window of `window` clips that holds clips [a, b) of `moment`,
    or lies inside it when the moment is longer than the window."""
    last = n_clips - window
    if moment is None:
        return 0, last
    a, b = moment
    b = min(b, n_clips)
    if b - a <= window:
        return max(0, b - window), min(a, last)
    return a, min(b - window, last)


def crop(sample: MomentSample, window: int, rng: random.Random) -> MomentSample:
    """`sample` cut to `window` clips around one of its relevant windows (chosen by `rng`), with the
    annotations moved into the window's time frame; videos of at most `window` clips are returned as they are."""
    n_clips = len(sample.video)
    if window <= 0 or n_clips <= window:
        return sample
    meta = sample.meta
    clip_len = float(meta["clip_len"])
    moments = meta.get("relevant_windows") or []
    moment = None
    if moments:
        start_s, end_s = rng.choice(moments)
        first_clip = min(int(start_s // clip_len), n_clips - 1)
        moment = (first_clip, max(math.ceil(end_s / clip_len), first_clip + 1))
    lo, hi = start_range(n_clips, window, moment)
    first = rng.randint(lo, hi)
    offset = first * clip_len
    duration = min(float(meta["duration"]) - offset, window * clip_len)
    windows = [[round(max(0.0, s - offset), 4), round(min(duration, e - offset), 4)]
               for s, e in moments if e - offset > 0 and s - offset < duration]
    kept = [(c - first, scores) for c, scores in zip(meta.get("relevant_clip_ids", []), meta.get("saliency_scores", []))
            if first <= c < first + window]
    cropped = {**meta, "duration": duration, "relevant_windows": windows,
               "relevant_clip_ids": [c for c, _ in kept], "saliency_scores": [s for _, s in kept],
               "window": [offset, offset + window * clip_len]}  # where in the full video this window lies
    return MomentSample(sample.key, cropped, sample.video[first : first + window], sample.text)
