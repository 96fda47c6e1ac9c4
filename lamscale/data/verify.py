"""Check a built dataset against its manifest (`lamscale shards verify`) and describe it (`… stats`).

verify: every shard listed in manifest.json exists, has the recorded size and sha256, and every
sample in it decodes (json, float16 2-d arrays of the manifest's feature dims, finite, images that
Pillow decodes) with exactly the manifest's members. Each problem is one line naming shard and key.
stats: per split sample/shard/reject counts, bytes per member, a sequence-length histogram per array.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import statistics
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from lamscale import storage
from lamscale.data.schema import IMAGE_EXTENSIONS, IMAGE_MEMBER, load_npy, members_match


def load_manifest(url: str) -> dict:
    manifest_url = storage.join(storage.normalize(url), "manifest.json")
    if not storage.exists(manifest_url):
        raise FileNotFoundError(f"{manifest_url} does not exist (build the dataset with `lamscale shards build`)")
    try:
        manifest = json.loads(storage.read_bytes(manifest_url))
    except ValueError as e:
        raise ValueError(f"{manifest_url}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{manifest_url}: no 'splits' object")
    return manifest


def shard_entries(url: str, manifest: dict) -> Iterator[tuple[str, str, dict]]:
    """(split, shard URL, manifest entry) for every shard the manifest lists."""
    for split, info in manifest["splits"].items():
        for shard in info.get("shards", []):
            yield split, storage.join(storage.normalize(url), shard["name"]), shard


def tar_samples(data: bytes) -> Iterator[dict]:
    """The raw samples of a tar held in memory (`__key__` + bytes per extension), grouped the way
    WebDataset groups consecutive members that share a key."""
    current: dict | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                raise tarfile.TarError(f"member {member.name!r} has no <key>.<extension> name")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def sample_problems(raw: dict, members: list[str], dims: dict[str, int]) -> list[str]:
    """Why this raw sample does not decode to what the manifest promises; empty when it does."""
    exts = sorted(k for k in raw if not k.startswith("__"))
    problems = []
    if members and not members_match(exts, members):
        problems.append(f"members {exts}, manifest says {members}")
    for ext in exts:
        try:
            if ext == "json":
                if not isinstance(json.loads(raw[ext]), dict):
                    problems.append("json is not an object")
            elif ext.endswith(".npy"):
                problems += _array_problems(ext, load_npy(raw[ext]), dims.get(ext[: -len(".npy")]))
            elif ext in IMAGE_EXTENSIONS:
                with Image.open(io.BytesIO(raw[ext])) as image:
                    image.load()
                    if IMAGE_MEMBER.get(image.format) != ext.replace("jpeg", "jpg"):
                        problems.append(f"{ext} member holds a {image.format} image")
        except Exception as e:  # any corruption: report it, keep checking the rest
            problems.append(f"cannot decode {ext} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return problems


def _array_problems(ext: str, array: np.ndarray, dim: int | None) -> list[str]:
    if array.ndim != 2 or array.dtype != np.float16:
        return [f"{ext} is {array.dtype} {array.shape}, expected float16 T×D"]
    if dim is not None and array.shape[1] != dim:
        return [f"{ext} is {array.shape[1]}-d, manifest says {dim}"]
    if not np.isfinite(array).all():
        return [f"{ext} holds NaN/Inf"]
    return []


@dataclass
class VerifyReport:
    url: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify(url: str) -> VerifyReport:
    manifest = load_manifest(url)
    report = VerifyReport(storage.normalize(url))
    members, dims = manifest.get("members", []), manifest.get("feature_dims", {})
    entries = list(shard_entries(url, manifest))
    for _, shard_url, entry in tqdm(entries, desc="verify", unit="shard"):
        report.shards += 1
        if not storage.exists(shard_url):
            report.problems.append(f"{shard_url}: missing (listed in manifest.json)")
            continue
        data = storage.read_bytes(shard_url)
        report.bytes += len(data)
        if len(data) != entry["bytes"]:
            report.problems.append(f"{shard_url}: {len(data)} bytes, manifest says {entry['bytes']}")
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry["sha256"]:
            report.problems.append(f"{shard_url}: sha256 mismatch (manifest {entry['sha256'][:16]}…, file {sha[:16]}…)")
        count = 0
        try:
            for raw in tar_samples(data):  # decode even after a sha mismatch: it points at the bad sample
                count += 1
                problems = sample_problems(raw, members, dims)
                if problems:
                    report.problems.append(f"{shard_url}: sample {raw['__key__']!r}: {'; '.join(problems)}")
        except (tarfile.TarError, EOFError) as e:
            report.problems.append(f"{shard_url}: not a readable tar after {count} samples ({type(e).__name__}: {e})")
        report.samples += count
        if count != entry["samples"]:
            report.problems.append(f"{shard_url}: {count} samples, manifest says {entry['samples']}")
    return report


# --- stats -----------------------------------------------------------------------------------------------

def _npy_shape(data: bytes) -> tuple[int, ...]:
    """An .npy member's shape from its header alone."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)[0]


