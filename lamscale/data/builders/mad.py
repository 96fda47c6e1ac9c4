"""MAD (Soldelli et al., CVPR 2022) → moment samples: one per sentence, over the whole movie.

    annotations/MAD_{train,val,test}.json       {sentence_id: {movie, sentence, timestamps: [s, e],
                                                  movie_duration, ...}}
    features/CLIP_frames_features_5fps.h5       one dataset per movie id: frames×512 at 5 fps
    features/CLIP_language_tokens_features.h5   one dataset per sentence id: tokens×512

Windows stay in seconds; clip_len = 1/fps (0.2 s). Sentences are processed movie by movie, so each
movie's frames are read and converted once.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from lamscale.data.builders import (BuildOptions, DatasetPlan, Item, Reject, SplitInput, check_finite, check_text, check_window,
                                   find, require)
from lamscale.data.schema import Sample, safe_key

VIDEO_FEATURES = "CLIP_frames_features_5fps.h5"
TEXT_FEATURES = "CLIP_language_tokens_features.h5"
OFFICIAL_DIMS = {"video": 512, "text": 512}
FPS = 5.0
SPLITS = ("train", "val", "test")


def annotation_files(opts: BuildOptions) -> dict[str, Path]:
    """split → json: `--annotations` files (`MAD_<split>.json` names the split), else the release's."""
    if opts.annotations:
        files = {}
        for a in opts.annotations:
            path = opts.path(a)
            if not path.is_file():
                raise FileNotFoundError(f"--annotations: {path} does not exist")
            files[path.stem.removeprefix("MAD_")] = path
    else:
        files = {}
        for split in opts.splits or SPLITS:
            for folder in (opts.input, opts.input / "annotations"):
                if (folder / f"MAD_{split}.json").is_file():
                    files[split] = folder / f"MAD_{split}.json"
                    break
    wanted = opts.splits or list(files)
    missing = [s for s in wanted if s not in files]
    if missing or not files:
        raise FileNotFoundError(f"{opts.input}: no MAD_<split>.json for {missing or list(SPLITS)} (pass --annotations)")
    return {s: files[s] for s in wanted}


def read_items(path: Path) -> list[Item]:
    try:
        annotations = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(annotations, dict):
        raise ValueError(f"{path}: expected an object {{sentence_id: annotation}}, got a {type(annotations).__name__}")
    items = [Item(str(sid), ann) for sid, ann in annotations.items()]
    # movie by movie (stable), so that the loader reads each movie's frames once
    return sorted(items, key=lambda it: str(it.payload.get("movie", "")) if isinstance(it.payload, dict) else "")


class MADLoader:
    def __init__(self, video_h5: Path, text_h5: Path, fps: float):
        self.video_h5, self.text_h5, self.fps = video_h5, text_h5, fps
        self._video: h5py.File | None = None
        self._text: h5py.File | None = None
        self._movie: tuple[str, np.ndarray | Reject] | None = None  # the last movie read, or why it failed

    def _open(self) -> None:
        if self._video is None:  # opened lazily: h5py handles are not picklable
            self._video, self._text = h5py.File(self.video_h5, "r"), h5py.File(self.text_h5, "r")

    def _read(self, h5: h5py.File, path: Path, name: str) -> np.ndarray:
        if name not in h5:
            raise Reject("missing_features", f"{path.name} has no dataset {name!r}")
        try:
            array = h5[name][()]
        except Exception as e:  # a damaged dataset inside the file
            raise Reject("unreadable", f"cannot read {name!r} from {path}: {type(e).__name__}: {e}") from None
        return check_finite(array, f"{path.name}[{name!r}]")

    def _movie_frames(self, movie: str) -> np.ndarray:
        if self._movie is None or self._movie[0] != movie:
            try:
                frames: np.ndarray | Reject = self._read(self._video, self.video_h5, movie)
            except Reject as r:
                frames = r
            self._movie = (movie, frames)
        if isinstance(self._movie[1], Reject):
            raise self._movie[1]
        return self._movie[1]

    def __call__(self, item: Item) -> Sample:
        self._open()
        ann = item.payload
        if not isinstance(ann, dict):
            raise Reject("bad_json", f"annotation {item.id} is a {type(ann).__name__}, not an object")
        require(ann, ("movie", "sentence", "timestamps", "movie_duration"))
        check_text(ann, "sentence")
        duration = ann["movie_duration"]
        if not isinstance(duration, (int, float)) or duration <= 0:
            raise Reject("bad_window", f"movie_duration {duration!r} is not a positive number of seconds")
        window = check_window(ann["timestamps"], duration, "timestamps")
        video = self._movie_frames(str(ann["movie"]))
        text = self._read(self._text, self.text_h5, item.id)
        meta = {"qid": item.id, "vid": ann["movie"], "query": ann["sentence"], "duration": duration,
                "clip_len": 1.0 / self.fps, "fps": self.fps, "relevant_windows": [window],
                "relevant_clip_ids": [], "saliency_scores": []}  # MAD has no saliency labels
        return Sample(safe_key(item.id), meta, {"video": video, "text": text})


def plan(opts: BuildOptions) -> DatasetPlan:
    video_h5 = find(opts, (opts.video_features or [VIDEO_FEATURES])[0], "features")
    text_h5 = find(opts, opts.text_features or TEXT_FEATURES, "features")
    for path in (video_h5, text_h5):
        if not h5py.is_hdf5(path):
            raise ValueError(f"{path} is not an HDF5 file")
    fps = opts.fps or FPS
    load = MADLoader(video_h5, text_h5, fps)
    splits = [SplitInput(name, read_items(path), load) for name, path in annotation_files(opts).items()]
    dims = {k: v for k, v in OFFICIAL_DIMS.items() if getattr(opts, f"{k}_features") is None}
    return DatasetPlan(splits, "moment", dims, {"fps": fps, "clip_len": 1.0 / fps})
