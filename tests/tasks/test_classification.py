"""Image classification: decoding checks, the training draw, hand-computed metrics, and predictions keyed
in the official t10k order scored against the raw idx labels."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lamscale.config import load_config
from lamscale.data.schema import SampleError
from lamscale.tasks import get_task, task_names
from lamscale.tasks.classification import ImageOps, classification_metrics

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _raw(array: np.ndarray, label) -> dict:
    return {"__key__": "t10k-000007", "__url__": "s/test-000000.tar", "png": _png(array), "json": json.dumps({"label": label}).encode()}


def test_registry_knows_both_tasks():
    assert {"classification", "moment_retrieval"} <= set(task_names())


def test_decode_refuses_wrong_size_channels_and_labels_in_one_line():
    ops = ImageOps(image_size=28, channels=1, num_classes=10)
    sample = ops.decode(_raw(np.full((28, 28), 7, np.uint8), 3))
    assert sample.image.shape == (28, 28, 1) and sample.meta["label"] == 3
    cases = [(_raw(np.zeros((32, 28), np.uint8), 1), r"s/test-000000.tar: sample 't10k-000007': image is 28×32, task.image_size=28"),
             (_raw(np.zeros((28, 28, 3), np.uint8), 1), r"image mode RGB \(3 channels\), task.channels=1"),
             (_raw(np.zeros((28, 28), np.uint8), 10), r"label 10 is not a class in 0..9"),
             (_raw(np.zeros((28, 28), np.uint8), "3"), r"label '3' is not a class"),
             ({**_raw(np.zeros((28, 28), np.uint8), 1), "png": b"not a png"}, r"cannot decode png")]
    for raw, message in cases:
        with pytest.raises(SampleError, match=message):
            ops.decode(raw)


def test_training_draw_is_a_padded_crop_or_flip_and_seeded():
    ops = ImageOps(image_size=4, channels=1, num_classes=2, crop_padding=1, hflip=True)
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) + 1
    sample = ImageOps(4, 1, 2).decode({**_raw(image[..., 0], 0)})
    draws = [ops.prepare(sample, random.Random(f"draw-{i}"), "x")[0].image[..., 0] for i in range(40)]
    assert all(np.array_equal(d, ops.prepare(sample, random.Random(f"draw-{i}"), "x")[0].image[..., 0]) for i, d in enumerate(draws))
    for d in draws:  # every draw is the image shifted by at most one pixel (zeros enter), maybe mirrored
        assert any(np.array_equal(d[max(0, -dy):4 - max(0, dy), max(0, -dx):4 - max(0, dx)],
                                  src[max(0, dy):4 - max(0, -dy), max(0, dx):4 - max(0, -dx)])
                   for src in (image[..., 0], image[::, ::-1, 0]) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert len({d.tobytes() for d in draws}) > 5
    assert ops.prepare(sample, None, "x")[0] is sample  # evaluation: the image as it is


def test_photos_of_any_size_and_mode_are_resized_and_converted():
    """task.resize: a 60×40 RGB photo → 8×8 grey; evaluation is the central 87.5 % square, deterministic;
    training draws are seeded and differ."""
    photo = np.zeros((40, 60, 3), np.uint8)
    photo[:, 30:] = 200  # right half bright
    raw = {**_raw(photo, 1), "png": _png(photo)}
    ops = ImageOps(image_size=8, channels=1, num_classes=2, hflip=True, resize=True)
    sample = ops.decode(raw)
    assert sample.image.shape == (40, 60, 1)  # converted to grey (L: 200 stays 200), size kept until prepare
    evaluated = ops.prepare(sample, None, "x")[0].image[..., 0]
    assert evaluated.shape == (8, 8) and np.array_equal(evaluated, ops.prepare(sample, None, "x")[0].image[..., 0])
    # the central square is 35×35 around x = 30: columns 0–2 lie left of the edge (0), 5–7 right of it (200)
    assert (evaluated[:, :3] == 0).all() and (evaluated[:, 5:] == 200).all()
    draws = [ops.prepare(sample, random.Random(f"d{i}"), "x")[0].image[..., 0] for i in range(20)]
    assert all(d.shape == (8, 8) for d in draws) and len({d.tobytes() for d in draws}) > 5
    with pytest.raises(SampleError, match=r"image is 60×40, task.image_size=8 \(task.resize=true resizes"):
        ImageOps(image_size=8, channels=3, num_classes=2).decode(raw)


def test_metrics_hand_computed():
    truths = [{"key": f"k{i}", "label": label} for i, label in enumerate([0, 0, 1, 2])]
    predictions = [{"key": "k0", "top5": [0, 1, 2]}, {"key": "k1", "top5": [1, 0, 2]},
                   {"key": "k2", "top5": [1, 2, 0]}, {"key": "k3", "top5": [0, 1, 2]}]
    m = classification_metrics(predictions, truths, 3)
    assert m["brief"] == {"top1": 50.0, "top5": 100.0}
    assert m["per_class_top1"] == {"0": 50.0, "1": 100.0, "2": 0.0}
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_predictions_file_scores_against_the_raw_idx_labels(tmp_path):
    """Predictions in the task's format for the embedded test shard, every third one wrong on purpose,
    scored with labels read from Debian's raw t10k idx file: top-1 is exactly the planted fraction."""
    if not DEBIAN.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from lamscale.data.idx import score_against_idx
    from lamscale.data.stream import eval_samples

    cfg = load_config(ROOT / "configs" / "fashion_mnist_sample.yaml")
    task = get_task(cfg)
    samples = list(eval_samples(str(ROOT / "shards" / "fashion_mnist_sample" / "test-000000.tar"), 0, 1, ops=task.sample_ops()))
    batch = task.collate(samples)
    logits = torch.full((len(samples), 10), -5.0)
    for i, label in enumerate(batch.labels.tolist()):
        logits[i, label if i % 3 else (label + 1) % 10] = 5.0
    lines = task.predict(logits, batch)
    preds = tmp_path / "predictions_test.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in lines))
    score = score_against_idx(str(preds), str(DEBIAN / "t10k-labels-idx1-ubyte.gz"))
    assert score["n"] == 1000 and score["label_mismatches"] == 0
    assert score["top1"] == sum(1 for i in range(len(samples)) if i % 3) / len(samples)  # 666 / 1000


@pytest.mark.parametrize("name", ["fashion_mnist_sample", "fashion_mnist", "imagenet_vit"])
def test_classification_configs_validate_and_build_their_model(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    model = get_task(cfg).build_model()
    assert model.tokens == 1 + (cfg.task.image_size // cfg.task.patch_size) ** 2 <= cfg.model.lam.max_len


def test_unknown_task_and_bad_patch_are_one_line():
    from lamscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"task.name: unknown task 'detection'; expected one of \['captioning', 'classification', 'grounding', 'moment_retrieval'\]"):
        load_config(ROOT / "configs" / "tiny.yaml", ["task.name=detection"])
    with pytest.raises(ConfigError, match=r"task.patch_size: 5 does not divide task.image_size=28"):
        load_config(ROOT / "configs" / "fashion_mnist_sample.yaml", ["task.patch_size=5"])
