"""MAD (Soldelli et al., CVPR 2022) → movie samples (`lamscale.data.movies`): one per movie, holding its
frames once and every sentence of it (token features + timestamps).

    annotations/MAD_{train,val,test}.json       {sentence_id: {movie, sentence, timestamps: [s, e],
                                                  movie_duration, ...}}
    features/CLIP_frames_features_5fps.h5       one dataset per movie id: frames×512 at 5 fps
    features/CLIP_language_tokens_features.h5   one dataset per sentence id: tokens×512

The inputs the report counts are sentences; the samples are movies. A sentence that cannot be used is
rejected alone (naming movie and sentence); a movie without usable frames rejects all of its sentences,
and a movie left with no sentence is reported itself.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import h5py
import numpy as np

from lamscale.data.builders import (BuildOptions, DatasetPlan, Item, Reject, SplitInput, check_array, check_finite, check_text,
                                   check_window, find, require)
from lamscale.data.movies import MovieSample, frames_needed, movie_problem
from lamscale.data.schema import Sample, safe_key

VIDEO_FEATURES = "CLIP_frames_features_5fps.h5"
TEXT_FEATURES = "CLIP_language_tokens_features.h5"
OFFICIAL_DIMS = {"video": 512, "text": 512}
FPS = 5.0
SPLITS = ("train", "val", "test")


def annotation_files(opts: BuildOptions) -> dict[str, Path]:
    """split → json: `--annotations` files (`MAD_<split>.json` names the split), else the release's."""
    files = {}
    if opts.annotations:
        for a in opts.annotations:
            path = opts.path(a)
            if not path.is_file():
                raise FileNotFoundError(f"--annotations: {path} does not exist")
            files[path.stem.removeprefix("MAD_")] = path
    else:
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
    """One item per movie (sorted by name), its parts the movie's sentence ids in annotation order; a
    sentence that names no movie is an item of its own, rejected by the loader."""
    try:
        annotations = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(annotations, dict):
        raise ValueError(f"{path}: expected an object {{sentence_id: annotation}}, got a {type(annotations).__name__}")
    movies: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    orphans = []
    for sid, ann in annotations.items():
        if isinstance(ann, dict) and isinstance(ann.get("movie"), (str, int)) and str(ann["movie"]).strip():
            movies[str(ann["movie"])].append((str(sid), ann))
        else:
            what = f"a {type(ann).__name__}, not an object" if not isinstance(ann, dict) else f"movie {json.dumps(ann.get('movie'))}"
            orphans.append(Item(str(sid), f"sentence {sid}: annotation is {what}"))
    return [Item(movie, sentences, parts=[sid for sid, _ in sentences]) for movie, sentences in sorted(movies.items())] + orphans


