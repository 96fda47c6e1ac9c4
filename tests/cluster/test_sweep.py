"""`lamscale sweep` on a real local Ray cluster: a 2 × 2 sweep (vanilla, lam-all × seeds 0, 1) whose driver
is killed with every process it started (as when its machine dies: Ray's daemons run in sessions of their
own, and orphaned workers would otherwise train on for a few steps) after a trial finished and another
committed a checkpoint; the same command then finishes it without re-running the finished trials, the
interrupted one resuming from its checkpoint, and writes every result."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import lamscale_env, reap_process_group, wait_gone

pytestmark = pytest.mark.slow
# one val shard (200 queries): each trial's eval on its single worker is half as long
ARGS = ["train.max_steps=12", "train.ckpt_every=2", "train.eval_every=12", "train.log_every=2", "data.batch_size=8",
        "data.val=shards/tiny/val-{000000..000000}.tar", "cluster.num_workers=1", "--grid", "variant=vanilla,lam-all",
        "--seeds", "2", "--max-concurrent", "2", "--name", "ablation"]


def committed(run) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in folder.iterdir() if (p / "commit.json").exists()) if folder.is_dir() else []


def test_a_killed_sweep_resumes_unfinished_trials_and_keeps_finished_ones(repo_root, sample_shards, tmp_path):
    cmd = [sys.executable, "-m", "lamscale", "sweep", "configs/tiny.yaml", f"run.storage={tmp_path}", *ARGS]
    sweep = tmp_path / "ablation"
    proc = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    finished, interrupted, deadline = {}, None, time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            runs = [p for p in sweep.iterdir() if (p / "config.yaml").exists()] if sweep.is_dir() else []
            # finished: its last step committed (its metrics are written just before that commit)
            finished = {p.name: (p / "metrics_val.json").stat().st_mtime_ns for p in runs if committed(p)[-1:] == [12]}
            partial = [p for p in runs if p.name not in finished and committed(p) and not (p / "metrics_val.json").exists()]
            if finished and partial:
                interrupted = partial[0]
                started = psutil.Process(proc.pid).children(recursive=True)
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started, at once
                for child in started:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                assert wait_gone(started, 60)
                break
            time.sleep(0.2)
    finally:
        reap_process_group(proc.pid)
        proc.wait(60)
    out = "".join(lines)
    assert interrupted is not None, out[-3000:]
    step = committed(interrupted)[-1]
    assert 2 <= step < 12 and not (interrupted / "metrics_val.json").exists()

    rerun = subprocess.run(cmd, cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=900)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming the sweep" in out
    for name, mtime in finished.items():  # not trained again (Tune may hand back one it had not yet seen end)
        assert f"run {sweep / name}: " not in out and (sweep / name / "metrics_val.json").stat().st_mtime_ns == mtime, name
    assert f"run {interrupted}: resuming from step {step}" in out, out[-3000:]
    assert f"resumed at step {step}/12" in out
    report = json.loads((sweep / "sweep.json").read_text())
    assert sorted(t["name"] for t in report["trials"]) == ["lam-all_seed0", "lam-all_seed1", "vanilla_seed0", "vanilla_seed1"]
    assert all(t["state"] == "complete" and t["step"] == 12 and "MR-full-mAP" in t["metrics"] for t in report["trials"])
    rows = {r["group"]: r for r in report["rows"]}
    lam = rows["variant=lam-all"]["metrics"]["MR-full-mAP"]
    assert lam["vs_vanilla"]["pairs"] == 2 and lam["vs_vanilla"]["ci95"][0] <= lam["vs_vanilla"]["mean"] <= lam["vs_vanilla"]["ci95"][1]
    assert rows["variant=lam-all"]["params"] > rows["variant=vanilla"]["params"]
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "| variant=lam-all |" in (sweep / "sweep.md").read_text()
    assert sorted(p.name for p in (sweep / "hparams").iterdir()) == sorted(t["name"] for t in report["trials"])
    status = subprocess.run([sys.executable, "-m", "lamscale", "sweep", "--status", str(sweep)], cwd=repo_root,
                            env=lamscale_env(), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count(" complete ") == 4, status.stdout + status.stderr
