"""`lamscale shards build --format idx`: idx files written here byte by byte with struct (the format's
own layout, not our reader), read back from the shards exactly; each kind of broken file stopped with
one line naming it; labels outside the classes in rejects.jsonl; predictions scored against a raw
label file; and the committed Fashion-MNIST sample checked against Debian's official files."""
import gzip
import hashlib
import io
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lamscale import cli
from lamscale.data.idx import IdxError, score_against_idx
from lamscale.data.schema import decode_sample
from lamscale.data.verify import tar_samples, verify

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "shards" / "fashion_mnist_sample"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# hand-picked labels: first two of each class in train are indices 3,7 (0) 1,4 (1) 6,9 (2) 0,2 (3)
TRAIN_LABELS = [3, 1, 3, 0, 1, 3, 2, 0, 1, 2, 3, 0]
TEST_LABELS = [9, 2, 2, 5, 9, 0]
H, W = 5, 4  # not square: a swapped height/width shows


def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    """The idx layout by hand: 00 00 08 <ndim>, big-endian uint32 dims, the bytes."""
    head = magic if magic is not None else struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return head + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_release(root: Path, train_labels=TRAIN_LABELS, test_labels=TEST_LABELS) -> dict:
    """train-* gzip-compressed, t10k-* raw: both are read."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, labels, gz in (("train", train_labels, True), ("t10k", test_labels, False)):
        images = rng.integers(0, 256, size=(len(labels), H, W), dtype=np.uint8)
        suffix = ".gz" if gz else ""
        for kind, array in (("images-idx3", images), ("labels-idx1", np.array(labels, np.uint8))):
            raw = idx_bytes(array)
            (root / f"{prefix}-{kind}-ubyte{suffix}").write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        data[prefix] = (images, list(labels))
    return data


def build(capsys, *args):
    code = cli.main(["shards", "build", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_back(url) -> tuple[dict, dict]:
    manifest = json.loads((Path(url) / "manifest.json").read_bytes())
    samples = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for raw in tar_samples((Path(url) / shard["name"]).read_bytes()):
                samples[raw["__key__"]] = (split, decode_sample(raw))
    return manifest, samples


def pixels(sample) -> np.ndarray:
    with Image.open(io.BytesIO(sample.files["png"])) as image:
        assert image.mode == "L"
        return np.array(image)


def test_round_trip_keys_in_official_order(tmp_path, capsys):
    data = write_release(tmp_path / "release")
    out = tmp_path / "shards"
    code, stdout, _ = build(capsys, tmp_path / "release", "--format", "idx", "--out", out, "--max-per-shard", "5")
    assert code == 0, stdout
    manifest, samples = read_back(out)
    assert set(samples) == {f"train-{i:06d}" for i in range(12)} | {f"t10k-{i:06d}" for i in range(6)}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images, labels = data[prefix]
        for i, label in enumerate(labels):
            got_split, sample = samples[f"{prefix}-{i:06d}"]
            assert got_split == split
            assert sample.meta == {"label": label, "split": split, "index": i}  # not Fashion-MNIST: no class_name
            np.testing.assert_array_equal(pixels(sample), images[i])  # lossless, height x width kept
    assert manifest["dataset"] == "idx" and manifest["sample_type"] == "image" and manifest["members"] == ["json", "png"]
    assert manifest["image_size"] == [H, W] and manifest["channels"] == 1
    assert manifest["num_classes"] == 10 and manifest["classes"] == [str(c) for c in range(10)]
    assert manifest["counts"]["train"] == {"input": 12, "written": 12, "rejected": 0, "rejected_by_kind": {}}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [5, 5, 2]
    assert manifest["class_counts"]["test"] == [1, 0, 2, 0, 0, 1, 0, 0, 0, 2]
    assert verify(str(out)).problems == []


def test_balanced_subset_first_n_per_class(tmp_path, capsys):
    write_release(tmp_path / "release")
    out = tmp_path / "first"
    code, _, _ = build(capsys, tmp_path / "release", "--format", "idx", "--out", out, "--max-per-class", "train=2,t10k=1")
    assert code == 0
    manifest, samples = read_back(out)
    # train: the first two of classes 0-3 (hand-picked above); test: the first 9, 2, 5 and 0 are items 0, 1, 3, 5
    assert sorted(samples) == [f"t10k-{i:06d}" for i in (0, 1, 3, 5)] + [f"train-{i:06d}" for i in (0, 1, 2, 3, 4, 6, 7, 9)]
    assert manifest["subset"]["max_per_class"] == {"train": 2, "test": 1} and manifest["subset"]["seed"] is None
    assert manifest["class_counts"]["train"] == [2, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    # a seeded pick: balanced, the same twice, in file order
    keys = []
    for name in ("seeded_a", "seeded_b"):
        code, _, _ = build(capsys, tmp_path / "release", "--format", "idx", "--out", tmp_path / name,
                           "--max-per-class", "1", "--subset-seed", "7", "--splits", "train")
        assert code == 0
        _, back = read_back(tmp_path / name)
        keys.append(list(back))
        assert sorted(s.meta["label"] for _, s in back.values()) == [0, 1, 2, 3]
    assert keys[0] == keys[1] == sorted(keys[0])


def test_label_outside_classes_is_a_listed_reject(tmp_path, capsys):
    write_release(tmp_path / "release", train_labels=[0, 10, 1, 255, 1], test_labels=[0, 1])
    out = tmp_path / "shards"
    code, stdout, _ = build(capsys, tmp_path / "release", "--format", "idx", "--out", out, "--max-per-class", "1")
    assert code == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    labels_file = tmp_path / "release" / "train-labels-idx1-ubyte.gz"
    assert rejects == [  # kept as inputs by the subset too: rejected and listed, never silently left out
        {"split": "train", "id": "train-000001", "kind": "bad_label",
         "reason": f"{labels_file} item 1: label 10 is outside the 10 classes 0..9"},
        {"split": "train", "id": "train-000003", "kind": "bad_label",
         "reason": f"{labels_file} item 3: label 255 is outside the 10 classes 0..9"}]
    manifest, samples = read_back(out)
    assert sorted(samples) == ["t10k-000000", "t10k-000001", "train-000000", "train-000002"]
    assert manifest["counts"]["train"] == {"input": 4, "written": 2, "rejected": 2, "rejected_by_kind": {"bad_label": 2}}
    assert "train-000001: bad_label" in stdout
    # with more classes declared, the same labels are written
    code, _, _ = build(capsys, tmp_path / "release", "--format", "idx", "--out", tmp_path / "wide", "--num-classes", "256")
    assert code == 0 and len(read_back(tmp_path / "wide")[1]) == 7


def _bad_magic(root):
    path = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2:4] = b"\x08\x01"  # a label file's magic in the image file's place
    path.write_bytes(gzip.compress(bytes(raw)))
    return path, "idx magic number 00 00 08 01 (1-d uint8), expected 00 00 08 03 (N x H x W unsigned-byte images)"


def _not_idx(root):
    path = root / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x1f\x00\x08\x01" + path.read_bytes()[4:])
    return path, "bad idx magic number 1f 00 08 01"


def _truncated_raw(root):
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    return path, f"truncated: dims 6x{H}x{W} of uint8 need {16 + 6 * H * W} bytes, the file has {16 + 6 * H * W - 7}"


def _truncated_gzip(root):
    path = root / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated gzip stream"


def _count_mismatch(root):
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.array(TRAIN_LABELS[:-1], np.uint8))))
    return path, "11 labels for the 12 images of train-images-idx3-ubyte.gz"


def _trailing(root):
    path = root / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    return path, "2 bytes of trailing data"


@pytest.mark.parametrize("damage", [_bad_magic, _not_idx, _truncated_raw, _truncated_gzip, _count_mismatch, _trailing],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_idx_file_is_one_line_and_writes_nothing(tmp_path, capsys, damage):
    write_release(tmp_path / "release")
    path, what = damage(tmp_path / "release")
    out = tmp_path / "shards"
    code, stdout, stderr = build(capsys, tmp_path / "release", "--format", "idx", "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"lamscale: error: {path}: ") and what in stderr, stderr
    assert not out.exists()  # checked before --out is touched: no shard of any split


@pytest.mark.parametrize("args, message", [
    (["--format", "imagefolder", "--max-per-class", "5"], "--max-per-class: only --format idx takes it"),
    (["--format", "idx", "--max-per-class", "train=0"], "--max-per-class: 'train=0' is not a positive count"),
    (["--format", "idx", "--max-per-class", "val=3"], "--max-per-class: split 'val' is not one being built"),
    (["--format", "idx", "--subset-seed", "1"], "--subset-seed 1: it picks the --max-per-class subset"),
    (["--format", "idx", "--num-classes", "300"], "--num-classes: 300 is not in 1..256"),
    (["--format", "idx", "--splits", "val"], "--splits: 'val' is not an idx split (train, test)"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, message):
    write_release(tmp_path / "release")
    code, _, stderr = build(capsys, tmp_path / "release", "--out", tmp_path / "shards", *args)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith(f"lamscale: error: {message}"), stderr


def test_score_against_raw_labels(tmp_path):
    labels = [(7 * i) % 10 for i in range(30)]
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(np.array(labels, np.uint8)))
    lines = []
    for i, y in enumerate(labels):
        wrong = (y + 1) % 10
        if i % 3:  # right: 20 of 30
            top5 = [y, wrong]
        elif i % 6 == 0:  # wrong first, truth third: 5 more in the top 5
            top5 = [wrong, (y + 2) % 10, y]
        else:  # wrong and not in the top 5
            top5 = [(y + k) % 10 for k in range(1, 6)]
        label = y if i != 4 else wrong  # one line claims a label the official file does not have
        lines.append(json.dumps({"key": f"t10k-{i:06d}", "label": label, "top5": top5, "scores": [0.5] * len(top5)}))
    preds = tmp_path / "predictions_test.jsonl"
    preds.write_text("\n".join(lines) + "\n")
    result = score_against_idx(preds, labels_path)
    assert result["top1"] == pytest.approx(20 / 30) and result["top5"] == pytest.approx(25 / 30)
    assert result["n"] == 30 and result["n_official"] == 30 and result["label_mismatches"] == 1
    # class 0 holds i = 0, 10, 20: i=0 wrong (i%3 == 0), the others right
    assert result["per_class_top1"][0] == pytest.approx(2 / 3)
    for bad, message in ((lines[0].replace("t10k-000000", "train-000000"), "is not from t10k-labels-idx1-ubyte"),
                         (lines[0].replace("t10k-000000", "t10k-000030"), "is past the 30 labels"),
                         (lines[1].replace("t10k-000001", "t10k-000000"), "is predicted twice"),
                         (lines[0].replace('"top5": [', '"top5": ["a", '), "is not a non-empty list of class ids")):
        preds.write_text(lines[0] + "\n" + bad + "\n" if "twice" in message else bad + "\n")
        with pytest.raises(IdxError, match=message):
            score_against_idx(preds, labels_path)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist")
def test_committed_sample_matches_debian_fashion_mnist(tmp_path):
    from lamscale.data.idx import read_idx_images, read_idx_labels

    manifest, samples = read_back(SAMPLE)
    assert manifest["dataset"] == "fashion-mnist" and manifest["classes"] == list(FASHION)
    assert manifest["image_size"] == [28, 28] and manifest["channels"] == 1 and manifest["num_classes"] == 10
    per_split = {"train": ("train", 600), "test": ("t10k", 100)}
    for split, (prefix, per_class) in per_split.items():
        labels = read_idx_labels(DEBIAN / f"{prefix}-labels-idx1-ubyte.gz")
        images = read_idx_images(DEBIAN / f"{prefix}-images-idx3-ubyte.gz")
        ours = {k: s for k, (sp, s) in samples.items() if sp == split}
        # the first `per_class` of each class in the official order, and nothing else
        expected = sorted(f"{prefix}-{i:06d}" for c in range(10) for i in np.flatnonzero(labels == c)[:per_class])
        assert sorted(ours) == expected
        assert Counter(s.meta["label"] for s in ours.values()) == {c: per_class for c in range(10)}
        keys = sorted(ours)
        index = np.array([int(k.split("-")[1]) for k in keys])
        assert [ours[k].meta for k in keys] == [{"label": int(labels[i]), "split": split, "index": int(i),
                                                 "class_name": FASHION[labels[i]]} for i in index]
        np.testing.assert_array_equal(np.stack([pixels(ours[k]) for k in keys]), images[index])  # lossless, in key order
    # facts about the official files, known independently of this code (the first image of each is an ankle boot)
    assert samples["t10k-000000"][1].meta["class_name"] == samples["train-000000"][1].meta["class_name"] == "Ankle boot"
    assert samples["train-000001"][1].meta["label"] == 0
    # predictions keyed by the sample's keys score 100 % against the raw t10k labels, and shifted keys do not
    preds = tmp_path / "preds.jsonl"
    test_keys = sorted(k for k, (sp, _) in samples.items() if sp == "test")
    preds.write_text("".join(json.dumps({"key": k, "top5": [samples[k][1].meta["label"]]}) + "\n" for k in test_keys))
    assert score_against_idx(preds, DEBIAN / "t10k-labels-idx1-ubyte.gz")["top1"] == 1.0
    shifted = "".join(json.dumps({"key": f"t10k-{int(k[5:]) + 1:06d}", "top5": [samples[k][1].meta["label"]]}) + "\n"
                      for k in test_keys)
    preds.write_text(shifted)
    assert score_against_idx(preds, DEBIAN / "t10k-labels-idx1-ubyte.gz")["top1"] < 0.5
    # the committed shards are the ones the manifest describes (a full `verify` decodes everything again: slow)
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            assert hashlib.sha256((SAMPLE / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
