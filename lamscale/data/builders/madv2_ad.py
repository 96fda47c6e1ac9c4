"""MADv2 audio descriptions in the AutoAD layout → AD movie samples (`lamscale.data.ad_movies`) for captioning:
one per movie, holding its frames once, every AD of it and its subtitles.

The layout as AutoAD reads it (TengdaHan/AutoAD@f16c4617d9239931055005e56e3efc6dce9f61a8:
autoad_ii/character_recognition/name_loader.py — ADs with movie/start/end/sentence/movie_duration, frames from
`<root>/<movie>.npy` at 5 fps, ADs past the frames dropped; datasets/mad_split.json — the split by movie), with
the release's file names as public code reading them spells them (annotations/MAD-v2/mad-v2-ad-unnamed.csv,
mad-v2-ad-named.csv, mad-v2-subs.csv with columns movie, start, end, text; features/CLIP_L14_frames_features_5fps.h5):

    mad-v2-ad-unnamed.csv or mad-v2-ad-named.csv  one row per AD: movie, start, end (s), text (or sentence);
        (here, annotations/, annotations/MAD-v2/)  optional movie_duration (or duration), id (anno_idx, sid, id, or
                                                   pandas' unnamed index column; else the sid is <movie>_<row>)
    mad-v2-subs.csv                                subtitles, the same columns; optional
    CLIP_L14_frames_features_5fps/<movie>.npy      frames×768 at 5 fps (AutoAD's copy), or CLIP_frames_features_5fps
        (here, features/)                          (×512); or either name + .h5, one dataset per movie (MAD's release)
    mad_split.json (here, datasets/)               {"TRAIN": [movie, ...], "EVAL": [...]}

`--annotations AD.csv[,SUBS.csv]` and `--video-features DIR|FILE.h5` name other files; two candidates found by
default (named and unnamed ADs, or two feature sets) is an error asking for one. Splits: AutoAD's mad_split.json
when present (TRAIN → train, EVAL → eval; its V1-* keys are MAD-v1 grounding splits, ignored), else a `split`
column, else `--splits NAME` puts every movie in that one split. Movies the split source places nowhere, and
rows naming no movie, are rejected under split "unassigned". A movie's duration is its movie_duration (the value
most rows give; a row disagreeing by more than a frame is rejected) and its frames must cover it, as for MAD;
without that column it is frames/fps. AutoAD drops ADs past the frames; here they are rejected, each named.

The tokenizer (lamscale.data.captions) is trained on the train split's usable AD texts and its subtitles, and
written with caption_stats.json beside the manifest. Subtitles are context, not inputs: one that is empty, not a
window, or starts after the movie is left out and counted in the manifest's `subtitles`.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tokenizers import Tokenizer

from lamscale.data.ad_movies import ADMovie, ad_movie_problem
from lamscale.data.builders import (BuildOptions, DatasetPlan, Item, Reject, SplitInput, check_array, check_finite, find,
                                   read_array)
from lamscale.data.captions import (STATS_FILE, TOKENIZER_FILE, caption_problem, most_frequent, tokenizer_bytes,
                                    train_tokenizer)
from lamscale.data.movies import frames_needed
from lamscale.data.schema import Sample, safe_key

AD_FILES = ("mad-v2-ad-unnamed.csv", "mad-v2-ad-named.csv")
SUBTITLE_FILE = "mad-v2-subs.csv"
SPLIT_FILE = "mad_split.json"
SPLIT_KEYS = {"TRAIN": "train", "EVAL": "eval"}
FEATURES = {"CLIP_L14_frames_features_5fps": 768, "CLIP_frames_features_5fps": 512}  # folder, or name + ".h5"
ANNOTATION_DIRS = (".", "annotations", "annotations/MAD-v2", "datasets")
TEXT_COLUMNS = ("text", "sentence")
ID_COLUMNS = ("anno_idx", "sid", "id", "", "Unnamed: 0")
DURATION_COLUMNS = ("movie_duration", "duration")
FPS = 5.0
UNASSIGNED = "unassigned"


@dataclass
class MovieInput:
    ads: list[tuple[str, dict]]  # (sid, row) in csv order
    subtitles: list[dict] = field(default_factory=list)
    duration: float | None = None  # the csv's, when it has one
    train: bool = False


def locate(opts: BuildOptions, names: list[str], dirs: tuple[str, ...], flag: str) -> Path | None:
    """The one release file of `names` under `dirs`; None if none; several is an error asking for `flag`."""
    found = list(dict.fromkeys(p.resolve() for d in dirs for n in names if (p := opts.input / d / n).exists()))
    if len(found) > 1:
        raise ValueError(f"{opts.input}: found {', '.join(map(str, found))}; pass {flag} to choose one")
    return found[0] if found else None


def read_csv(path: Path, what: str) -> list[dict]:
    """Rows as {row, movie, start, end, text, duration, id, split}: strings (None where the csv has no column)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first column
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the {what} csv ({type(e).__name__}: {e})") from None
    text = next((c for c in TEXT_COLUMNS if c in header), None)
    lacking = [c for c in ("movie", "start", "end") if c not in header] + ([] if text else ["text"])
    if lacking:
        raise ValueError(f"{path}: the {what} csv lacks column(s) {', '.join(lacking)} (has {', '.join(header)})")
    column = {"duration": next((c for c in DURATION_COLUMNS if c in header), None),
              "id": next((c for c in ID_COLUMNS if c in header), None), "split": "split" if "split" in header else None}
    return [{"row": i, "movie": (r["movie"] or "").strip(), "start": r["start"], "end": r["end"], "text": r[text] or "",
             **{k: (r[c] or "").strip() if c is not None else None for k, c in column.items()}} for i, r in enumerate(rows)]


