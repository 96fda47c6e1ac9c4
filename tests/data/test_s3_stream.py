"""Shards on a real S3 server (SeaweedFS): the loader rides out a server restart in the middle of an epoch."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading

import pytest

from conftest import lamscale_env
from lamscale.data.loader import LoaderSpec, TrainLoader
from lamscale.data.reader import ReadOptions

pytestmark = pytest.mark.slow
TRAIN = "train-{000000..000003}.tar"


def keys(samples) -> list[str]:
    return [s.key for s in samples]


def test_loader_finishes_the_epoch_across_a_server_restart(seaweedfs, sample_shards, monkeypatch, capfd):
    fs = seaweedfs.fs()
    for i in range(4):
        fs.put_file(str(sample_shards / f"train-{i:06d}.tar"), f"lamscale-test/restart/train-{i:06d}.tar")
    for name, value in {**seaweedfs.env(), "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)  # loader workers are forked from here; botocore does not retry itself
    # small range requests and a small shuffle buffer: reads keep pace with the batches taken
    s3 = LoaderSpec(f"s3://lamscale-test/restart/{TRAIN}", 3, 20, 16, options=ReadOptions(retry_s=90, block_kib=256))
    local = LoaderSpec(f"{sample_shards}/{TRAIN}", 3, 20, 16)
    epoch = list(itertools.islice(iter(TrainLoader(local, 0, 1, 2, keys)), 60))  # 2 workers × 30 batches × 20 = 1200

    batches = iter(TrainLoader(s3, 0, 1, 2, keys))
    got = list(itertools.islice(batches, 10))
    outage = threading.Thread(target=seaweedfs.restart, kwargs={"down_s": 2.0})
    outage.start()  # SIGKILL now, back on the same ports and data ~2 s + its start-up later
    got += list(itertools.islice(batches, 50))
    outage.join()

    assert got == epoch
    flat = [k for b in got for k in b]
    assert len(flat) == len(set(flat)) == 1200
    assert "read failed at byte" in capfd.readouterr().err  # the outage did cut reads mid-shard


def test_bench_data_writes_its_report(repo_root, sample_shards, tmp_path):
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "lamscale", "bench", "data", "--epochs", "1", "--repeats", "1",
                             "--workers", "0,1", "--out", str(out)], cwd=repo_root, env=lamscale_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "data.json").read_text())["rows"]
    assert [(r["dataset"], r["source"], r["workers"]) for r in rows] == [
        ("clips", "s3", 0), ("clips", "s3", 1), ("clips", "local", 0), ("clips", "local", 1),
        ("movies", "s3", 0), ("movies", "local", 0)]  # movie shards: read + decode_movie in process only
    assert [r["samples"] for r in rows] == [1200] * 4 + [16] * 2  # --epochs 1: the MAD-like sample's 16 movies once
    rates = ("samples_per_s", "mb_per_s", "reader_mb_per_s", "raw_mb_per_s")
    assert all(r[k] > 0 for r in rows for k in rates)
    assert "| source | workers |" in (tmp_path / "data.md").read_text() and not (tmp_path / "data.png").exists()
