"""Shards and run storage on a real S3 server (SeaweedFS): train, then resume from the s3:// run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import lamscale_env

pytestmark = pytest.mark.slow
STEPS = ["train.ckpt_every=3", "train.eval_every=6", "train.log_every=3", "data.batch_size=8"]


@pytest.fixture(scope="module")
def s3_shards(seaweedfs, sample_shards):
    import os

    fs = seaweedfs.fs()
    for name in os.listdir(sample_shards):
        fs.put_file(str(sample_shards / name), f"lamscale-test/shards/{name}")
    return "s3://lamscale-test/shards"


def lamscale(repo_root, seaweedfs, *args):
    return subprocess.run([sys.executable, "-m", "lamscale", *args], cwd=repo_root, capture_output=True, text=True,
                          env=lamscale_env(seaweedfs.env()), timeout=600)


def test_train_on_s3_then_resume_from_the_s3_run(repo_root, seaweedfs, s3_shards):
    run = "s3://lamscale-test/runs/s3run"
    first = lamscale(repo_root, seaweedfs, "train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/runs",
                     "run.name=s3run", f"data.train={s3_shards}/train-{{000000..000003}}.tar",
                     f"data.val={s3_shards}/val-{{000000..000001}}.tar", "train.max_steps=6", *STEPS)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert "checkpoint step 6 committed" in out

    second = lamscale(repo_root, seaweedfs, "resume", run, "train.max_steps=9")
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-3000:]
    assert "resumed at step 6/9" in out2 and "checkpoint step 9 committed" in out2

    fs = seaweedfs.fs()
    steps = sorted(p.rsplit("/", 1)[1] for p in fs.ls("lamscale-test/runs/s3run/checkpoints"))
    assert steps == ["step_00000006", "step_00000009"]
    commit = json.loads(fs.cat("lamscale-test/runs/s3run/checkpoints/step_00000009/commit.json"))
    assert commit["step"] == 9 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in commit["files"]
    assert json.loads(fs.cat("lamscale-test/runs/s3run/metrics_val.json"))["step"] == 9
    assert any("tfevents" in p for p in fs.ls("lamscale-test/runs/s3run/tb"))
