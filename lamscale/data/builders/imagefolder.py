"""ImageNet-style class folders → image samples.

    <root>/{train,val,test}/<class_name>/*.JPEG|jpg|png     (or <root>/<class_name>/… as one split, train)

A class's label is its index among the sorted class names of all splits, so that every split agrees.
A sample is `<key>.jpg` — the original bytes when the file is a JPEG, else re-encoded — and
`<key>.json` {label, class, path, width, height}. Every file under a split is an input: one that is
not a decodable image is a reject, not skipped.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from lamscale.data.builders import BuildOptions, DatasetPlan, Item, Reject, SplitInput
from lamscale.data.schema import IMAGE_EXTENSIONS, Sample, safe_key

SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95  # re-encoding only for non-JPEG inputs (PNG); high enough to be visually lossless


def split_dirs(opts: BuildOptions) -> dict[str, Path]:
    if opts.splits:
        missing = [s for s in opts.splits if not (opts.input / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"--splits: no folder {opts.input / missing[0]}")
        return {s: opts.input / s for s in opts.splits}
    found = {s: opts.input / s for s in SPLITS if (opts.input / s).is_dir()}
    return found or {"train": opts.input}


def read_items(split_dir: Path) -> list[Item]:
    """Every file below the split folder; those not inside a class folder are rejected inputs."""
    items = []
    for path in sorted(p for p in split_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(split_dir)
        if len(rel.parts) < 2:
            items.append(Item(str(rel), f"{path} is not inside a class folder"))
        else:
            items.append(Item(str(rel), path))
    return items


class ImageLoader:
    def __init__(self, split_dir: Path, classes: list[str]):
        self.split_dir, self.label = split_dir, {name: i for i, name in enumerate(classes)}

    def __call__(self, item: Item) -> Sample:
        if isinstance(item.payload, str):
            raise Reject("not_in_class_folder", item.payload)
        path: Path = item.payload
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            raise Reject("not_an_image", f"{path}: extension {path.suffix or '(none)'!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel: a truncated file fails here, not in training
                size, image_format = image.size, image.format
                if image_format != "JPEG":
                    out = io.BytesIO()
                    image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
                    data = out.getvalue()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError… for bad files
            raise Reject("unreadable_image", f"cannot decode {path}: {type(e).__name__}: {e}") from None
        rel = path.relative_to(self.split_dir)
        class_name = rel.parts[0]
        meta = {"label": self.label[class_name], "class": class_name, "path": str(rel), "width": size[0], "height": size[1]}
        return Sample(safe_key(str(rel.with_suffix(""))), meta, files={"jpg": data})


def plan(opts: BuildOptions) -> DatasetPlan:
    dirs = split_dirs(opts)
    classes = sorted({d.name for split_dir in dirs.values() for d in split_dir.iterdir() if d.is_dir()})
    if not classes:
        raise FileNotFoundError(f"{opts.input}: no class folders (expected <root>/<split>/<class>/*.jpg)")
    splits = [SplitInput(name, read_items(d), ImageLoader(d, classes)) for name, d in dirs.items()]
    return DatasetPlan(splits, "image", {}, {"classes": classes, "num_classes": len(classes)})
