"""MNIST-family idx files (Fashion-MNIST, MNIST, KMNIST) → grayscale image samples.

    <root>/train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]     → split `train`
    <root>/t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]      → split `test`

(`train-images.idx3-ubyte`, as some mirrors name them, is read too.) Debian's `dataset-fashion-mnist`
installs this layout under /usr/share/datasets/fashion-mnist/.

A sample's key is the file prefix and the index in the official file order, `train-000123` /
`t10k-000123`, so predictions can be scored against the raw label files (`lamscale.data.idx`).
A sample is `<key>.png` (the H×W grayscale image, lossless) and `<key>.json` {label, split, index,
class_name} — `class_name` only when the labels are the official Fashion-MNIST ones (recognised by
their sha256, whatever the files are called), the manifest lists the class names either way.

Whole-file problems (a bad magic number, truncated or corrupt data, images and labels of different
counts, splits of different image sizes) stop the build with one line naming the file, before
anything is written. A label outside the declared classes (`--num-classes`, default 10) is a
`bad_label` reject in rejects.jsonl. `max_per_class` writes a balanced subset: the first N images of
each class in file order, or with `subset_seed` a seeded random N of each, still in file order.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lamscale.data.builders import BuildOptions, DatasetPlan, Item, Reject, SplitInput
from lamscale.data.idx import (FASHION_MNIST_CLASSES, PREFIX_SPLIT, IdxError, is_fashion_mnist, labels_sha256,
                               read_idx_images, read_idx_labels, sample_key)
from lamscale.data.schema import Sample

SPLIT_PREFIX = {split: prefix for prefix, split in PREFIX_SPLIT.items()}  # test → t10k
DEFAULT_NUM_CLASSES = 10  # every MNIST-family dataset with this layout


def _find(root: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    return None


def find_files(root: Path, prefix: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of a split, None when neither is there; one without the other is an error."""
    images, labels = _find(root, prefix, "images", 3), _find(root, prefix, "labels", 1)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, kind, ndim = (images or labels), ("images" if images is None else "labels"), (3 if images is None else 1)
        raise FileNotFoundError(f"{have}: no matching {prefix}-{kind}-idx{ndim}-ubyte[.gz] in {root}")
    return images, labels


def wanted_splits(opts: BuildOptions) -> list[str]:
    if opts.splits:
        names = [s if s in SPLIT_PREFIX else PREFIX_SPLIT.get(s, s) for s in opts.splits]  # t10k: an alias of test
        unknown = [s for s in names if s not in SPLIT_PREFIX]
        if unknown:
            raise ValueError(f"--splits: {unknown[0]!r} is not an idx split (train, test)")
        return list(dict.fromkeys(names))
    return [s for s in SPLIT_PREFIX if find_files(opts.input, SPLIT_PREFIX[s]) is not None]


def select(labels: np.ndarray, per_class: int | None, num_classes: int, seed: int | None) -> np.ndarray:
    """Indices to write, in file order: all, or at most `per_class` of each class. Labels outside the
    classes stay inputs, so that they are rejected (and listed), not left out unseen."""
    if per_class is None:
        return np.arange(len(labels))
    chosen = [np.flatnonzero(labels >= num_classes)]
    rng = np.random.default_rng(seed) if seed is not None else None
    for c in range(num_classes):
        of_class = np.flatnonzero(labels == c)
        if rng is None:
            chosen.append(of_class[:per_class])
        else:
            chosen.append(rng.choice(of_class, size=min(per_class, len(of_class)), replace=False))
    return np.sort(np.concatenate(chosen))


class IdxLoader:
    def __init__(self, split: str, labels_path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 class_names: tuple[str, ...] | None):
        self.split, self.labels_path, self.images, self.labels = split, labels_path, images, labels
        self.num_classes, self.class_names = num_classes, class_names

    def __call__(self, item: Item) -> Sample:
        index: int = item.payload
        label = int(self.labels[index])
        if label >= self.num_classes:
            raise Reject("bad_label", f"{self.labels_path} item {index}: label {label} is outside the {self.num_classes} "
                                      f"classes 0..{self.num_classes - 1}")
        out = io.BytesIO()
        Image.fromarray(self.images[index], mode="L").save(out, format="PNG")  # lossless: decodes to the same bytes
        meta = {"label": label, "split": self.split, "index": index}
        if self.class_names:
            meta["class_name"] = self.class_names[label]
        return Sample(item.id, meta, files={"png": out.getvalue()})


