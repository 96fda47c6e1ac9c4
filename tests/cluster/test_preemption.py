"""SIGTERM to the driver: every rank stops at the same step boundary, saves, the driver exits 0; resume continues."""
import json
import signal
import subprocess
import sys

import pytest

from conftest import lamscale_env

pytestmark = pytest.mark.slow
SHORT = ["train.max_steps=40", "train.ckpt_every=100", "train.eval_every=100", "train.log_every=2",
         "data.batch_size=8", "run.name=preempt"]


def test_sigterm_saves_exits_zero_and_resumes(repo_root, sample_shards, tmp_path):
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={tmp_path}", *SHORT]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 4/40" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    out = "".join(lines)
    assert proc.wait(300) == 0, out[-3000:]
    assert "stopped at step" in out and "preempted: checkpoint step" in out, out[-3000:]
    run = tmp_path / "preempt"
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "commit.json").exists())
    stopped = int(steps[-1].split("_")[1])
    assert 4 <= stopped < 40
    assert not (run / "STOP_REQUESTED").exists()

    resumed = subprocess.run(cmd[:-len(SHORT)] + [*SHORT[1:], "train.max_steps=" + str(stopped + 2)], cwd=repo_root,
                             env=lamscale_env(), capture_output=True, text=True, timeout=600)
    out2 = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out2[-3000:]
    assert f"resumed at step {stopped}/{stopped + 2}" in out2
    assert json.loads((run / "metrics_val.json").read_text())["step"] == stopped + 2
