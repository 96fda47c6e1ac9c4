"""QVHighlights as released with moment_detr → moment samples (the trainer's `MomentSample` schema).

    highlight_{train,val,test}_release.jsonl     one query per line (test: no labels)
    slowfast_features/{vid}.npz  "features"      T×2304  } concatenated along the feature axis,
    clip_features/{vid}.npz      "features"      T×512   } truncated to the shorter T
    clip_text_features/qid{qid}.npz "last_hidden_state"  L×512

Folders are looked up in the release folder and in its `features/` (and the jsonl files in `data/`),
as the moment_detr repository lays them out.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from lamscale.data.builders import (BuildOptions, DatasetPlan, Item, Reject, SplitInput, check_text, check_window, find,
                                   read_array, require)
from lamscale.data.schema import Sample, safe_key

VIDEO_FEATURES = ("slowfast_features", "clip_features")
TEXT_FEATURES = "clip_text_features"
OFFICIAL_DIMS = {"video": 2304 + 512, "text": 512}
CLIP_LEN = 2.0  # seconds per clip in the official features
_RELEASE = re.compile(r"highlight_(\w+?)_release\.jsonl$")


def annotation_files(opts: BuildOptions) -> dict[str, Path]:
    """split → jsonl: `--annotations` files, else every `highlight_*_release.jsonl` of the release."""
    files = [opts.path(a) for a in opts.annotations] if opts.annotations else \
        sorted([*opts.input.glob("highlight_*_release.jsonl"), *opts.input.glob("data/highlight_*_release.jsonl")])
    by_split = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--annotations: {f} does not exist")
        match = _RELEASE.search(f.name)
        by_split[match.group(1) if match else f.stem] = f
    if opts.splits:
        missing = [s for s in opts.splits if s not in by_split]
        if missing:
            raise FileNotFoundError(f"--splits: no annotation file for {missing} (found {sorted(by_split)} in {opts.input})")
        return {s: by_split[s] for s in opts.splits}
    if not by_split:
        raise FileNotFoundError(f"{opts.input}: no highlight_*_release.jsonl (pass --annotations)")
    return by_split


def read_items(path: Path) -> list[Item]:
    """One item per non-empty line; a line that is not a JSON object becomes a rejected input."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ann = json.loads(line)
            if not isinstance(ann, dict):
                raise ValueError(f"a {type(ann).__name__}, not an object")
        except ValueError as e:
            items.append(Item(f"{path.name}:{number}", f"{path.name} line {number} is not a JSON object ({e})"))
            continue
        items.append(Item(f"qid{ann['qid']}" if "qid" in ann else f"{path.name}:{number}", ann))
    return items


def check_labels(ann: dict, clip_len: float) -> None:
    """Windows inside the video; clip ids inside it and paired with one saliency list each."""
    duration = ann["duration"]
    for i, window in enumerate(ann.get("relevant_windows", [])):
        check_window(window, duration, f"relevant_windows[{i}]")
    if "relevant_clip_ids" not in ann and "saliency_scores" not in ann:
        return
    clips, scores = ann.get("relevant_clip_ids", []), ann.get("saliency_scores", [])
    n_clips = math.ceil(duration / clip_len)
    bad = [c for c in clips if not isinstance(c, int) or not 0 <= c < n_clips]
    if bad:
        raise Reject("bad_window", f"relevant_clip_ids {bad[:5]} outside the video's {n_clips} clips")
    if len(clips) != len(scores) or not all(isinstance(s, list) and s for s in scores):
        raise Reject("bad_window", f"{len(clips)} relevant_clip_ids but {len(scores)} saliency_scores lists")


class QVHighlightsLoader:
    def __init__(self, video_dirs: list[Path], text_dir: Path, clip_len: float):
        self.video_dirs, self.text_dir, self.clip_len = video_dirs, text_dir, clip_len

    def __call__(self, item: Item) -> Sample:
        if isinstance(item.payload, str):
            raise Reject("bad_json", item.payload)
        ann = item.payload
        require(ann, ("qid", "query", "duration", "vid"))
        if isinstance(ann["qid"], bool) or not isinstance(ann["qid"], (int, float, str)) or not str(ann["qid"]).strip():
            raise Reject("bad_field", f"qid {json.dumps(ann['qid'])} is not a number or a non-empty string")
        check_text(ann, "query")
        check_text(ann, "vid")
        if not isinstance(ann["duration"], (int, float)) or ann["duration"] <= 0:
            raise Reject("bad_window", f"duration {ann['duration']!r} is not a positive number of seconds")
        check_labels(ann, self.clip_len)
        parts = []
        for folder in self.video_dirs:
            path = folder / f"{ann['vid']}.npz"
            part = read_array(path, "features")
            if part.ndim != 2:
                raise Reject("bad_shape", f"{path} features have shape {part.shape}, expected T×D")
            parts.append(part)
        length = min(len(p) for p in parts)  # feature extractors disagree by a clip at the end
        video = np.concatenate([p[:length] for p in parts], axis=1)
        text = read_array(self.text_dir / f"qid{ann['qid']}.npz", "last_hidden_state")
        meta = {k: ann[k] for k in ("qid", "vid", "query", "duration", "relevant_windows", "relevant_clip_ids", "saliency_scores") if k in ann}
        meta["clip_len"] = self.clip_len
        # the key only names the tar group (a qid like "8.5" would split as key "qid8", ext "5.json");
        # the sample's json keeps the qid as released
        return Sample(safe_key(f"qid{ann['qid']}"), meta, {"video": video, "text": text})


def plan(opts: BuildOptions) -> DatasetPlan:
    video_dirs = [find(opts, d, "features") for d in (opts.video_features or VIDEO_FEATURES)]
    text_dir = find(opts, opts.text_features or TEXT_FEATURES, "features")
    clip_len = opts.clip_len or CLIP_LEN
    load = QVHighlightsLoader(video_dirs, text_dir, clip_len)
    splits = [SplitInput(name, read_items(path), load) for name, path in annotation_files(opts).items()]
    # the official dims hold only for the official feature folders
    dims = {k: v for k, v in OFFICIAL_DIMS.items() if getattr(opts, f"{k}_features") is None}
    return DatasetPlan(splits, "moment", dims, {"clip_len": clip_len})