def _seconds(value: object) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _movie_duration(rows: list[dict]) -> float | None:
    """The movie_duration most of its rows give."""
    durations = Counter(d for r in rows if (d := _seconds(r["duration"])) is not None and d > 0)
    return durations.most_common(1)[0][0] if durations else None


def check_ad(row: dict, duration: float | None, fps: float, tokenizer: Tokenizer | None) -> tuple[str, float, float]:
    """(text, start, end) of a usable AD; `duration` None: not known yet; `tokenizer`: a train AD."""
    text = row["text"]
    if not text.strip():
        raise Reject("bad_field", f"text {json.dumps(text)} is empty")
    start, end = _seconds(row["start"]), _seconds(row["end"])
    if start is None or end is None:
        raise Reject("bad_window", f"start {row['start']!r} / end {row['end']!r} are not numbers of seconds")
    if end <= start:
        raise Reject("bad_window", f"timestamps [{start}, {end}] have end <= start")
    if start < 0 or (duration is not None and end > duration):
        raise Reject("bad_window", f"timestamps [{start}, {end}] outside the movie [0, {duration or 'its end'}]")
    own = _seconds(row["duration"])
    if duration is not None and own is not None and abs(own - duration) > 1.0 / fps:
        raise Reject("bad_duration", f"movie_duration {own} disagrees with the movie's {duration} s (its other ADs)")
    problem = caption_problem(tokenizer, text) if tokenizer is not None else ""
    if problem:
        raise Reject("unknown_words", problem)
    return text, start, end


def subtitle(row: dict, duration: float) -> dict | None:
    """A subtitle clipped to the movie; None when it has no text, is not a window or starts after the movie."""
    start, end = _seconds(row["start"]), _seconds(row["end"])
    if not row["text"].strip() or start is None or end is None or not start < min(end, duration):
        return None
    return {"text": row["text"], "timestamps": [max(0.0, start), min(end, duration)]}


