"""ImageNet-style class folders → image samples.

    <root>/{train,val,test}/<class_name>/*.JPEG|jpg|png     (or <root>/<class_name>/… as one split, train)

A class's label is its index among the sorted class names of all splits, so that every split agrees.
A sample is the image's original bytes under the member its real format names (`<key>.jpg` for JPEG,
`<key>.png` for PNG, whatever the file's extension; any other format Pillow reads is re-encoded to PNG,
losslessly, and its json says `reencoded_from`) and `<key>.json` {label, class, path, width, height}.
A dataset mixing JPEG and PNG lists the image member as `jpg;png` in its manifest, as WebDataset's
`to_tuple("jpg;png", "json")` reads it. Every file under a split is an input: one that is
not a decodable image is a reject, not skipped.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lamscale.data.builders import BuildOptions, DatasetPlan, Item, Reject, SplitInput
from lamscale.data.schema import IMAGE_EXTENSIONS, IMAGE_MEMBER, Sample, safe_key

SPLITS = ("train", "val", "test")
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")  # the rest (CMYK, YCbCr, F…) go through RGB(A)


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
        if not data:
            raise Reject("unreadable_image", f"{path}: empty file")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:  # its message names the BytesIO, not the file
            raise Reject("unreadable_image", f"{path}: not an image Pillow can read (first bytes {data[:8].hex(' ')})") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError… for bad headers
            raise Reject("unreadable_image", f"{path}: cannot read its image header ({type(e).__name__}: {e})") from None
        with image:
            try:
                image.load()  # decodes every pixel: a truncated file fails here, not in training
            except Exception as e:
                raise Reject("unreadable_image", f"{path}: cannot decode its {image.format} data ({type(e).__name__}: {e})") from None
            size, image_format = image.size, image.format
            ext = IMAGE_MEMBER.get(image_format)
            meta_extra = {}
            if ext is None:  # another format under an image extension: stored losslessly as PNG, and said so
                out = io.BytesIO()
                png_ready = image if image.mode in _PNG_MODES else image.convert("RGBA" if "A" in image.mode else "RGB")
                png_ready.save(out, format="PNG")
                data, ext, meta_extra = out.getvalue(), "png", {"reencoded_from": image_format}
        rel = path.relative_to(self.split_dir)
        class_name = rel.parts[0]
        meta = {"label": self.label[class_name], "class": class_name, "path": str(rel), "width": size[0], "height": size[1],
                **meta_extra}
        return Sample(safe_key(str(rel.with_suffix(""))), meta, files={ext: data})


def plan(opts: BuildOptions) -> DatasetPlan:
    dirs = split_dirs(opts)
    classes = sorted({d.name for split_dir in dirs.values() for d in split_dir.iterdir() if d.is_dir()})
    if not classes:
        raise FileNotFoundError(f"{opts.input}: no class folders (expected <root>/<split>/<class>/*.jpg)")
    splits = [SplitInput(name, read_items(d), ImageLoader(d, classes)) for name, d in dirs.items()]
    return DatasetPlan(splits, "image", {}, {"classes": classes, "num_classes": len(classes)})
