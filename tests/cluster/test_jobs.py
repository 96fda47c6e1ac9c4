"""Cluster jobs end to end: a real Ray head (`ray start --head`), `lamscale submit|logs|status|stop|runs`.

The head (conftest's shared `ray_cluster`) runs in its own session with a private --temp-dir and private
ports, and is torn down by killing that session's processes: `ray stop` would kill every Ray instance on the
machine. One launch serves every test here: a short job and a long one run side by side on its 4 CPUs (the
long one is stopped after step 2), and beside them `lamscale train` asks for more CPUs than the head has.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_ports, lamscale_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head_node(ray_cluster):
    """A Ray head (4 CPUs) with the dashboard (Jobs API) on a free port."""
    return ray_cluster


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


# one worker: what is checked (stop → save → STOPPED) does not depend on the rank count, and a worker less frees CPU
LONG = ["run.name=long", "train.max_steps=100000", "train.log_every=1", "train.eval_every=100000",
        "train.ckpt_every=100000", "data.batch_size=8", "cluster.num_workers=1"]


@pytest.fixture(scope="module")
def launched(repo_root, ray_head_node, tmp_path_factory, request):
    """One launch for the module: a long job (stopped once it logged step 2), a short job (conftest's
    reference_job: test_train_e2e.py's 12-step reference run), and `lamscale train --address` asking for 5 CPUs
    of the 4, all at once on the head. Returns what each produced."""
    head, storage = ray_head_node.address, tmp_path_factory.mktemp("jobs")
    small_storage = tmp_path_factory.mktemp("small")
    long = submit(repo_root, head, f"run.storage={storage}", *LONG)
    reference = request.getfixturevalue("reference_job")
    short = reference["job"]
    small = subprocess.Popen([sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml",
                              f"run.storage={small_storage}", "run.name=small", "cluster.num_workers=5", "--address",
                              ray_head_node.gcs_address], cwd=repo_root,
                             env=lamscale_env({"LAMSCALE_RESOURCE_WAIT_S": "3"}), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    follower = subprocess.Popen([sys.executable, "-m", "lamscale", "logs", long, "--follow", "--address", head],
                                cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    seen, stopped, follower_rc = [], None, None
    try:
        for line in follower.stdout:
            seen.append(line)
            if "step 2/100000" in line:
                break
        if any("step 2/100000" in line for line in seen):
            stopped = lamscale(repo_root, "stop", long, "--address", head, timeout=300)
            seen += follower.stdout.readlines()  # the follower ends with the job
            follower_rc = follower.wait(60)
    finally:
        if follower.poll() is None:
            follower.kill()
    followed = lamscale(repo_root, "logs", short, "--follow", "--address", head)
    small_out, small_err = small.communicate(timeout=180)
    return {"head": head, "storage": storage, "short": short, "short_storage": reference["storage"], "followed": followed, "long": long, "seen": seen,
            "stopped": stopped, "follower_rc": follower_rc,
            "small": subprocess.CompletedProcess(small.args, small.returncode, small_out, small_err),
            "small_storage": small_storage}


def test_submit_follow_status_and_runs(repo_root, launched):
    job, ray_head = launched["short"], launched["head"]

    followed = launched["followed"]
    out = followed.stdout + followed.stderr
    assert followed.returncode == 0, out[-3000:]
    assert "step 12/12" in out and "checkpoint step 12 committed" in out and "eval @ 6" in out, out[-3000:]
    assert f"job {job}: SUCCEEDED" in out

    state = lamscale(repo_root, "status", job, "--address", ray_head)
    assert state.returncode == 0 and state.stdout.strip() == "SUCCEEDED", state.stdout + state.stderr

    logs = lamscale(repo_root, "logs", job, "--address", ray_head)
    assert logs.returncode == 0 and "step 2/12" in logs.stdout and "[lamscale] done:" in logs.stdout, logs.stdout[-3000:]

    listed = lamscale(repo_root, "runs", str(launched["short_storage"]))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("reference "))
    assert row.split()[1:3] == ["12/12", "complete"], listed.stdout


def test_stop_saves_and_reports_stopped(repo_root, launched):
    job, ray_head, tmp_path, seen = launched["long"], launched["head"], launched["storage"], launched["seen"]
    assert any("step 2/100000" in line for line in seen), "".join(seen[-40:])
    stopped = launched["stopped"]
    assert stopped.returncode == 0 and stopped.stdout.strip() == "STOPPED", stopped.stdout + stopped.stderr
    assert launched["follower_rc"] == 0
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


def test_train_on_a_cluster_too_small_fails_in_one_line_and_runs_says_failed(repo_root, launched):
    """`lamscale train --address` waits a bounded time for the workers' CPUs, then says what is missing; the
    run, which never reached a checkpoint, is listed as failed (not new)."""
    done = launched["small"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lamscale: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "does not have the 5 CPUs (it has 4)" in errors[0] and "after waiting 3s" in errors[0], errors
    assert "waiting up to 3s for the cluster to offer 5 CPUs (it has 4)" in done.stdout, done.stdout[-2000:]
    assert "RayTrainWorker" not in done.stdout + done.stderr  # refused before any training worker
    listed = lamscale(repo_root, "runs", str(launched["small_storage"]))
    row = next(line for line in listed.stdout.splitlines() if line.startswith("small "))
    assert row.split()[1:3] == ["-/300", "failed"], listed.stdout
