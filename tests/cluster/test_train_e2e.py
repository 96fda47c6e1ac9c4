"""A real run: Ray Train + DeepSpeed ZeRO-2 workers, its driver SIGKILLed after a checkpoint, re-run, resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import lamscale_env
from lamscale.tasks.qvhighlights_metrics import evaluate, load_jsonl

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=12", "train.ckpt_every=4", "train.eval_every=6", "train.log_every=2", "data.batch_size=8"]


def _group_commands(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pgid=,args="], capture_output=True, text=True).stdout
    return [line.split(None, 1)[1] for line in out.splitlines() if line.split(None, 1)[0] == str(pgid)]


def _wait_for_training_exit(pgid: int, timeout: float) -> bool:
    """True once no Ray Train worker or controller of the killed driver's session is alive."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any("RayTrainWorker" in c or "TrainController" in c for c in _group_commands(pgid)):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def killed_and_resumed(repo_root, sample_shards, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={storage}", "run.name=e2e", *STEPS]
    first = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "checkpoint step 4 committed" in line:
            first.send_signal(signal.SIGKILL)  # the driver only: Ray must clean up the workers itself
            break
    first.wait(60)
    assert any("checkpoint step 4 committed" in line for line in seen), "".join(seen[-40:])
    orphans_gone = _wait_for_training_exit(first.pid, 60)
    # Ray's idle per-node agents outlive a SIGKILLed driver; reap them so tests stay independent
    try:
        os.killpg(first.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    second = subprocess.run(cmd, cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=600)
    return {"run": storage / "e2e", "first": "".join(seen), "second": second, "orphans_gone": orphans_gone}


def test_driver_sigkill_leaves_no_training_behind(killed_and_resumed):
    assert killed_and_resumed["orphans_gone"], "Ray Train workers of the killed driver kept running"


def test_rerun_resumes_and_finishes(killed_and_resumed):
    second = killed_and_resumed["second"]
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    resumed = [line for line in out.splitlines() if "resumed at step" in line]
    assert resumed and int(resumed[0].split("resumed at step ")[1].split("/")[0]) >= 4, out[-3000:]
    assert "step 12/12" in out and "checkpoint step 12 committed" in out
    run = killed_and_resumed["run"]
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps[-1] == "step_00000012" and len(steps) == 2  # keep_last
    commit = json.loads((run / "checkpoints" / "step_00000012" / "commit.json").read_text())
    assert {"mp_rank_00_model_states.pt", "rank_0.pt", "rank_1.pt", "trainer.json"} <= set(commit["files"])


def test_predictions_and_metrics_are_official(killed_and_resumed, sample_shards):
    run = killed_and_resumed["run"]
    predictions = load_jsonl(run / "predictions_val.jsonl")
    assert len(predictions) == 400 and len({p["qid"] for p in predictions}) == 400
    assert set(predictions[0]) == {"qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"}
    metrics = json.loads((run / "metrics_val.json").read_text())
    assert metrics.pop("step") == 12
    truths = load_jsonl(sample_shards.parent / "qvhighlights_sample" / "val.jsonl")
    assert json.loads(json.dumps(evaluate(predictions, truths))) == metrics


def test_tensorboard_has_scalars_and_mask_images(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(killed_and_resumed["run"] / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/data_wait_share",
                "val/MR-full-mAP", "val/HL-min-VeryGood-mAP", "perf/checkpoint_save_s"):
        assert tag in tags["scalars"], tags["scalars"]
    assert {"lam_mask/layer_0", "lam_mask/layer_1"} <= set(tags["images"])
    assert acc.Scalars("train/loss")[-1].step == 12
    image = acc.Images("lam_mask/layer_1")[-1]
    assert image.width == image.height > 10
