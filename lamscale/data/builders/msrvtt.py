"""MSR-VTT → captioning samples: one per video, with all of its captions.

    train_val_videodatainfo.json, test_videodatainfo.json (or CLIP4Clip's MSRVTT_data.json)
        {"videos": [{video_id, split, category, url, ...}], "sentences": [{video_id, caption, sen_id}]}
    video_features/{video_id}.npy    T×Dv
    audio_features/{video_id}.npy    T×Da — used when that folder exists or --audio-features names one

Splits keep the release's names (train, validate, test). Features are whatever extractor the user ran,
so their dims are pinned by the first video unless --video-dim/--audio-dim say otherwise.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lamscale.data.builders import BuildOptions, DatasetPlan, Item, Reject, SplitInput, find, read_array, require
from lamscale.data.schema import Sample, safe_key

VIDEO_FEATURES = "video_features"
AUDIO_FEATURES = "audio_features"
ANNOTATION_GLOBS = ("*videodatainfo*.json", "MSRVTT_data.json")
SPLIT_ORDER = ("train", "validate", "val", "test")  # others follow, in the order the annotations list them


def annotation_files(opts: BuildOptions) -> list[Path]:
    if opts.annotations:
        files = [opts.path(a) for a in opts.annotations]
    else:
        files = sorted({f for folder in (opts.input, opts.input / "annotation") for g in ANNOTATION_GLOBS for f in folder.glob(g)})
    if not files:
        raise FileNotFoundError(f"{opts.input}: no *videodatainfo*.json or MSRVTT_data.json (pass --annotations)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--annotations: {f} does not exist")
    return files


def read_annotations(files: list[Path]) -> tuple[list[dict], dict[str, list[dict]]]:
    """All videos, and each video id's sentences, from every file."""
    videos, sentences = [], defaultdict(list)
    for f in files:
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or not isinstance(data.get("sentences"), list):
            raise ValueError(f"{f}: expected an object with 'videos' and 'sentences' lists")
        videos += data["videos"]
        for i, s in enumerate(data["sentences"]):
            if not isinstance(s, dict):
                raise ValueError(f"{f}: sentences[{i}] is a {type(s).__name__}, not an object")
            sentences[str(s.get("video_id"))].append(s)
    return videos, sentences


class MSRVTTLoader:
    def __init__(self, sentences: dict[str, list[dict]], video_dir: Path, audio_dir: Path | None):
        self.sentences, self.video_dir, self.audio_dir = sentences, video_dir, audio_dir

    def __call__(self, item: Item) -> Sample:
        video = item.payload
        if not isinstance(video, dict):
            raise Reject("bad_json", f"videos entry {item.id} is a {type(video).__name__}, not an object")
        require(video, ("video_id",))
        vid = str(video["video_id"])
        captions = [s for s in self.sentences.get(vid, []) if isinstance(s.get("caption"), str) and s["caption"].strip()]
        if not captions:
            raise Reject("no_captions", f"video {vid} has no captions in the annotations")
        arrays = {"video": read_array(self.video_dir / f"{vid}.npy")}
        if self.audio_dir is not None:
            arrays["audio"] = read_array(self.audio_dir / f"{vid}.npy")
        meta = {**video, "captions": [s["caption"] for s in captions], "sen_ids": [s.get("sen_id") for s in captions]}
        return Sample(safe_key(vid), meta, arrays)


def plan(opts: BuildOptions) -> DatasetPlan:
    videos, sentences = read_annotations(annotation_files(opts))
    video_dir = find(opts, (opts.video_features or [VIDEO_FEATURES])[0], "features")
    if opts.audio_features:
        audio_dir = find(opts, opts.audio_features, "features")
    else:
        audio_dir = next((d for d in (opts.input / AUDIO_FEATURES, opts.input / "features" / AUDIO_FEATURES) if d.is_dir()), None)
    by_split: dict[str, list[Item]] = defaultdict(list)
    for i, video in enumerate(videos):
        split = str(video.get("split", "all")) if isinstance(video, dict) else "all"
        by_split[split].append(Item(str(video.get("video_id", f"videos[{i}]")) if isinstance(video, dict) else f"videos[{i}]", video))
    names = opts.splits or sorted(by_split, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))
    missing = [s for s in names if s not in by_split]
    if missing:
        raise ValueError(f"--splits: no videos in split(s) {missing} (the annotations have {sorted(by_split)})")
    load = MSRVTTLoader(sentences, video_dir, audio_dir)
    known = {str(v.get("video_id")) for v in videos if isinstance(v, dict)}
    orphans = sum(len(s) for vid, s in sentences.items() if vid not in known)  # captions of no listed video
    extra = {"audio": audio_dir is not None, "orphan_captions": orphans}
    return DatasetPlan([SplitInput(s, by_split[s], load) for s in names], "captioning", {}, extra)
