"""Shards and run storage on a real S3 server (SeaweedFS), training on a real `ray start --head` cluster:
the store goes down for 6 s during the uploads (the run rides it out, nothing lost), the driver dies, the
cluster is stopped and a new one started, `lamscale resume s3://…` finishes the run; no credential leaks
into logs, configs or run files. Last, the store goes down for good under a resumed run: it stops with one
clear line and the committed checkpoints stay intact."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import RayHead, lamscale_env

pytestmark = pytest.mark.slow
STEPS = ["train.ckpt_every=3", "train.eval_every=6", "train.log_every=3", "data.batch_size=8", "train.keep_last=20"]
RUN = "lamscale-test/runs/s3run"


@pytest.fixture(scope="module")
def s3_shards(seaweedfs, sample_shards):
    fs = seaweedfs.fs()
    for name in os.listdir(sample_shards):
        fs.put_file(str(sample_shards / name), f"lamscale-test/shards/{name}")
    return "s3://lamscale-test/shards"


@pytest.fixture(scope="module")
def heads(seaweedfs):
    """Two real Ray clusters (no dashboard: runs reach them by their GCS address); their temp dirs (session
    logs) stay until the module ends."""
    made = [RayHead(seaweedfs.env(), dashboard=False) for _ in range(2)]  # nodes hold the store's credentials
    yield made
    for head in made:
        head.stop()


def lamscale(repo_root, seaweedfs, *args, env: dict | None = None):
    env = lamscale_env({**seaweedfs.env(), **(env or {})})
    return subprocess.run([sys.executable, "-m", "lamscale", *args], cwd=repo_root, capture_output=True, text=True,
                          env=env, timeout=600)


def _popen(repo_root, seaweedfs, *args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lamscale", *args], cwd=repo_root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=lamscale_env({**seaweedfs.env(), **env}))


def _read_until(proc: subprocess.Popen, needle: str, seen: list[str]) -> bool:
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return True
    return False


@pytest.fixture(scope="module")
def trained_and_resumed(repo_root, seaweedfs, s3_shards, heads):
    """Train on a `ray start --head` cluster from s3:// shards into s3:// storage; right after the commit at
    step 3 the store is down for 6 s (uploads, shard reads and stop-flag checks retry); the driver is
    SIGKILLed right after the commit at step 6; the cluster is stopped (all its processes); then `lamscale
    resume s3://…` on a new cluster (started while the first run trained: it shares nothing with it) finishes
    the run at step 9."""
    first_head, second_head = heads
    first_head.start()
    proc, seen = _popen(repo_root, seaweedfs, "train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/runs",
                        "run.name=s3run", f"data.train={s3_shards}/train-{{000000..000003}}.tar",
                        f"data.val={s3_shards}/val-{{000000..000001}}.tar", "train.max_steps=9", *STEPS,
                        "--address", first_head.gcs_address,
                        env={"LAMSCALE_FAULT": "after_commit@6", "LAMSCALE_STORAGE_RETRY_S": "90"}), []
    starting = ThreadPoolExecutor(1).submit(second_head.start)
    if _read_until(proc, "checkpoint step 3 committed", seen):
        seaweedfs.restart(down_s=6)
    rest, _ = proc.communicate(timeout=600)
    first = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + rest, "")
    first_head.stop(keep_temp=True)  # like `ray stop` on every node, without touching other Ray instances here
    starting.result()  # raises what the second head's start raised
    second = lamscale(repo_root, seaweedfs, "resume", f"s3://{RUN}", "--address", second_head.gcs_address)
    return first, second


def _verify_committed(fs, run: str, step: int) -> None:
    folder = f"{run}/checkpoints/step_{step:08d}"
    commit = json.loads(fs.cat_file(f"{folder}/commit.json"))
    for name, info in commit["files"].items():
        data = fs.cat_file(f"{folder}/{name}")
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], name


def _committed(fs, run: str) -> list[int]:
    fs.invalidate_cache()
    return sorted(int(p.rsplit("_", 1)[1]) for p in fs.ls(f"{run}/checkpoints") if fs.exists(f"{p}/commit.json"))


def test_train_on_s3_then_resume_from_the_s3_run(seaweedfs, trained_and_resumed):
    first, second = trained_and_resumed
    out = first.stdout + first.stderr
    assert first.returncode == -9, out[-3000:]  # the driver died right after the commit at step 6
    assert "step 7/9" not in out, out[-3000:]

    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-3000:]
    assert "resumed at step 6/9" in out2 and "checkpoint step 9 committed" in out2

    fs = seaweedfs.fs()
    assert _committed(fs, RUN) == [3, 6, 9]  # nothing lost to the outage after step 3
    for step in (3, 6, 9):
        _verify_committed(fs, RUN, step)
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


def test_store_down_for_good_stops_a_resumed_run_in_one_line(repo_root, seaweedfs, trained_and_resumed, heads):
    """Runs last in this module (it raises max_steps): the run gives up after its retry budget with one
    line saying how to go on, and the committed checkpoints stay intact."""
    assert trained_and_resumed[1].returncode == 0
    proc, seen = _popen(repo_root, seaweedfs, "resume", f"s3://{RUN}", "train.max_steps=400", "--address",
                        heads[1].gcs_address, env={"LAMSCALE_STORAGE_RETRY_S": "3"}), []
    assert _read_until(proc, "checkpoint step 12 committed", seen), "".join(seen[-40:])
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
    assert _committed(fs, RUN)[-1] >= 12
    _verify_committed(fs, RUN, _committed(fs, RUN)[-1])