class MADLoader:
    def __init__(self, video_h5: Path, text_h5: Path, fps: float, dims: dict[str, int]):
        self.video_h5, self.text_h5, self.fps = video_h5, text_h5, fps
        self.dims = dict(dims)  # checked per sentence here, so that one bad sentence does not reject its movie
        self._video: h5py.File | None = None
        self._text: h5py.File | None = None

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

    def __call__(self, item: Item) -> Sample:
        self._open()
        if item.parts is None:  # a sentence without a movie
            raise Reject("bad_json", item.payload)
        movie, sentences = item.id, item.payload
        duration = _movie_duration(sentences)
        kept = []  # (sid, ann, window) whose annotation is usable
        for sid, ann in sentences:
            try:
                kept.append((sid, ann, self._check_annotation(ann, duration)))
            except Reject as r:
                item.rejected[sid] = Reject(r.kind, f"movie {movie}, sentence {sid}: {r.reason}")
        if not kept:
            self._no_sentences(item)
        pinned = dict(self.dims)  # a rejected movie must not pin the dims
        try:
            video = self._frames(movie, duration, pinned)
        except Reject as r:  # every sentence of the movie goes with it, each named
            for sid, _, _ in kept:
                item.rejected[sid] = Reject(r.kind, f"movie {movie}, sentence {sid}: {r.reason}")
            raise Reject(r.kind, f"movie {movie}: {r.reason}") from None
        tokens, meta_sentences = [], []
        for sid, ann, window in kept:
            try:
                text = self._read(self._text, self.text_h5, sid)
                check_array("text", text, pinned)
            except Reject as r:
                item.rejected[sid] = Reject(r.kind, f"movie {movie}, sentence {sid}: {r.reason}")
                continue
            offset = sum(len(t) for t in tokens)
            meta_sentences.append({"sid": sid, "sentence": ann["sentence"], "timestamps": [float(x) for x in window],
                                   "tokens": [offset, len(text)]})
            tokens.append(text)
        if not meta_sentences:
            self._no_sentences(item)
        meta = {"movie": movie, "duration": float(duration), "fps": self.fps, "sentences": meta_sentences}
        sample = MovieSample(safe_key(movie), meta, video.astype(np.float16), np.concatenate(tokens).astype(np.float16))
        problem = movie_problem(sample)  # never write what decode_movie would refuse
        if problem:
            raise Reject("invalid_movie", f"movie {movie}{problem}")
        self.dims = pinned
        return Sample(sample.key, sample.meta, {"video": sample.video, "text": sample.text})

    @staticmethod
    def _no_sentences(item: Item) -> None:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(Counter(r.kind for r in item.rejected.values()).items()))
        raise Reject("no_sentences", f"movie {item.id}: all {len(item.parts)} sentences rejected ({kinds})")

    def _check_annotation(self, ann: dict, duration: float) -> list[float]:
        require(ann, ("sentence", "timestamps", "movie_duration"))
        check_text(ann, "sentence")
        own = ann["movie_duration"]
        if not _positive(own):
            raise Reject("bad_window", f"movie_duration {own!r} is not a positive number of seconds")
        if abs(own - duration) > 1.0 / self.fps:
            raise Reject("bad_duration", f"movie_duration {own} disagrees with the movie's {duration} s (its other sentences)")
        return check_window(ann["timestamps"], duration, "timestamps")

    def _frames(self, movie: str, duration: float, pinned: dict[str, int]) -> np.ndarray:
        video = self._read(self._video, self.video_h5, movie)
        check_array("video", video, pinned)
        if len(video) < frames_needed(duration, self.fps):
            raise Reject("short_video", f"{self.video_h5.name}[{movie!r}] has {len(video)} frames at {self.fps} fps "
                                        f"({len(video) / self.fps:.1f} s), movie_duration is {duration} s")
        return video


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _movie_duration(sentences: list[tuple[str, dict]]) -> float | None:
    """The movie_duration most of its sentences give (MAD repeats it on every sentence)."""
    durations = Counter(ann["movie_duration"] for _, ann in sentences if _positive(ann.get("movie_duration")))
    return durations.most_common(1)[0][0] if durations else None


def plan(opts: BuildOptions) -> DatasetPlan:
    video_h5 = find(opts, (opts.video_features or [VIDEO_FEATURES])[0], "features")
    text_h5 = find(opts, opts.text_features or TEXT_FEATURES, "features")
    for path in (video_h5, text_h5):
        if not h5py.is_hdf5(path):
            raise ValueError(f"{path} is not an HDF5 file")
    fps = opts.fps or FPS
    # the official dims hold only for the official feature files
    dims = {k: v for k, v in OFFICIAL_DIMS.items() if getattr(opts, f"{k}_features") is None}
    load = MADLoader(video_h5, text_h5, fps, {**dims, **opts.dims})
    splits = [SplitInput(name, read_items(path), load) for name, path in annotation_files(opts).items()]
    return DatasetPlan(splits, "movie", dims, {"fps": fps}, item_unit="movies")
