"""Bad input exits non-zero with one line naming the key/URL, before any Ray worker starts."""
import subprocess
import sys

import pytest

from conftest import lamscale_env


def run_cli(repo_root, *args, env=None):
    return subprocess.run([sys.executable, "-m", "lamscale", *args], cwd=repo_root, env=lamscale_env(env),
                          capture_output=True, text=True, timeout=90)  # well under the 120 s run retry budget


@pytest.mark.parametrize("overrides, named", [
    (["model.dimm=3"], "model.dimm"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["data.train=/nonexistent/lamscale/train-{000000..000001}.tar"], "/nonexistent/lamscale/train-000000.tar"),
    (["data.val=s3://lamscale-test/nothing-here-{0..1}.tar"], "s3://lamscale-test/nothing-here-0.tar"),
    (["run.storage=s3://lamscale-unreachable/runs"], "s3://lamscale-unreachable/runs"),
    (["run.storage=/proc/lamscale-cannot-write"], "/proc/lamscale-cannot-write"),
])
def test_bad_input_fails_fast_with_one_line(repo_root, sample_shards, tmp_path, overrides, named):
    # an endpoint where nothing listens: every s3:// access fails at once
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_MAX_ATTEMPTS": "1"}
    storage = [] if any(o.startswith("run.storage") for o in overrides) else [f"run.storage={tmp_path}"]
    result = run_cli(repo_root, "train", "configs/tiny.yaml", *storage, *overrides, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamscale: error:"), result.stderr
    assert named in lines[0]
    assert "Ray" not in result.stdout + result.stderr  # nothing started


def test_missing_config_file(repo_root):
    result = run_cli(repo_root, "train", "configs/nope.yaml")
    assert result.returncode == 2 and "configs/nope.yaml: config file not found" in result.stderr


def test_resume_of_a_folder_that_is_no_run(repo_root, tmp_path):
    result = run_cli(repo_root, "resume", str(tmp_path))
    assert result.returncode == 2 and "not a lamscale run" in result.stderr
