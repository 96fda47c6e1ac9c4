"""MSR-VTT → captioning samples: one per video, with all of its captions.

    train_val_videodatainfo.json, test_videodatainfo.json (or CLIP4Clip's MSRVTT_data.json)
        {"videos": [{video_id, split, category, url, ...}], "sentences": [{video_id, caption, sen_id}]}
    video_features/{video_id}.npy    T×Dv
    audio_features/{video_id}.npy    T×Da — used when that folder exists or --audio-features names one

Splits keep the release's names (train, validate, test). Features are whatever extractor the user ran,
so their dims are pinned by the first video unless --video-dim/--audio-dim say otherwise.

The inputs the report counts are captions; the samples are videos (all of a video's captions in one).
An empty caption is rejected alone, naming video and sen_id, as is a training caption none of whose words
is in the vocabulary; a video with no caption left is reported itself. The tokenizer (captioning's
vocabulary) is trained on the training split's usable captions and written beside the manifest.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lamscale.data.builders import BuildOptions, DatasetPlan, Item, Reject, SplitInput, find, read_array, require
from lamscale.data.captions import (STATS_FILE, TOKENIZER_FILE, caption_problem, most_frequent, tokenizer_bytes,
                                    train_tokenizer)
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


def caption_id(vid: str, i: int, sentence: dict) -> str:
    """What the report calls a caption: its sen_id, else its place among the video's captions."""
    return str(sentence["sen_id"]) if sentence.get("sen_id") is not None else f"{vid}#{i}"


class MSRVTTLoader:
    def __init__(self, sentences: dict[str, list[dict]], video_dir: Path, audio_dir: Path | None, tokenizer, train: bool):
        self.sentences, self.video_dir, self.audio_dir = sentences, video_dir, audio_dir
        self.tokenizer, self.train = tokenizer, train

    def __call__(self, item: Item) -> Sample:
        video = item.payload
        if not isinstance(video, dict):
            raise Reject("bad_json", f"videos entry {item.id} is a {type(video).__name__}, not an object")
        require(video, ("video_id",))
        vid = str(video["video_id"])
        captions = []
        for i, s in enumerate(self.sentences.get(vid, [])):
            problem = self.problem(s.get("caption"))
            if problem:
                item.rejected[caption_id(vid, i, s)] = Reject("bad_caption", f"video {vid} sen_id {s.get('sen_id')}: {problem}")
            else:
                captions.append(s)
        if not captions:
            raise Reject("no_captions", f"video {vid} has no usable caption in the annotations")
        arrays = {"video": read_array(self.video_dir / f"{vid}.npy")}
        if self.audio_dir is not None:
            arrays["audio"] = read_array(self.audio_dir / f"{vid}.npy")
        meta = {**video, "captions": [s["caption"] for s in captions], "sen_ids": [s.get("sen_id") for s in captions]}
        return Sample(safe_key(vid), meta, arrays)

    def problem(self, caption: object) -> str:
        """Empty captions anywhere; all-unknown ones only as training targets (a val reference may use any word)."""
        if not isinstance(caption, str) or not caption.strip():
            return f"caption {caption!r} is empty"
        return caption_problem(self.tokenizer, caption) if self.train else ""


def plan(opts: BuildOptions) -> DatasetPlan:
    videos, sentences = read_annotations(annotation_files(opts))
    video_dir = find(opts, (opts.video_features or [VIDEO_FEATURES])[0], "features")
    if opts.audio_features:
        audio_dir = find(opts, opts.audio_features, "features")
    else:
        audio_dir = next((d for d in (opts.input / AUDIO_FEATURES, opts.input / "features" / AUDIO_FEATURES) if d.is_dir()), None)
    by_split: dict[str, list[Item]] = defaultdict(list)
    for i, video in enumerate(videos):
        if not isinstance(video, dict):
            by_split["all"].append(Item(f"videos[{i}]", video, parts=[]))
            continue
        vid = str(video.get("video_id", f"videos[{i}]"))
        parts = [caption_id(vid, j, s) for j, s in enumerate(sentences.get(vid, []))]
        by_split[str(video.get("split", "all"))].append(Item(vid, video, parts=parts))
    names = opts.splits or sorted(by_split, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))
    missing = [s for s in names if s not in by_split]
    if missing:
        raise ValueError(f"--splits: no videos in split(s) {missing} (the annotations have {sorted(by_split)})")
    train_ids = [str(v.get("video_id")) for v in videos if isinstance(v, dict) and v.get("split") == "train"]
    train_captions = [s["caption"] for vid in train_ids for s in sentences.get(vid, [])  # annotation order: reproducible
                      if isinstance(s.get("caption"), str) and s["caption"].strip()]
    if not train_captions:
        raise ValueError(f"{opts.input}: no training captions (split 'train') to build the vocabulary from")
    tokenizer = train_tokenizer(sorted(train_captions))
    known = {str(v.get("video_id")) for v in videos if isinstance(v, dict)}
    orphans = sum(len(s) for vid, s in sentences.items() if vid not in known)  # captions of no listed video
    extra = {"audio": audio_dir is not None, "orphan_captions": orphans, "tokenizer": TOKENIZER_FILE,
             "caption_stats": STATS_FILE, "vocabulary": tokenizer.get_vocab_size()}
    stats = {"most_frequent": most_frequent(train_captions), "references": len(train_captions)}
    files = {TOKENIZER_FILE: tokenizer_bytes(tokenizer), STATS_FILE: json.dumps(stats, indent=2).encode()}
    splits = [SplitInput(s, by_split[s], MSRVTTLoader(sentences, video_dir, audio_dir, tokenizer, s == "train")) for s in names]
    return DatasetPlan(splits, "captioning", {}, extra, item_unit="videos", files=files)
