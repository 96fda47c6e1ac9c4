"""The trainer's TensorBoard events, served by a real `tensorboard --logdir <run storage>` and read over HTTP.

The events come from lamscale.train.monitor.Monitor with the tags Trainer.log/evaluate/save write, so what
this reads back is what a person sees for a real run.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from lamscale.train.monitor import Monitor

SCALARS = {  # tag -> value written at every step (the trainer's tags, see loop.Trainer.log/evaluate/save)
    "train/loss": 1.5, "train/lr": 1e-3, "train/grad_norm": 0.7, "loss/focal": 0.4,
    "perf/samples_per_s": 120.0, "perf/data_wait_share": 0.05, "perf/rss_gib": 1.2, "perf/tokens_seen": 4096.0,
    "val/MR-full-mAP": 12.5, "val/HL-min-VeryGood-mAP": 30.0, "perf/checkpoint_save_s": 0.3,
}
STEPS = (2, 4)
IMAGE_TAGS = ("lam_mask/layer_0", "lam_mask/layer_1")


@pytest.fixture(scope="module")
def run_storage(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    monitor = Monitor(str(storage / "demo"), start_step=0, total_steps=STEPS[-1])
    for step in STEPS:
        for tag, value in SCALARS.items():
            prefix, name = tag.split("/", 1)
            monitor.scalars(step, {name: value * step}, f"{prefix}/")
        masks = [(layer, torch.rand(1, 32, 32)) for layer in range(len(IMAGE_TAGS))]  # (heads, n, n) like mask_maps
        monitor.mask_images(step, masks)
    monitor.close()
    return storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def tensorboard(run_storage):
    """`tensorboard --logdir <run storage>` on a free port; yields its base URL once it serves our run."""
    port = _free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    log_path = run_storage.parent / "tensorboard.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(exe), "--logdir", str(run_storage), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "1"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:  # ready when the scalars of our run are listed (loading is asynchronous)
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                if "train/loss" in json.loads(_get(f"{base}/data/plugin/scalars/tags")).get("demo/tb", {}):
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"tensorboard on {base} did not list the run within 90 s"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_scalars_over_http(tensorboard):
    tags = json.loads(_get(f"{tensorboard}/data/plugin/scalars/tags"))["demo/tb"]
    assert set(SCALARS) <= set(tags), sorted(tags)
    for tag, value in SCALARS.items():
        query = urllib.parse.urlencode({"run": "demo/tb", "tag": tag})
        points = json.loads(_get(f"{tensorboard}/data/plugin/scalars/scalars?{query}"))  # [[wall, step, value]]
        assert [p[1] for p in points] == list(STEPS), (tag, points)
        assert [p[2] for p in points] == pytest.approx([value * s for s in STEPS], rel=1e-6), (tag, points)


def test_mask_images_over_http(tensorboard):
    tags = json.loads(_get(f"{tensorboard}/data/plugin/images/tags"))["demo/tb"]
    assert set(IMAGE_TAGS) <= set(tags), sorted(tags)
    for tag in IMAGE_TAGS:
        query = urllib.parse.urlencode({"run": "demo/tb", "tag": tag, "sample": 0})
        entries = json.loads(_get(f"{tensorboard}/data/plugin/images/images?{query}"))
        assert [e["step"] for e in entries] == list(STEPS), entries
        png = _get(f"{tensorboard}/data/plugin/images/individualImage?{entries[-1]['query']}")
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:16]
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR
        assert (width, height) == (32, 32)