class Features:
    """A movie's frames from a folder of <movie>.npy or an .h5 with one dataset per movie."""

    def __init__(self, path: Path):
        self.path, self.is_h5 = path, path.is_file()
        if self.is_h5 and not h5py.is_hdf5(path):
            raise ValueError(f"{path} is neither a folder of <movie>.npy nor an HDF5 file")
        self._h5: h5py.File | None = None

    def _file(self) -> h5py.File:
        if self._h5 is None:  # opened lazily: h5py handles are not picklable
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def frames(self, movie: str) -> int | None:
        """How many frames a movie has (None: no readable features), without reading them."""
        try:
            if self.is_h5:
                return len(self._file()[movie]) if movie in self._file() else None
            return len(np.load(self.path / f"{movie}.npy", mmap_mode="r"))
        except Exception:  # missing or damaged: the loader reports it
            return None

    def read(self, movie: str) -> np.ndarray:
        if not self.is_h5:
            if not (self.path / f"{movie}.npy").is_file():
                raise Reject("missing_features", f"no {self.path.name}/{movie}.npy")
            return read_array(self.path / f"{movie}.npy")
        if movie not in self._file():
            raise Reject("missing_features", f"{self.path.name} has no dataset {movie!r}")
        try:
            array = self._file()[movie][()]
        except Exception as e:  # a damaged dataset inside the file
            raise Reject("unreadable", f"cannot read {movie!r} from {self.path}: {type(e).__name__}: {e}") from None
        return check_finite(array, f"{self.path.name}[{movie!r}]")


class ADLoader:
    def __init__(self, features: Features, fps: float, dims: dict[str, int], tokenizer: Tokenizer, subtitles: dict):
        self.features, self.fps, self.tokenizer = features, fps, tokenizer
        self.dims = dict(dims)
        self.subtitles = subtitles  # {"kept": n, "dropped": n}: the manifest's own dict, counted as movies load

    def __call__(self, item: Item) -> Sample:
        if isinstance(item.payload, tuple):  # a row without a movie, a repeated id, a movie in no split
            raise Reject(*item.payload)
        movie, inp = item.id, item.payload
        kept = []  # (sid, (text, start, end)) whose row is usable
        for sid, row in inp.ads:
            try:
                kept.append((sid, check_ad(row, inp.duration, self.fps, self.tokenizer if inp.train else None)))
            except Reject as r:
                item.rejected[sid] = Reject(r.kind, f"movie {movie}, AD {sid}: {r.reason}")
        if not kept:
            self._no_ads(item)
        pinned = dict(self.dims)  # a rejected movie must not pin the dims
        try:
            video = self._frames(movie, inp.duration, pinned)
        except Reject as r:  # every AD of the movie goes with it, each named
            for sid, _ in kept:
                item.rejected[sid] = Reject(r.kind, f"movie {movie}, AD {sid}: {r.reason}")
            raise Reject(r.kind, f"movie {movie}: {r.reason}") from None
        duration = inp.duration or len(video) / self.fps
        ads = []
        for sid, (text, start, end) in kept:
            if end > duration:  # known only now when the csv has no movie_duration
                item.rejected[sid] = Reject("bad_window", f"movie {movie}, AD {sid}: timestamps [{start}, {end}] "
                                                          f"outside the movie [0, {duration}]")
            else:
                ads.append({"sid": sid, "text": text, "timestamps": [start, end]})
        if not ads:
            self._no_ads(item)
        ads.sort(key=lambda a: (*a["timestamps"], a["sid"]))
        meta = {"movie": movie, "duration": float(duration), "fps": self.fps, "ads": ads,
                "subtitles": self._subtitles(inp.subtitles, duration)}
        sample = ADMovie(safe_key(movie), meta, video.astype(np.float16))
        problem = ad_movie_problem(sample)  # never write what decode_ad_movie would refuse
        if problem:
            raise Reject("invalid_movie", f"movie {movie}{problem}")
        self.dims = pinned
        return Sample(sample.key, meta, {"video": sample.video})

    @staticmethod
    def _no_ads(item: Item) -> None:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(Counter(r.kind for r in item.rejected.values()).items()))
        raise Reject("no_ads", f"movie {item.id}: all {len(item.parts)} ADs rejected ({kinds})")

    def _frames(self, movie: str, duration: float | None, pinned: dict[str, int]) -> np.ndarray:
        video = self.features.read(movie)
        check_array("video", video, pinned)
        if duration is not None and len(video) < frames_needed(duration, self.fps):
            raise Reject("short_video", f"{len(video)} frames at {self.fps} fps ({len(video) / self.fps:.1f} s) "
                                        f"in {self.features.path.name}, movie_duration is {duration} s")
        return video

    def _subtitles(self, rows: list[dict], duration: float) -> list[dict]:
        subs = [s for r in rows if (s := subtitle(r, duration))]
        self.subtitles["kept"] += len(subs)
        self.subtitles["dropped"] += len(rows) - len(subs)
        return sorted(subs, key=lambda s: s["timestamps"])


