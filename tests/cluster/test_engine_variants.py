"""Real runs under the other DeepSpeed settings a config can pick: ZeRO-1 with bf16, ZeRO-3 (+ resume)."""
import subprocess
import sys

import pytest

from conftest import lamscale_env

pytestmark = pytest.mark.slow
SHORT = ["train.eval_every=4", "train.ckpt_every=2", "train.log_every=2", "data.batch_size=8"]


def train(repo_root, storage, *overrides):
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={storage}", *SHORT, *overrides]
    result = subprocess.run(cmd, cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("zero_stage, precision, resume", [(1, "bf16", False), (3, "fp32", True)])
def test_zero_stage_and_precision(repo_root, sample_shards, tmp_path, zero_stage, precision, resume):
    settings = [f"train.zero_stage={zero_stage}", f"train.precision={precision}", "run.name=variant"]
    out = train(repo_root, tmp_path, *settings, "train.max_steps=4")
    assert f"ZeRO-{zero_stage}, {precision}" in out and "checkpoint step 4 committed" in out
    if resume:
        out = train(repo_root, tmp_path, *settings, "train.max_steps=6")
        assert "resumed at step 4/6" in out and "checkpoint step 6 committed" in out
    assert (tmp_path / "variant" / "metrics_val.json").exists()
