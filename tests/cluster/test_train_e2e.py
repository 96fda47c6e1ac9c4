"""Real runs (Ray Train + DeepSpeed ZeRO-2 workers, fp32, CPU): one uninterrupted, and the same run
killed at two points (mid-epoch, inside a save; the driver SIGKILLed each time) and re-run each time with
the same command. The resumed run must log the same per-step losses and end with the same weights, bit
for bit; the save killed before its commit is never restored from. (A kill right after a commit, which
must resume from that commit, is in test_s3_run.py.) The killed runs start Ray in-process, as `lamscale train`
does by default; the reference (a `lamscale submit` job, conftest's reference_job), the re-run and `lamscale eval`
run on conftest's shared `ray start --head`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conftest import REFERENCE_STEPS, lamscale_env, reap_process_group, training_workers, wait_gone
from lamscale.tasks.qvhighlights_metrics import evaluate, load_jsonl

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS  # the reference run (conftest's reference_job) and every run here
FAULTS = ["after_step@6", "before_commit@12"]


def _run(repo_root: Path, storage: Path, name: str, fault: str = "", address: str = "") -> dict:
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={storage}", f"run.name={name}", *STEPS,
           *(["--address", address] if address else [])]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env({"LAMSCALE_FAULT": fault} if fault else None),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, workers = [], []
    for line in proc.stdout:
        seen.append(line)
        if not workers and "] step " in line:  # training runs: note the workers while the driver lives
            workers = training_workers(proc.pid)
    proc.wait(600)
    workers_gone = True
    if fault:  # the driver was SIGKILLed: Ray must end the workers itself; then reap its idle agents
        workers_gone = bool(workers) and wait_gone(workers, 60)
        reap_process_group(proc.pid)
    return {"rc": proc.returncode, "out": "".join(seen), "workers_gone": workers_gone}


@pytest.fixture(scope="module")
def runs(repo_root, sample_shards, ray_cluster, reference_job):
    """The reference is conftest's reference_job (submitted to the shared head, also test_jobs.py's short job):
    the killed runs go on beside it while it still runs; its log is read once it has ended."""
    storage = reference_job["storage"]
    interrupted = [_run(repo_root, storage, "interrupted", fault) for fault in FAULTS]  # private Ray: the driver dies
    final = _run(repo_root, storage, "interrupted", address=ray_cluster.gcs_address)
    followed = subprocess.run([sys.executable, "-m", "lamscale", "logs", reference_job["job"], "--follow", "--address",
                               reference_job["address"]], cwd=repo_root, env=lamscale_env(), capture_output=True,
                              text=True, timeout=600)
    reference = followed.stdout + followed.stderr
    assert followed.returncode == 0 and f"job {reference_job['job']}: SUCCEEDED" in reference, reference[-3000:]
    return {"reference": reference_job["run"], "run": storage / "interrupted", "interrupted": interrupted,
            "final": final, "address": ray_cluster.gcs_address}


def _start_line(out: str) -> str:
    return next(line for line in out.splitlines() if "at step" in line and "[lamscale]" in line)


def test_each_fault_killed_the_run_where_asked(runs):
    for fault, result in zip(FAULTS, runs["interrupted"]):
        assert result["rc"] == -9, (fault, result["out"][-2000:])  # the driver died by SIGKILL
        steps = [int(line.split("] step ")[1].split("/")[0]) for line in result["out"].splitlines() if "] step " in line]
        assert steps[-1] <= int(fault.split("@")[1]), (fault, result["out"][-2000:])
        assert result["workers_gone"], f"{fault}: Ray Train workers of the killed driver kept running"
        # a private cluster without a dashboard (LAMSCALE_RAY_DASHBOARD=0) runs no PlacementGroupCleaner, which
        # could never reach the State API and would log that every second
        assert "Failed to query Ray Train Controller actor state" not in result["out"], result["out"][-2000:]
    starts = [_start_line(r["out"]) for r in [*runs["interrupted"], runs["final"]]]
    assert "starting at step 0/12" in starts[0]
    assert "resumed at step 4/12" in starts[1]  # killed mid-epoch at 6: back to the commit at 4
    assert "resumed at step 8/12" in starts[2], starts  # the save of 12 was killed before its commit


def test_rerun_finishes_and_keeps_last_two(runs):
    final = runs["final"]
    assert final["rc"] == 0, final["out"][-3000:]
    assert "step 12/12" in final["out"] and "checkpoint step 12 committed" in final["out"]
    steps = sorted(p.name for p in (runs["run"] / "checkpoints").iterdir())
    assert steps == ["step_00000008", "step_00000012"], steps  # keep_last, and the dead save's leftovers are gone
    commit = json.loads((runs["run"] / "checkpoints" / "step_00000012" / "commit.json").read_text())
    assert {"mp_rank_00_model_states.pt", "rank_0.pt", "rank_1.pt", "trainer.json"} <= set(commit["files"])


def _losses(run: Path) -> dict[int, list[float]]:
    """Every train/loss value of every event file, by step (steps replayed after a resume appear twice)."""
    found: dict[int, list[float]] = {}
    for path in sorted((run / "tb").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    found.setdefault(event.step, []).append(value.simple_value)
    return found


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_losses_and_weights_are_bit_identical(runs):
    reference, interrupted = _losses(runs["reference"]), _losses(runs["run"])
    assert sorted(reference) == list(range(1, 13)) and sorted(interrupted) == list(range(1, 13))
    for step in range(1, 13):
        assert len(reference[step]) == 1
        assert set(interrupted[step]) == set(reference[step]), (step, reference[step], interrupted[step])
    assert max(len(v) for v in interrupted.values()) == 2  # steps 5-6 and 9-12 really ran twice
    want, got = _weights(runs["reference"]), _weights(runs["run"])
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_predictions_and_metrics_are_official(runs, sample_shards):
    run = runs["run"]
    predictions = load_jsonl(run / "predictions_val.jsonl")
    assert len(predictions) == 400 and len({p["qid"] for p in predictions}) == 400
    assert set(predictions[0]) == {"qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"}
    metrics = json.loads((run / "metrics_val.json").read_text())
    assert metrics.pop("step") == 12
    truths = load_jsonl(sample_shards.parent / "qvhighlights_sample" / "val.jsonl")
    assert json.loads(json.dumps(evaluate(predictions, truths))) == metrics
    assert metrics == {k: v for k, v in json.loads((runs["reference"] / "metrics_val.json").read_text()).items() if k != "step"}


def test_tensorboard_has_scalars_and_mask_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["run"] / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/step_time_s", "perf/rss_gib", "perf/data_wait_share",
                "val/MR-full-mAP", "val/HL-min-VeryGood-mAP", "perf/checkpoint_save_s", "data/truncated", "data/skipped"):
        assert tag in tags["scalars"], tags["scalars"]
    assert {"lam_mask/layer_0", "lam_mask/layer_1"} <= set(tags["images"])
    assert {"lam_mask_values/layer_0", "lam_mask_values/layer_1"} <= set(tags["histograms"])
    assert acc.Scalars("train/loss")[-1].step == 12
    image = acc.Images("lam_mask/layer_1")[-1]
    assert image.width == image.height > 10


def test_lamscale_eval_reproduces_the_finished_run(runs, repo_root):
    """`lamscale eval RUN` (newest committed step, on Ray workers like training) writes new files that equal
    the run's own final evaluation."""
    run = runs["run"]
    done = subprocess.run([sys.executable, "-m", "lamscale", "eval", str(run), "--split", "again", "--address",
                           runs["address"]], cwd=repo_root,
                          env=lamscale_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert json.loads((run / "metrics_again.json").read_text()) == json.loads((run / "metrics_val.json").read_text())
    assert (run / "predictions_again.jsonl").read_text() == (run / "predictions_val.jsonl").read_text()