def movie_splits(opts: BuildOptions, rows: list[dict]) -> tuple[dict[str, str], str]:
    """movie → split, and where that came from (see the module docstring)."""
    movies = sorted({r["movie"] for r in rows if r["movie"]})
    path = locate(opts, [SPLIT_FILE], (".", "datasets"), "a split file in the release")
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        assign: dict[str, str] = {}
        for key, name in SPLIT_KEYS.items():
            for m in data.get(key, []) if isinstance(data, dict) else []:
                if assign.setdefault(str(m), name) != name:
                    raise ValueError(f"{path}: movie {m} is in both {key} and another split")
        if not assign:
            raise ValueError(f"{path}: expected an object with TRAIN/EVAL lists of movies")
        return assign, f"{path.name} (TRAIN -> train, EVAL -> eval)"
    if rows and rows[0]["split"] is not None:
        values = defaultdict(set)
        for r in rows:
            if r["movie"] and r["split"]:
                values[r["movie"]].add(r["split"])
        mixed = {m: sorted(v) for m, v in values.items() if len(v) > 1}
        if mixed:
            m = next(iter(mixed))
            raise ValueError(f"split column: movie {m} has rows in {mixed[m]} (a movie is in one split)")
        return {m: v.pop() for m, v in values.items()}, "the csv's split column"
    if opts.splits and len(opts.splits) == 1:
        return {m: opts.splits[0] for m in movies}, f"--splits {opts.splits[0]} (every movie)"
    raise ValueError(f"{opts.input}: no {SPLIT_FILE} and no split column; pass --splits NAME to put every movie in one split")


def read_items(rows: list[dict], subtitles: list[dict]) -> tuple[dict[str, MovieInput], list[Item]]:
    """movie → its ADs, duration and subtitles; and the rows that cannot be an AD of any movie (items of their own)."""
    movies: dict[str, MovieInput] = {}
    orphans, seen = [], set()
    for r in rows:
        sid = r["id"] or f"{r['movie']}_{r['row']}"
        if not r["movie"]:
            orphans.append(Item(f"row {r['row']}", ("bad_row", f"row {r['row']}: movie is empty"), parts=None))
        elif sid in seen:
            orphans.append(Item(f"row {r['row']}", ("duplicate_id", f"row {r['row']}: AD id {sid!r} is already taken")))
        else:
            movies.setdefault(r["movie"], MovieInput([])).ads.append((sid, r))
            seen.add(sid)
    for inp in movies.values():
        inp.duration = _movie_duration([row for _, row in inp.ads])
    for s in subtitles:
        if s["movie"] in movies:
            movies[s["movie"]].subtitles.append(s)
    return movies, orphans


