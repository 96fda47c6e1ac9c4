"""MNIST-family idx files (Fashion-MNIST, MNIST, KMNIST): read and validate them, and score predictions
against the official labels read straight from the raw idx file (not from shards built from it).

An idx file (http://yann.lecun.com/exdb/mnist/) is a header `00 00 <dtype> <ndim>`, `ndim` big-endian
uint32 dims, then the data, row-major, big-endian. `gzip`-compressed files (`.gz`) are read the same.
Every check that fails raises `IdxError` with one line naming the file and what is wrong.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np

# dtype byte → numpy dtype (big-endian, as the format stores it)
_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

# The 10 Fashion-MNIST classes in label order (zalandoresearch/fashion-mnist README).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# sha256 of the decoded uint8 label arrays of the official Fashion-MNIST files (train 60k, t10k 10k):
# how a build recognises Fashion-MNIST whatever the files are called or however they are compressed.
FASHION_MNIST_LABELS_SHA256 = {
    "train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "t10k": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
# The file-name prefix of a split in the official releases, and the split name a build gives it.
PREFIX_SPLIT = {"train": "train", "t10k": "test"}


class IdxError(ValueError):
    """An idx file that is not what it must be; the message names the file."""


def read_bytes(path: str | Path) -> bytes:
    """The decompressed bytes of `path` (gzip when it starts with gzip's magic, whatever its name)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from None
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise IdxError(f"{path}: truncated gzip stream (the compressed file ends before its end-of-stream marker)") from None
    except (OSError, zlib.error) as e:  # BadGzipFile, CRC or length mismatch, bad deflate data
        raise IdxError(f"{path}: corrupt gzip data ({type(e).__name__}: {e})") from None


def parse(data: bytes, where: str | Path, expect: bytes | None = None, what: str = "") -> np.ndarray:
    """An idx byte string → an array of its declared dtype and dims, native byte order. `expect`: the
    exact magic number required (b"\x00\x00\x08\x03" for images), checked before anything else."""
    if len(data) < 4:
        raise IdxError(f"{where}: {len(data)} bytes, too short for an idx header (4 bytes of magic number)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES or data[3] == 0:
        raise IdxError(f"{where}: bad idx magic number {data[:4].hex(' ')} (expected 00 00 <dtype 08|09|0b|0c|0d|0e> <ndim ≥ 1>)")
    if expect is not None and data[:4] != expect:
        raise IdxError(f"{where}: idx magic number {data[:4].hex(' ')} ({data[3]}-d {_DTYPES[data[2]].name}), "
                       f"expected {expect.hex(' ')} ({what})")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{where}: truncated header: {len(data)} bytes, {ndim} dims need {header}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: a corrupt header cannot overflow this
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else f"{len(data) - expected} bytes of trailing data"
        raise IdxError(f"{where}: {problem}: dims {'x'.join(map(str, dims))} of {dtype.name} need {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Any idx file, raw or gzip."""
    return parse(read_bytes(path), path)


def read_idx_images(path: str | Path) -> np.ndarray:
    """An idx3 image file: (N, H, W) uint8, N, H, W > 0."""
    array = parse(read_bytes(path), path, b"\x00\x00\x08\x03", "N x H x W unsigned-byte images")
    if 0 in array.shape:
        raise IdxError(f"{path}: declares dims {'x'.join(map(str, array.shape))}, no images")
    return array


def read_idx_labels(path: str | Path) -> np.ndarray:
    """An idx1 label file: (N,) uint8."""
    return parse(read_bytes(path), path, b"\x00\x00\x08\x01", "N unsigned-byte labels")


def labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest()


def is_fashion_mnist(prefix: str, labels: np.ndarray) -> bool:
    """Whether `labels` are exactly the official Fashion-MNIST labels of split `prefix` (train, t10k)."""
    return FASHION_MNIST_LABELS_SHA256.get(prefix) == labels_sha256(labels)


def sample_key(prefix: str, index: int) -> str:
    """`t10k-000123`: the file's prefix and the index in the official file order (no dots: WebDataset)."""
    return f"{prefix}-{index:06d}"


def parse_key(key: str, where: str) -> tuple[str, int]:
    prefix, sep, digits = str(key).rpartition("-")
    if not sep or not digits.isdigit() or not prefix:
        raise IdxError(f"{where}: key {key!r} is not <prefix>-<index> like t10k-000123")
    return prefix, int(digits)


def score_against_idx(preds_path: str | Path, labels_path: str | Path) -> dict:
    """Top-1/top-5 accuracy of a predictions JSON Lines file against an official idx label file.

    Each line: {"key": "t10k-000123", "top5": [c1, c2, …] (best first), "scores": […], "label": int}.
    `key`'s index is the position in the label file; its prefix must be the label file's own
    (`t10k` for t10k-labels-idx1-ubyte). `label` — what the run read from its shards — is optional;
    when present it is compared with the official label and disagreements are counted
    (`label_mismatches`: a shard set whose keys do not map to the official order shows up there).
    Returns {"top1", "top5", "n", "n_official", "per_class_top1", "label_mismatches"}; `n` < `n_official`
    when the predictions cover a subset (the embedded sample's 1,000 of the 10,000 t10k images).
    """
    labels = read_idx_labels(labels_path)
    prefix = Path(labels_path).name.split("-")[0]
    seen: set[int] = set()
    top1 = top5 = mismatches = 0
    per_class_n, per_class_hit = np.zeros(256, np.int64), np.zeros(256, np.int64)
    with open(preds_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{preds_path} line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise IdxError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or "key" not in record or "top5" not in record:
                raise IdxError(f"{where}: expected an object with key and top5")
            key_prefix, index = parse_key(record["key"], where)
            if key_prefix != prefix:
                raise IdxError(f"{where}: key {record['key']!r} is not from {Path(labels_path).name} (keys {prefix}-NNNNNN)")
            if index >= len(labels):
                raise IdxError(f"{where}: key {record['key']!r} is past the {len(labels)} labels of {labels_path}")
            if index in seen:
                raise IdxError(f"{where}: key {record['key']!r} is predicted twice")
            seen.add(index)
            classes = record["top5"]
            if not isinstance(classes, list) or not classes or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
                raise IdxError(f"{where}: top5 {json.dumps(classes)} is not a non-empty list of class ids, best first")
            truth = int(labels[index])
            if "label" in record and record["label"] != truth:
                mismatches += 1
            top1 += classes[0] == truth
            top5 += truth in classes[:5]
            per_class_n[truth] += 1
            per_class_hit[truth] += classes[0] == truth
    if not seen:
        raise IdxError(f"{preds_path}: no predictions")
    n = len(seen)
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "n_official": len(labels),
            "per_class_top1": {int(c): float(per_class_hit[c] / per_class_n[c]) for c in np.flatnonzero(per_class_n)},
            "label_mismatches": mismatches}
