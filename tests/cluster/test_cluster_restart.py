"""The whole cluster goes away: a driver connected to a real `ray start --head` cluster is SIGKILLed,
the cluster is stopped and a new one started, and `lamscale resume s3://…` finishes the run from the
SeaweedFS run storage."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import RayHead, lamscale_env

pytestmark = pytest.mark.slow
RUN = "lamscale-test/restart/run"


def test_driver_kill_cluster_restart_resume_from_s3(repo_root, sample_shards, seaweedfs):
    env = lamscale_env(seaweedfs.env())
    head = RayHead(seaweedfs.env())  # cluster nodes hold the store's credentials (an instance role, in the cloud)
    try:
        head.start()
        cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/restart",
               "run.name=run", "train.max_steps=12", "train.ckpt_every=4", "train.eval_every=100", "train.log_every=2",
               "data.batch_size=8", "--address", head.gcs_address]
        driver = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        seen = []
        for line in driver.stdout:
            seen.append(line)
            if "checkpoint step 4 committed" in line:
                driver.send_signal(signal.SIGKILL)
                break
        driver.wait(60)
        assert any("checkpoint step 4 committed" in line for line in seen), "".join(seen[-40:])
        head.stop(keep_temp=True)  # the cluster is gone, like `ray stop` on every node
        head.start()  # a fresh cluster on new ports
        resumed = subprocess.run([sys.executable, "-m", "lamscale", "resume", f"s3://{RUN}", "--address", head.gcs_address],
                                 cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    finally:
        head.stop()
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    start = next(line for line in out.splitlines() if "resumed at step" in line)
    assert int(start.split("resumed at step ")[1].split("/")[0]) >= 4, out[-3000:]
    assert "checkpoint step 12 committed" in out
    fs = seaweedfs.fs()
    assert fs.exists(f"{RUN}/checkpoints/step_00000012/commit.json") and fs.exists(f"{RUN}/metrics_val.json")