def train_texts(movies: dict[str, MovieInput], features: Features, fps: float) -> tuple[list[str], list[str]]:
    """The train split's usable AD texts (what the loader keeps, bar unknown words) and its subtitle texts."""
    ads, subs = [], []
    for movie, inp in movies.items():
        frames = features.frames(movie) if inp.train else None
        if frames is None:
            continue
        duration = inp.duration or frames / fps
        for _, row in inp.ads:
            try:
                ads.append(check_ad(row, duration, fps, None)[0])
            except Reject:
                pass  # the loader reports it
        subs += [s["text"] for r in inp.subtitles if (s := subtitle(r, duration))]
    return ads, subs


def plan(opts: BuildOptions) -> DatasetPlan:
    given = [opts.path(a) for a in opts.annotations or []]
    for path in given:
        if not path.is_file():
            raise FileNotFoundError(f"--annotations: {path} does not exist")
    if len(given) > 2:
        raise ValueError("--annotations: at most two files, the AD csv and the subtitles csv")
    ad_csv = given[0] if given else locate(opts, list(AD_FILES), ANNOTATION_DIRS, "--annotations AD.csv")
    if ad_csv is None:
        raise FileNotFoundError(f"{opts.input}: no {' or '.join(AD_FILES)} (pass --annotations)")
    subs_csv = given[1] if len(given) > 1 else locate(opts, [SUBTITLE_FILE], ANNOTATION_DIRS, "--annotations AD.csv,SUBS.csv")
    if opts.video_features:
        features, dims = Features(find(opts, opts.video_features[0], "features")), {}
    else:
        names = [n + ext for n in FEATURES for ext in ("", ".h5")]
        path = locate(opts, names, (".", "features"), "--video-features")
        if path is None:
            raise FileNotFoundError(f"{opts.input}: no {' or '.join(names)} (pass --video-features)")
        features, dims = Features(path), {"video": FEATURES[path.name.removesuffix(".h5")]}
    fps = opts.fps or FPS
    rows = read_csv(ad_csv, "AD")
    movies, orphans = read_items(rows, read_csv(subs_csv, "subtitles") if subs_csv else [])
    split_of, source = movie_splits(opts, rows)
    for movie, inp in movies.items():
        inp.train = split_of.get(movie) == "train"
    ads, subs = train_texts(movies, features, fps)
    if not ads:
        raise ValueError(f"{ad_csv}: no usable AD of a train movie ({source}) to train the tokenizer on")
    tokenizer = train_tokenizer(ads + subs)
    by_split: dict[str, list[Item]] = defaultdict(list)
    for movie in sorted(movies):
        split = split_of.get(movie, UNASSIGNED)
        payload = movies[movie] if split != UNASSIGNED else ("no_split", f"in no split of {source}")
        by_split[split].append(Item(movie, payload, parts=[sid for sid, _ in movies[movie].ads]))
    by_split[UNASSIGNED] += orphans
    names = sorted((s for s in by_split if s != UNASSIGNED and by_split[s]), key=lambda s: (s != "train", s != "eval", s))
    unknown = [s for s in opts.splits or [] if s not in names and s != UNASSIGNED]
    if unknown:
        raise ValueError(f"--splits: {', '.join(unknown)} not among the splits {', '.join(names)} ({source})")
    wanted = [s for s in opts.splits or names if s != UNASSIGNED]
    wanted += [UNASSIGNED] if by_split[UNASSIGNED] else []  # what fits no split is reported whichever are built
    subtitles = {"kept": 0, "dropped": 0}
    load = ADLoader(features, fps, {**dims, **opts.dims}, tokenizer, subtitles)
    extra = {"tokenizer": TOKENIZER_FILE, "caption_stats": STATS_FILE, "fps": fps, "split_source": source,
             "annotations": ad_csv.name, "subtitles": subtitles}
    files = {TOKENIZER_FILE: tokenizer_bytes(tokenizer), STATS_FILE: json.dumps({"most_frequent": most_frequent(ads)}).encode()}
    return DatasetPlan([SplitInput(s, by_split[s], load) for s in wanted], "captioning_movie", dims, extra,
                       item_unit="movies", files=files)