def stats(url: str) -> dict:
    """Per split: shards, samples, rejects, bytes per member, sequence lengths per array, labels, captions."""
    manifest = load_manifest(url)
    counts = manifest.get("counts", {})
    splits: dict[str, dict] = {}
    for split, info in manifest["splits"].items():
        splits[split] = {"shards": len(info.get("shards", [])), "samples": 0, "bytes": 0,
                         "rejected": counts.get(split, {}).get("rejected", 0), "member_bytes": Counter(),
                         "lengths": defaultdict(list), "labels": Counter(), "captions": []}
    for split, shard_url, _ in tqdm(list(shard_entries(url, manifest)), desc="stats", unit="shard"):
        s = splits[split]
        data = storage.read_bytes(shard_url)
        s["bytes"] += len(data)
        for raw in tar_samples(data):
            s["samples"] += 1
            for ext, value in raw.items():
                if ext.startswith("__"):
                    continue
                s["member_bytes"][ext] += len(value)
                if ext.endswith(".npy"):
                    s["lengths"][ext[: -len(".npy")]].append(int(_npy_shape(value)[0]))
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if "label" in meta:
                s["labels"][meta["label"]] += 1
            if isinstance(meta.get("captions"), list):
                s["captions"].append(len(meta["captions"]))
    return {"url": storage.normalize(url), "format": manifest.get("format", manifest.get("dataset", "?")),
            "schema_version": manifest.get("schema_version"), "feature_dims": manifest.get("feature_dims", {}),
            "splits": {name: {**s, "member_bytes": dict(s["member_bytes"]), "lengths": dict(s["lengths"]),
                              "labels": dict(s["labels"])} for name, s in splits.items()}}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def length_histogram(lengths: list[int], width: int = 40) -> list[str]:
    """Rows `[lo, hi)  count  bar` over power-of-two bins from the shortest to the longest sequence."""
    lo, hi = int(math.log2(max(1, min(lengths)))), int(math.log2(max(1, max(lengths)))) + 1
    edges = [2**k for k in range(lo, hi + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  [{a:>7}, {b:>7})  {c:>8}  {'#' * math.ceil(width * c / top) if c else ''}" for a, b, c in zip(edges, edges[1:], counts)]


def format_stats(st: dict) -> str:
    lines = [f"{st['url']}: format {st['format']}, schema {st['schema_version']}, feature dims {st['feature_dims'] or '-'}",
             f"{'split':<10} {'shards':>7} {'samples':>9} {'rejected':>9} {'bytes':>10} {'bytes/sample':>13}"]
    for name, s in st["splits"].items():
        per = human_bytes(s["bytes"] / s["samples"]) if s["samples"] else "-"
        lines.append(f"{name:<10} {s['shards']:>7} {s['samples']:>9} {s['rejected']:>9} {human_bytes(s['bytes']):>10} {per:>13}")
    for name, s in st["splits"].items():
        if s["member_bytes"]:
            total = sum(s["member_bytes"].values())
            parts = ", ".join(f"{ext} {human_bytes(b)} ({100 * b / total:.0f}%)" for ext, b in sorted(s["member_bytes"].items()))
            lines.append(f"\n{name} members: {parts}")
        if s["labels"]:
            per_class = s["labels"].values()
            lines.append(f"{name} labels: {len(s['labels'])} classes, {min(per_class)}–{max(per_class)} samples per class")
        if s["captions"]:
            lines.append(f"{name} captions: {sum(s['captions'])} ({statistics.mean(s['captions']):.1f} per sample)")
        for array, lengths in s["lengths"].items():
            lines.append(f"{name} {array} length: min {min(lengths)}, median {statistics.median(lengths):g}, "
                         f"mean {statistics.mean(lengths):.1f}, max {max(lengths)}")
            lines += length_histogram(lengths)
    return "\n".join(lines)


def plot_lengths(st: dict, png_path: str) -> None:
    """One length histogram per (split, array) into a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [(f"{split} {array}", lengths) for split, s in st["splits"].items() for array, lengths in s["lengths"].items()]
    if not panels:
        raise ValueError(f"--png: {st['url']} has no sequence arrays to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), squeeze=False)
    for ax, (title, lengths) in zip(axes[:, 0], panels):
        ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))))
        ax.set_title(title)
        ax.set_xlabel("length (rows)")
        ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
