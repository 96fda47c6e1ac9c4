"""Build WebDataset shards from an official dataset release (DESIGN.md §3): the common driver.

A format module (qvhighlights, mad, imagefolder, msrvtt, idx) reads a release folder into a `DatasetPlan`:
per split, the list of input items and a `load(item) -> Sample` that raises `Reject` for an input it
cannot turn into a sample. An item may gather several inputs (MAD: a movie and its sentences): then each
input left out is reported on its own, and the item too when it wrote nothing. The driver validates every
array (finite, fits float16, 2-d, the dataset's feature dims), writes the shards, `rejects.jsonl` (every
input not written, with its reason) and finally `manifest.json` — last, so that a manifest means a complete build.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from lamscale import storage
from lamscale.data.schema import IMAGE_EXTENSIONS, SCHEMA_VERSION, Sample, encode_sample, safe_key
from lamscale.data.formats import FORMAT_NAMES
from lamscale.data.writer import ShardWriter, write_manifest
REJECTS_FILE = "rejects.jsonl"


class Reject(Exception):
    """An input that is not written; `kind` groups the report (missing_file, nonfinite, bad_dim, …)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass
class Item:
    id: str  # what the report calls this input: qid, sentence id, image path, video id
    payload: Any = None  # whatever the format's `load` needs
    parts: list[str] | None = None  # the inputs this item gathers (MAD: a movie's sentence ids); None: it is one input
    rejected: dict[str, Reject] = field(default_factory=dict)  # parts `load` left out (part id → why), even if it raises


@dataclass
class SplitInput:
    name: str
    items: list[Item]
    load: Callable[[Item], Sample]


@dataclass
class DatasetPlan:
    splits: list[SplitInput]
    sample_type: str  # moment | image | captioning
    dims: dict[str, int] = field(default_factory=dict)  # expected feature dims; others pinned by the first sample
    extra: dict = field(default_factory=dict)  # format facts for the manifest (classes, fps, …)
    item_unit: str | None = None  # items with parts: what the counts call them ("movies"), counted apart from the inputs
    files: dict[str, bytes] = field(default_factory=dict)  # written beside the manifest (captioning: tokenizer.json)


