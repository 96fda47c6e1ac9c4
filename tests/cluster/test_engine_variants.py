"""A real grounding run (movie-level shards, each val sentence against its whole movie) under ZeRO-3 with
every parameter really partitioned (persistence threshold 0) through training, eval, mask images, save and
a bit-exact resume. (ZeRO-1 with bf16 runs in test_preemption.py; moment retrieval's kill/resume and
`lamscale eval` in test_train_e2e.py.) Both runs go to conftest's shared `ray start --head`, the resumed one
beside the reference from the moment the reference has committed step 4."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import lamscale_env

pytestmark = pytest.mark.slow
# one val shard: two movies (6,000 and 3,000 frames, 18 sentences), each sentence a forward over its movie
SHORT = ["train.eval_every=100", "train.ckpt_every=2", "train.log_every=1", "data.batch_size=8",
         "data.val=shards/mad_sample/val-{000000..000000}.tar"]


def train(repo_root, storage, address, *overrides) -> tuple[subprocess.Popen, Path]:
    """Start a run; its output goes to a file (two runs at once: neither may block on an unread pipe)."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
    log = storage / f"{name}.out"
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/mad_sample.yaml", f"run.storage={storage}", *SHORT,
           *overrides, "--address", address]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=f, stderr=subprocess.STDOUT, text=True), log


def wait_for(run: tuple[subprocess.Popen, Path], needle: str, timeout: float = 600) -> bool:
    """True once `needle` is in the run's output; False if the run ends first."""
    proc, log = run
    deadline = time.time() + timeout
    while time.time() < deadline:
        ended = proc.poll() is not None
        if needle in log.read_text():
            return True
        if ended:
            return False
        time.sleep(0.5)
    return False


def finish(run: tuple[subprocess.Popen, Path]) -> str:
    proc, log = run
    proc.wait(600)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def scalars(run, tag):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {e.step: e.value for e in acc.Scalars(tag)}


def test_zero3_grounding_partitions_trains_evaluates_whole_movies_and_resumes_bit_exact(repo_root, mad_shards,
                                                                                         tmp_path, ray_cluster):
    z3 = ["train.zero_stage=3", "train.zero3_param_persistence=0", "train.precision=fp32", "train.keep_last=3"]
    first = train(repo_root, tmp_path, ray_cluster.gcs_address, *z3, "run.name=reference", "train.max_steps=6")
    second = None
    try:
        # once the reference has committed step 4, a run that stopped there (its config and that checkpoint,
        # nothing else) resumes beside it on the shared head while the reference trains on and evaluates
        assert wait_for(first, "checkpoint step 4 committed"), first[1].read_text()[-3000:]
        resumed = tmp_path / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "reference" / "config.yaml", resumed / "config.yaml")
        shutil.copytree(tmp_path / "reference" / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
        second = train(repo_root, tmp_path, ray_cluster.gcs_address, *z3, "run.name=resumed", "train.max_steps=6")
        reference, out = finish(first), finish(second)
    finally:
        for proc, _ in filter(None, (first, second)):
            if proc.poll() is None:
                proc.kill()
    line = next(x for x in reference.splitlines() if "ZeRO-3 shards" in x)
    sharded, total = (int(w) for w in line.split("shards ")[1].split(" parameters")[0].split(" of "))
    assert sharded == total > 20, line  # every parameter is a shard on each rank, none kept whole
    assert "resumed at step 4/6" in out and "checkpoint step 6 committed" in out
    acc, want = scalars(tmp_path / "reference", "train/loss")
    _, got = scalars(resumed, "train/loss")
    assert sorted(want) == list(range(1, 7)) and got == {5: want[5], 6: want[6]}  # after the resume: bit for bit
    # eval and the LAM mask images ran inside the engine's forward, where ZeRO-3 gathers parameters
    image = acc.Images("lam_mask/layer_1")[-1]
    assert image.width == image.height == 512  # a whole movie's tokens, evenly subsampled to 512
    longest = [int(x.split("longest forward N=")[1]) for x in reference.splitlines() if "longest forward N=" in x]
    assert longest and longest[-1] > 6000, reference[-3000:]  # the 6,000-frame movie in one forward
    metrics = [json.loads((run / "metrics_val.json").read_text()) for run in (tmp_path / "reference", resumed)]
    assert metrics[0]["step"] == 6 and metrics[0] == metrics[1]
    predictions = [json.loads(x) for x in (resumed / "predictions_val.jsonl").read_text().splitlines()]
    assert len(predictions) == 18 and all(len(p["predicted_times"]) == len(p["predicted_scores"]) for p in predictions)