def _per_class(opts: BuildOptions, split: str) -> int | None:
    if not opts.max_per_class:
        return None
    counts = {PREFIX_SPLIT.get(s, s): n for s, n in opts.max_per_class.items()}  # t10k=100 means test=100
    return counts.get(split, counts.get("*"))


def plan(opts: BuildOptions) -> DatasetPlan:
    num_classes = opts.num_classes or DEFAULT_NUM_CLASSES
    if not 1 <= num_classes <= 256:
        raise ValueError(f"--num-classes: {num_classes} is not in 1..256 (idx labels are bytes)")
    splits = wanted_splits(opts)
    if not splits:
        raise FileNotFoundError(f"{opts.input}: no idx files (expected train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] "
                                f"and/or t10k-images-idx3-ubyte[.gz] + t10k-labels-idx1-ubyte[.gz])")
    unknown = sorted({PREFIX_SPLIT.get(s, s) for s in opts.max_per_class or {}} - {"*", *splits})
    if unknown:
        raise ValueError(f"--max-per-class: split {unknown[0]!r} is not one being built ({', '.join(splits)})")
    data, size, files = {}, None, {}
    for split in splits:
        prefix = SPLIT_PREFIX[split]
        found = find_files(opts.input, prefix)
        if found is None:
            raise FileNotFoundError(f"--splits: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in {opts.input}")
        images_path, labels_path = found
        images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
        if len(images) != len(labels):
            raise IdxError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}")
        if size is not None and images.shape[1:] != size[0]:
            raise IdxError(f"{images_path}: {images.shape[1]}x{images.shape[2]} images, {size[1]} has "
                           f"{size[0][0]}x{size[0][1]}; all splits must have one image size")
        size = size or (images.shape[1:], images_path.name)
        data[split] = (prefix, labels_path, images, labels)
        files[split] = {"images": str(images_path), "labels": str(labels_path), "count": len(labels),
                        "labels_sha256": labels_sha256(labels)}
    fashion = all(is_fashion_mnist(prefix, labels) for prefix, _, _, labels in data.values())
    if fashion and num_classes != len(FASHION_MNIST_CLASSES):
        raise ValueError(f"--num-classes: {num_classes}, but {opts.input} holds Fashion-MNIST, which has {len(FASHION_MNIST_CLASSES)} classes")
    class_names = FASHION_MNIST_CLASSES if fashion else None
    plans, class_counts = [], {}
    for split, (prefix, labels_path, images, labels) in data.items():
        indices = select(labels, _per_class(opts, split), num_classes, opts.subset_seed)
        items = [Item(sample_key(prefix, int(i)), int(i)) for i in indices]
        plans.append(SplitInput(split, items, IdxLoader(split, labels_path, images, labels, num_classes, class_names)))
        class_counts[split] = np.bincount(labels[indices], minlength=num_classes)[:num_classes].tolist()
    extra = {
        "dataset": "fashion-mnist" if fashion else "idx",
        "classes": list(class_names or (str(c) for c in range(num_classes))),
        "num_classes": num_classes,
        "image_size": [int(size[0][0]), int(size[0][1])],  # height, width
        "channels": 1,
        "keys": "<prefix>-<index>: the file prefix (train, t10k) and the 0-based index in the official file order",
        "idx_files": files,
        "subset": None if not opts.max_per_class else {
            "max_per_class": {s: _per_class(opts, s) for s in splits}, "seed": opts.subset_seed,
            "rule": "first N of each class in file order" if opts.subset_seed is None else "seeded random N of each class"},
        "class_counts": class_counts,  # per class, the images chosen (all written: their labels are in range)
    }
    return DatasetPlan(plans, "image", {}, extra)