@dataclass
class BuildOptions:
    input: Path  # the release folder
    out: str  # any fsspec URL
    splits: list[str] | None = None  # None: the format's default splits
    annotations: list[Path] | None = None
    video_features: list[str] | None = None  # folders (or an .h5 file for MAD), relative to input or absolute
    text_features: str | None = None
    audio_features: str | None = None
    dims: dict[str, int] = field(default_factory=dict)  # --video-dim/--text-dim/--audio-dim
    clip_len: float | None = None
    fps: float | None = None
    shard_size: int = 256 * 10**6
    max_per_shard: int | None = None
    overwrite: bool = False
    num_classes: int | None = None  # idx: labels must be below it (default 10)
    max_per_class: dict[str, int] | None = None  # idx: split (or "*" for all) → at most this many images per class
    subset_seed: int | None = None  # idx: pick the max_per_class images at random with this seed (default: the first N)

    def path(self, value: str | Path) -> Path:
        """An input path: absolute as given, else relative to the release folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.input / p


@dataclass
class BuildResult:
    url: str
    manifest: dict
    rejects: list[dict]


def formats() -> dict[str, Callable[[BuildOptions], DatasetPlan]]:
    from lamscale.data.builders import idx, imagefolder, mad, madv2_ad, msrvtt, qvhighlights

    return {"qvhighlights": qvhighlights.plan, "mad": mad.plan, "madv2_ad": madv2_ad.plan, "imagefolder": imagefolder.plan,
            "msrvtt": msrvtt.plan, "idx": idx.plan}


# --- input lookup and validation shared by the formats --------------------------------------------------------------------

def find(opts: BuildOptions, name: str | Path, subdir: str) -> Path:
    """An input file or folder: `name` as given (relative to the release), else inside the release's
    `subdir` (the official layouts keep features in `features/`); it must exist."""
    for candidate in (opts.path(name), opts.input / subdir / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{opts.path(name)} does not exist (looked in {opts.input} and {opts.input / subdir})")


def require(record: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise Reject("missing_field", f"annotation lacks {', '.join(missing)}")


def check_text(record: dict, name: str) -> str:
    """A field that must be non-empty text (a query, a sentence): null, numbers and blanks are rejects."""
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise Reject("bad_field", f"{name} {json.dumps(value)} is not a non-empty string")
    return value


def check_window(window: Any, duration: float, what: str) -> list[float]:
    """[start, end] in seconds with 0 ≤ start < end ≤ duration."""
    ok = isinstance(window, (list, tuple)) and len(window) == 2 and all(isinstance(x, (int, float)) for x in window)
    if not ok or not (0 <= window[0] < window[1] <= duration):
        raise Reject("bad_window", f"{what} {json.dumps(window)} is not [start, end] with 0 <= start < end <= duration {duration}")
    return [window[0], window[1]]


def read_array(path: Path, key: str | None = None) -> np.ndarray:
    """A finite feature array from `.npy`, or `key` of an `.npz`; missing/unreadable files are rejects."""
    if not path.is_file():
        raise Reject("missing_file", f"missing feature file {path}")
    try:
        if key is None:
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz:
                    raise Reject("missing_field", f"{path} has no array {key!r} (has {sorted(npz.files)})")
                array = npz[key]
    except Reject:
        raise
    except Exception as e:  # truncated or not numpy at all
        raise Reject("unreadable", f"cannot read {path}: {type(e).__name__}: {e}") from None
    return check_finite(array, str(path))


def check_finite(array: np.ndarray, where: str) -> np.ndarray:
    """Here, where the file is known, so that the report names it (the driver checks again, unnamed)."""
    if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
        raise Reject("nonfinite", f"{where} holds {int((~np.isfinite(array)).sum())} NaN/Inf values")
    return array


def check_array(name: str, array: np.ndarray, dims: dict[str, int]) -> None:
    """2-d, non-empty, finite in float16, and `dims[name]` wide (pinned here when not yet known)."""
    if array.ndim != 2 or array.shape[0] == 0:
        raise Reject("bad_shape", f"{name} features have shape {array.shape}, expected (T>0, D)")
    if not np.issubdtype(array.dtype, np.number):
        raise Reject("bad_shape", f"{name} features have dtype {array.dtype}")
    finite = np.isfinite(array)
    if not finite.all():
        raise Reject("nonfinite", f"{name} features contain {int((~finite).sum())} NaN/Inf values")
    with np.errstate(over="ignore"):  # the overflow is what we are checking for
        fits = np.isfinite(array.astype(np.float16)).all()
    if not fits:
        raise Reject("float16_overflow", f"{name} features exceed the float16 range (max |x| = {float(np.abs(array).max()):.4g})")
    expected = dims.setdefault(name, int(array.shape[1]))
    if array.shape[1] != expected:
        raise Reject("bad_dim", f"{name} features are {array.shape[1]}-d, expected {expected}-d")


# --- the driver ------------------------------------------------------------------------------------------

def build(format_name: str, opts: BuildOptions) -> BuildResult:
    """Read the release, write shards + rejects.jsonl + manifest.json under `opts.out`."""
    if format_name not in FORMAT_NAMES:
        raise ValueError(f"--format: {format_name!r} is not one of {', '.join(FORMAT_NAMES)}")
    if not opts.input.is_dir():
        raise FileNotFoundError(f"input folder {opts.input} does not exist")
    url = storage.normalize(opts.out)
    plan = formats()[format_name](opts)  # reads the annotations: bad input fails before --out is touched
    old_manifest = _take_over(url, opts.overwrite)
    dims = {**plan.dims, **opts.dims}
    members: list[str] = []
    image_exts: set[str] = set()
    splits, counts, rejects = {}, {}, []
    for split in plan.splits:
        writer = ShardWriter(url, split.name, opts.shard_size, opts.max_per_shard)
        split_rejects, seen, items_rejected = [], set(), 0
        for item in tqdm(split.items, desc=f"{format_name} {split.name}", unit="sample"):
            try:
                raw = _validated(split.load(item), dims, members, seen, image_exts)
            except Reject as r:
                split_rejects += _report(split.name, item, r)
                items_rejected += item.parts is not None
                continue
            split_rejects += _report(split.name, item, None)
            writer.write(raw)
        splits[split.name] = writer.close()
        inputs = sum(1 if item.parts is None else len(item.parts) for item in split.items)
        input_rejects = [r for r in split_rejects if "inputs" not in r]  # not the lines of whole items
        rejected = len(input_rejects)
        written = inputs - rejected if plan.item_unit else splits[split.name]["samples"]
        assert written + rejected == inputs, "every input is either written or rejected"
        counts[split.name] = {"input": inputs, "written": written, "rejected": rejected,
                              "rejected_by_kind": dict(Counter(r["kind"] for r in input_rejects))}
        if plan.item_unit:
            grouped = sum(item.parts is not None for item in split.items)
            counts[split.name][plan.item_unit] = {"input": grouped, "written": grouped - items_rejected, "rejected": items_rejected}
        rejects += split_rejects
    storage.write_bytes(storage.join(url, REJECTS_FILE), "".join(json.dumps(r) + "\n" for r in rejects).encode())
    for name, data in plan.files.items():
        storage.write_bytes(storage.join(url, name), data)
    manifest = {"format": format_name, "dataset": format_name, "sample_type": plan.sample_type, "source": str(opts.input),
                "members": _manifest_members(members, image_exts), "feature_dims": dims, **plan.extra, "splits": splits,
                "counts": counts, "rejects": REJECTS_FILE}
    write_manifest(url, manifest)
    _remove_stale_shards(url, old_manifest, manifest)
    return BuildResult(url, {"schema_version": SCHEMA_VERSION, **manifest}, rejects)


def _report(split: str, item: Item, whole: Reject | None) -> list[dict]:
    """The report lines of an item: itself when it is one input; else each part left out (naming the item),
    plus a line for the item (with its number of inputs) when it was not written at all."""
    if item.parts is None:
        return [] if whole is None else [{"split": split, "id": item.id, "kind": whole.kind, "reason": whole.reason}]
    lines = []
    for part in item.parts:
        r = item.rejected.get(part) or (whole and Reject(whole.kind, f"{item.id}: {whole.reason}"))
        if r:
            lines.append({"split": split, "id": part, "item": item.id, "kind": r.kind, "reason": r.reason})
    if whole is not None:
        lines.append({"split": split, "id": item.id, "kind": whole.kind, "reason": whole.reason, "inputs": len(item.parts)})
    return lines


_IMAGE = "<image>"  # the one member slot an image takes, whichever format it keeps


def _validated(sample: Sample, dims: dict[str, int], members: list[str], seen: set[str], image_exts: set[str]) -> dict:
    pinned = dict(dims)  # a rejected sample must not pin the dims
    for name, array in sample.arrays.items():
        check_array(name, array, pinned)
    if sample.key != safe_key(sample.key):  # a dot would split the key from its extension when read back
        raise Reject("bad_key", f"sample key {sample.key!r} has characters other than letters, digits, _ and -")
    if sample.key in seen:
        raise Reject("duplicate_key", f"sample key {sample.key!r} is already taken by an earlier input")
    raw = encode_sample(sample)
    names = sorted(k for k in raw if not k.startswith("__"))
    slots = sorted(_IMAGE if n in IMAGE_EXTENSIONS else n for n in names)
    if not members:
        members += slots  # the first sample fixes the members every sample must have
    elif slots != members:
        raise Reject("inconsistent_members", f"sample has members {names}, the dataset has {_manifest_members(members, image_exts)}")
    seen.add(sample.key)
    image_exts.update(n for n in names if n in IMAGE_EXTENSIONS)
    dims.update(pinned)
    return raw


def _manifest_members(slots: list[str], image_exts: set[str]) -> list[str]:
    """The image slot as the formats written, WebDataset-style alternatives: `jpg`, `png` or `jpg;png`."""
    return sorted(";".join(sorted(image_exts)) if s == _IMAGE else s for s in slots)


def _take_over(url: str, overwrite: bool) -> dict | None:
    """Refuse to mix two builds in one place, unless asked; then drop the old manifest first, so a
    build that dies half-way never leaves a manifest describing shards it has overwritten."""
    manifest_url = storage.join(url, "manifest.json")
    if not storage.exists(manifest_url):
        return None
    if not overwrite:
        raise ValueError(f"--out: {manifest_url} already exists; pass --overwrite to replace that dataset")
    old = json.loads(storage.read_bytes(manifest_url))
    storage.remove_file(manifest_url)
    return old


def _remove_stale_shards(url: str, old: dict | None, new: dict) -> None:
    if not old:
        return
    keep = {s["name"] for split in new["splits"].values() for s in split["shards"]}
    for split in old.get("splits", {}).values():
        for shard in split.get("shards", []):
            if shard["name"] not in keep:
                storage.remove_file(storage.join(url, shard["name"]), missing_ok=True)
