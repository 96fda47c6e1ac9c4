"""Shards and run storage on a real S3 server (SeaweedFS), training on a real `ray start --head` cluster:
the driver dies, the cluster is stopped and a new one started, `lamscale resume s3://…` finishes the run;
no credential leaks into logs, configs or run files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RayHead, lamscale_env

pytestmark = pytest.mark.slow
STEPS = ["train.ckpt_every=3", "train.eval_every=6", "train.log_every=3", "data.batch_size=8"]
RUN = "lamscale-test/runs/s3run"


@pytest.fixture(scope="module")
def s3_shards(seaweedfs, sample_shards):
    fs = seaweedfs.fs()
    for name in os.listdir(sample_shards):
        fs.put_file(str(sample_shards / name), f"lamscale-test/shards/{name}")
    return "s3://lamscale-test/shards"


@pytest.fixture(scope="module")
def heads(seaweedfs):
    """Two real Ray clusters, one after the other; their temp dirs (session logs) stay until the module ends."""
    made = [RayHead(seaweedfs.env()) for _ in range(2)]  # nodes hold the store's credentials, like an instance role
    yield made
    for head in made:
        head.stop()


def lamscale(repo_root, seaweedfs, *args, env: dict | None = None):
    env = lamscale_env({**seaweedfs.env(), **(env or {})})
    return subprocess.run([sys.executable, "-m", "lamscale", *args], cwd=repo_root, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def trained_and_resumed(repo_root, seaweedfs, s3_shards, heads):
    """Train on a `ray start --head` cluster from s3:// shards into s3:// storage; the driver is SIGKILLed right
    after the commit at step 6; the cluster is stopped (all its processes) and a new one started; then
    `lamscale resume s3://…` on the new cluster finishes the run at step 9."""
    first_head, second_head = heads
    first_head.start()
    first = lamscale(repo_root, seaweedfs, "train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/runs",
                     "run.name=s3run", f"data.train={s3_shards}/train-{{000000..000003}}.tar",
                     f"data.val={s3_shards}/val-{{000000..000001}}.tar", "train.max_steps=9", *STEPS,
                     "--address", first_head.gcs_address, env={"LAMSCALE_FAULT": "after_commit@6"})
    first_head.stop(keep_temp=True)  # like `ray stop` on every node, without touching other Ray instances here
    second_head.start()
    second = lamscale(repo_root, seaweedfs, "resume", f"s3://{RUN}", "--address", second_head.gcs_address)
    return first, second


def test_train_on_s3_then_resume_from_the_s3_run(seaweedfs, trained_and_resumed):
    first, second = trained_and_resumed
    out = first.stdout + first.stderr
    assert first.returncode == -9, out[-3000:]  # the driver died right after the commit at step 6
    assert "step 7/9" not in out, out[-3000:]

    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-3000:]
    assert "resumed at step 6/9" in out2 and "checkpoint step 9 committed" in out2

    fs = seaweedfs.fs()
    steps = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{RUN}/checkpoints"))
    assert steps == ["step_00000006", "step_00000009"]
    commit = json.loads(fs.cat(f"{RUN}/checkpoints/step_00000009/commit.json"))
    assert commit["step"] == 9 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in commit["files"]
    assert json.loads(fs.cat(f"{RUN}/metrics_val.json"))["step"] == 9
    assert any("tfevents" in p for p in fs.ls(f"{RUN}/tb"))


def test_no_credentials_in_logs_configs_or_run_files(seaweedfs, trained_and_resumed, heads):
    first, second = trained_and_resumed
    assert first.returncode == -9 and second.returncode == 0, "the runs failed; see the test above"
    secrets = {name: seaweedfs.env()[name].encode() for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}

    def _leaks(where: str, data: bytes) -> list[str]:
        return [f"{where} contains {name}" for name, secret in secrets.items() if secret in data]

    leaks = []
    for label, proc in (("train", first), ("resume", second)):
        leaks += _leaks(f"`lamscale {label}` output", (proc.stdout + proc.stderr).encode())

    fs = seaweedfs.fs()
    files = fs.find(RUN)
    assert any(p.endswith("config.yaml") for p in files) and any("tfevents" in p for p in files), files
    for path in files:  # every file the run wrote: config, checkpoints, metrics, predictions, TensorBoard events
        leaks += _leaks(f"s3://{path}", fs.cat_file(path))

    logs = [p for head in heads for p in Path(head.temp).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("worker-") for p in logs), "no Ray worker logs found in the clusters' temp dirs"
    for path in logs:  # Ray's session logs: driver, workers, raylet, GCS, dashboard, runtime env agent
        try:
            leaks += _leaks(str(path), path.read_bytes())
        except OSError:  # sockets and files removed while reading
            continue
    assert not leaks, "\n".join(leaks)


def test_tensorboard_reads_the_s3_run_with_aws_endpoint_url(seaweedfs, trained_and_resumed, monkeypatch):
    """What `AWS_ENDPOINT_URL=… tensorboard --logdir s3://bucket/runs` loads (TensorBoard's own S3 reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert trained_and_resumed[1].returncode == 0
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    acc = EventAccumulator(f"s3://{RUN}/tb", size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and acc.Scalars("train/loss")[-1].step == 9
    assert any(tag.startswith("lam_mask/") for tag in acc.Tags()["images"])


def test_runs_lists_the_s3_run(repo_root, seaweedfs, trained_and_resumed):
    assert trained_and_resumed[1].returncode == 0
    listed = lamscale(repo_root, seaweedfs, "runs", "s3://lamscale-test/runs")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("s3run "))
    assert row.split()[1:4] == ["9/9", "complete", "9"] and row.endswith(f"s3://{RUN}"), listed.stdout
