"""Cluster jobs end to end: a real Ray head (`ray start --head`), `lamscale submit|logs|status|stop|runs`.

The head runs in its own session with a private --temp-dir and private ports, and is torn down by
killing that session's processes: `ray stop` would kill every Ray instance on the machine.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RayHead, free_ports, lamscale_env

pytestmark = pytest.mark.slow
TINY = ["train.max_steps=6", "train.ckpt_every=3", "train.eval_every=6", "train.log_every=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def ray_head_node(tmp_path_factory):
    """A Ray head (4 CPUs) with the dashboard (Jobs API) on a free port."""
    head = RayHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def ray_head(ray_head_node):
    """The head's http:// (Jobs API) address."""
    return ray_head_node.address


def lamscale(repo_root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamscale", *args], cwd=repo_root, env=lamscale_env(),
                          capture_output=True, text=True, timeout=timeout)


def submit(repo_root: Path, address: str, *args: str) -> str:
    done = lamscale(repo_root, "submit", "configs/tiny.yaml", *args, "--address", address, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id and " " not in job_id, done.stdout
    return job_id


def test_submit_follow_status_and_runs(repo_root, ray_head, tmp_path):
    job = submit(repo_root, ray_head, f"run.storage={tmp_path}", "run.name=job", *TINY)

    followed = lamscale(repo_root, "logs", job, "--follow", "--address", ray_head)
    out = followed.stdout + followed.stderr
    assert followed.returncode == 0, out[-3000:]
    assert "step 6/6" in out and "checkpoint step 6 committed" in out and "eval @ 6" in out, out[-3000:]
    assert f"job {job}: SUCCEEDED" in out

    state = lamscale(repo_root, "status", job, "--address", ray_head)
    assert state.returncode == 0 and state.stdout.strip() == "SUCCEEDED", state.stdout + state.stderr

    logs = lamscale(repo_root, "logs", job, "--address", ray_head)
    assert logs.returncode == 0 and "step 2/6" in logs.stdout and "[lamscale] done:" in logs.stdout, logs.stdout[-3000:]

    listed = lamscale(repo_root, "runs", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("job "))
    assert row.split()[1:3] == ["6/6", "complete"], listed.stdout


def test_stop_saves_and_reports_stopped(repo_root, ray_head, tmp_path):
    job = submit(repo_root, ray_head, f"run.storage={tmp_path}", "run.name=long", "train.max_steps=100000",
                 "train.log_every=1", "train.eval_every=100000", "train.ckpt_every=100000", "data.batch_size=8")
    follower = subprocess.Popen([sys.executable, "-m", "lamscale", "logs", job, "--follow", "--address", ray_head],
                                cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    seen = []
    try:
        for line in follower.stdout:
            seen.append(line)
            if "step 2/100000" in line:
                break
        assert any("step 2/100000" in line for line in seen), "".join(seen[-40:])

        stopped = lamscale(repo_root, "stop", job, "--address", ray_head, timeout=300)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "STOPPED", stopped.stdout + stopped.stderr
        seen += follower.stdout.readlines()  # the follower ends with the job
        assert follower.wait(60) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
    state = lamscale(repo_root, "status", job, "--address", ray_head)
    assert state.stdout.strip() == "STOPPED", state.stdout + state.stderr
    out = "".join(seen)
    assert "stopped at step" in out and "preempted: checkpoint step" in out, out[-3000:]  # SIGTERM → saved
    listed = lamscale(repo_root, "runs", str(tmp_path))
    row = next(line for line in listed.stdout.splitlines() if line.startswith("long "))
    step = int(row.split()[1].split("/")[0])
    assert step >= 2 and row.split()[2] == "incomplete", listed.stdout


def test_unreachable_cluster_and_bad_config_fail_in_one_line(repo_root, tmp_path):
    (port,) = free_ports(1)
    down = lamscale(repo_root, "status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}", timeout=60)
    assert down.returncode == 2 and down.stderr.count("\n") == 1, down.stderr
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{port}" in down.stderr
    bad = lamscale(repo_root, "submit", "configs/tiny.yaml", "train.max_stepz=3", "--address",
                   f"http://127.0.0.1:{port}", timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "train.max_stepz" in bad.stderr, bad.stderr
    missing = lamscale(repo_root, "runs", str(tmp_path / "nothing"), timeout=60)
    assert missing.returncode == 2 and "no such folder" in missing.stderr, missing.stderr


def test_unknown_job_is_one_line(repo_root, ray_head):
    done = lamscale(repo_root, "status", "raysubmit_doesnotexist", "--address", ray_head, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "raysubmit_doesnotexist" in done.stderr, done.stderr


def test_train_on_a_cluster_too_small_fails_in_one_line_and_runs_says_failed(repo_root, ray_head_node, tmp_path):
    """`lamscale train --address` waits a bounded time for the workers' CPUs, then says what is missing; the
    run, which never reached a checkpoint, is listed as failed (not new)."""
    done = subprocess.run([sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={tmp_path}",
                           "run.name=small", "cluster.num_workers=5", "--address", ray_head_node.gcs_address],
                          cwd=repo_root, env=lamscale_env({"LAMSCALE_RESOURCE_WAIT_S": "3"}), capture_output=True,
                          text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lamscale: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "does not have the 5 CPUs (it has 4)" in errors[0] and "after waiting 3s" in errors[0], errors
    assert "waiting up to 3s for the cluster to offer 5 CPUs (it has 4)" in done.stdout, done.stdout[-2000:]
    assert "RayTrainWorker" not in done.stdout + done.stderr  # refused before any training worker
    listed = lamscale(repo_root, "runs", str(tmp_path))
    row = next(line for line in listed.stdout.splitlines() if line.startswith("small "))
    assert row.split()[1:3] == ["-/300", "failed"], listed.stdout
