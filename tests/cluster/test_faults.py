"""Faults in real runs: a Ray worker SIGKILLed (FailureConfig restarts the group from the newest commit),
and the S3 server (SeaweedFS) going down during uploads, briefly (the run rides it out) or for good
(the run stops with one clear line; committed checkpoints stay intact)."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from conftest import lamscale_env, training_workers

pytestmark = pytest.mark.slow
SMALL = ["train.eval_every=100", "train.mask_images=false", "data.batch_size=8"]


def _popen(repo_root, args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lamscale", *args], cwd=repo_root, env=lamscale_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(proc: subprocess.Popen, needle: str, seen: list[str]) -> bool:
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return True
    return False


def test_worker_sigkill_recovers_via_failure_config(repo_root, sample_shards, tmp_path):
    args = ["train", "configs/tiny.yaml", f"run.storage={tmp_path}", "run.name=wk", "train.max_steps=12",
            "train.ckpt_every=4", "train.log_every=2", "cluster.max_failures=2", *SMALL]
    proc, seen = _popen(repo_root, args), []
    assert _read_until(proc, "checkpoint step 4 committed", seen), "".join(seen[-40:])
    victims = training_workers(proc.pid)
    assert len(victims) == 2, victims
    victims[-1].send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    resumed = [line for line in rest.splitlines() if "resumed at step" in line]
    assert resumed and int(resumed[0].split("resumed at step ")[1].split("/")[0]) >= 4, out[-3000:]
    assert "checkpoint step 12 committed" in rest
    assert (tmp_path / "wk" / "metrics_val.json").exists()


def _verify_committed(fs, run: str, step: int) -> None:
    folder = f"{run}/checkpoints/step_{step:08d}"
    commit = json.loads(fs.cat_file(f"{folder}/commit.json"))
    for name, info in commit["files"].items():
        data = fs.cat_file(f"{folder}/{name}")
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], name


def _committed(fs, run: str) -> list[int]:
    fs.invalidate_cache()
    return sorted(int(p.rsplit("_", 1)[1]) for p in fs.ls(f"{run}/checkpoints")
                  if fs.exists(f"{p}/commit.json"))


def test_s3_outage_during_uploads(repo_root, sample_shards, seaweedfs):
    run = "lamscale-test/outage/run"
    args = ["train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/outage", "run.name=run", "train.max_steps=16",
            "train.ckpt_every=2", "train.log_every=2", "train.keep_last=20", *SMALL]
    # down for 10 s while every step checks the stop flag and every 2nd step uploads a checkpoint
    proc, seen = _popen(repo_root, args, {**seaweedfs.env(), "LAMSCALE_STORAGE_RETRY_S": "90"}), []
    assert _read_until(proc, "checkpoint step 4 committed", seen), "".join(seen[-40:])
    seaweedfs.restart(down_s=10)
    rest, _ = proc.communicate(timeout=600)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    fs = seaweedfs.fs()
    assert _committed(fs, run) == list(range(2, 17, 2)), out[-3000:]  # nothing lost
    for step in range(2, 17, 2):
        _verify_committed(fs, run, step)

    # down for good: the run gives up after its retry budget with one clear line
    proc, seen = _popen(repo_root, ["resume", f"s3://{run}", "train.max_steps=400"],
                        {**seaweedfs.env(), "LAMSCALE_STORAGE_RETRY_S": "6"}), []
    assert _read_until(proc, "] step 18/400", seen), "".join(seen[-40:])
    seaweedfs.kill()
    try:
        rest, _ = proc.communicate(timeout=300)
    finally:
        seaweedfs.start()
    out = "".join(seen) + rest
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("lamscale: error:")]
    assert len(errors) == 1 and "gave up after" in errors[0] and "lamscale resume" in errors[0], out[-3000:]
    fs = seaweedfs.fs()
    assert _committed(fs, run)[-1] >= 16
    _verify_committed(fs, run, 16)
