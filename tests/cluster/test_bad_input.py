"""Bad input exits non-zero with one line naming the key/URL, before any Ray worker starts."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def _fake_run(storage, name: str, step: int, max_steps: int, complete: bool, overrides=()) -> None:
    """A run folder as training leaves it: the resolved config, a committed checkpoint, maybe final metrics."""
    from lamscale.cluster.launch import prepare
    from lamscale.config import load_config

    cfg = load_config("configs/tiny.yaml", [f"run.storage={storage}", f"run.name={name}",
                                            f"train.max_steps={max_steps}", *overrides])
    run = Path(prepare(cfg))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run / "checkpoints" / f"step_{step:08d}" / "commit.json").write_text('{"files": {}}')
    if complete:
        (run / "metrics_val.json").write_text(json.dumps({"step": step, "brief": {}}))


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from lamscale.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_resume_refuses_changed_shape_in_one_line_and_passes_cadence(repo_root, sample_shards, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(repo_root)
    _fake_run(tmp_path, "r", 8, 8, complete=True)
    base = ["train", "configs/tiny.yaml", f"run.storage={tmp_path}", "run.name=r", "train.max_steps=8"]
    code, out, err = _main(capsys, *base, "model.dim=64", "data.batch_size=8", "cluster.num_workers=1")
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "resumes from step 8" in lines[0], err
    assert "model.dim: 128 -> 64; data.batch_size: 16 -> 8; cluster.num_workers: 2 -> 1" in lines[0], err
    # validation comes before "already complete": a bad value is not hidden behind it
    code, out, err = _main(capsys, *base, "train.lr=-1")
    assert code == 2 and "train.lr: expected a positive value" in err and "complete" not in out, out + err
    # keys a checkpoint can take go through (here to the complete run's message, without starting Ray)
    code, out, err = _main(capsys, *base, "train.eval_every=3", "train.keep_last=4", "cluster.max_failures=2")
    assert code == 0 and "is already complete (step 8)" in out and err == "", out + err
    assert not (tmp_path / "r" / "LEASE.json").exists()  # released on the way out


def test_too_many_workers_for_this_machine_is_one_line(repo_root, sample_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    code, out, err = _main(capsys, "train", "configs/tiny.yaml", f"run.storage={tmp_path}", "cluster.num_workers=100")
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and f"needs 100 CPUs, this machine has {os.cpu_count()}" in err, err


def test_metrics_on_a_file_that_is_not_json_lines_names_file_and_line(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"qid": 1, "pred_relevant_windows": []}\n\nqid,windows\n')
    code, out, err = _main(capsys, "metrics", "qvhighlights", "--preds", str(preds), "--gt", str(preds))
    assert code == 2 and err.count("\n") == 1 and f"{preds}:3: not JSON Lines" in err, err


def test_unreachable_store_says_it_is_retrying_once(repo_root):
    """With the run's retry budget, the first retry prints one line naming the URL and the budget."""
    env = lamscale_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                        "LAMSCALE_STORAGE_RETRY_S": "40"})
    proc = subprocess.Popen([sys.executable, "-m", "lamscale", "runs", "s3://lamscale-test/runs"], cwd=repo_root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        time.sleep(1.5)  # later retries stay quiet
    finally:
        proc.kill()
    rest = proc.communicate()[1]
    assert "retrying look up s3://lamscale-test/runs/config.yaml for up to 40s" in first, first + rest
    assert "retrying" not in rest, rest


def test_eval_refuses_a_step_that_is_not_committed_and_a_bad_split(tmp_path, repo_root):
    """`lamscale eval` checks its run, step and split before Ray starts: one line each."""
    run = tmp_path / "r"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "commit.json").write_text("{}")
    (run / "config.yaml").write_text((repo_root / "configs" / "tiny.yaml").read_text())
    for args, message in ((["--step", "3"], "--step 3: not a committed checkpoint of"),
                          (["--split", "../x"], "--split: '../x' is not a plain name"),
                          (["model.dim=64"], "cannot be evaluated under these changes: model.dim: 128 -> 64")):
        result = subprocess.run([sys.executable, "-m", "lamscale", "eval", str(run), *args], cwd=repo_root,
                                env=lamscale_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1


def test_refusals_come_before_torch_ray_or_webdataset_load(repo_root, sample_shards, tmp_path):
    """A bad key, a missing config or shard, a folder that is no run, an uncommitted step: each is answered
    before the heavy imports (~3 s of CPU), as a user at a prompt expects."""
    run = tmp_path / "r"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "commit.json").write_text("{}")
    (run / "config.yaml").write_text((repo_root / "configs" / "tiny.yaml").read_text())
    refusals = [["train", "configs/tiny.yaml", "model.dimm=3"], ["train", "configs/nope.yaml"],
                ["train", "configs/tiny.yaml", "data.train=/nonexistent/lamscale/train-000000.tar"],
                ["resume", str(tmp_path)], ["eval", str(run), "--step", "3"]]
    code = ("import sys\nfrom lamscale.cli import main\n"
            f"codes = [main(argv) for argv in {refusals!r}]\n"
            "print(codes, sorted(m for m in ('torch', 'ray', 'webdataset', 'deepspeed') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=lamscale_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2, 2] []", done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == len(refusals), done.stderr  # one line each
