"""A real captioning run on 2 Ray workers (the embedded sample): generated captions scored by pycocoevalcap,
written as predictions and as TensorBoard text at each eval, and a bit-exact resume from a checkpoint. Both
runs go to conftest's shared `ray start --head`, the resumed one beside the reference once it has committed
step 4 (as test_engine_variants.py does)."""
import json
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import lamscale_env
from test_engine_variants import finish, wait_for

pytestmark = pytest.mark.slow
SHORT = ["train.max_steps=6", "train.eval_every=100", "train.ckpt_every=2", "train.log_every=1", "train.keep_last=3",
         "data.batch_size=8", "data.val=shards/caption_sample/val-{000000..000000}.tar"]


def train(repo_root, storage, address, name):
    """Start a run; its output goes to a file (two runs at once: neither may block on an unread pipe)."""
    log = storage / f"{name}.out"
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/captioning_sample.yaml", f"run.storage={storage}",
           *SHORT, f"run.name={name}", "--address", address]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=f, stderr=subprocess.STDOUT, text=True), log


def events(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_captioning_trains_generates_scores_and_resumes_bit_exact(repo_root, tmp_path, ray_cluster):
    first, second = train(repo_root, tmp_path, ray_cluster.gcs_address, "reference"), None
    try:
        # a run that stopped at the reference's step-4 commit (its config and that checkpoint, nothing else)
        # resumes beside it while the reference trains on and evaluates
        assert wait_for(first, "checkpoint step 4 committed"), first[1].read_text()[-3000:]
        resumed = tmp_path / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "reference" / "config.yaml", resumed / "config.yaml")
        shutil.copytree(tmp_path / "reference" / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
        second = train(repo_root, tmp_path, ray_cluster.gcs_address, "resumed")
        reference, out = finish(first), finish(second)
    finally:
        for proc, _ in filter(None, (first, second)):
            if proc.poll() is None:
                proc.kill()
    assert "eval @ 6: CIDEr" in reference and "(most frequent caption 2." in reference, reference[-3000:]
    assert "resumed at step 4/6" in out and "checkpoint step 6 committed" in out, out[-3000:]
    want = {e.step: e.value for e in events(tmp_path / "reference").Scalars("train/loss")}
    got = {e.step: e.value for e in events(resumed).Scalars("train/loss")}
    assert sorted(want) == list(range(1, 7)) and got == {5: want[5], 6: want[6]}  # after the resume: bit for bit
    metrics = [json.loads((run / "metrics_val.json").read_text()) for run in (tmp_path / "reference", resumed)]
    assert metrics[0] == metrics[1] and metrics[0]["step"] == 6
    assert set(metrics[0]["brief"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    chance = json.loads((tmp_path / "reference" / "metrics_val_random.json").read_text())
    assert set(chance["brief"]) == set(metrics[0]["brief"])  # the most frequent training caption, same metric code
    predictions = [json.loads(x) for x in (resumed / "predictions_val.jsonl").read_text().splitlines()]
    val_videos = json.loads((repo_root / "shards/caption_sample/manifest.json").read_text())["splits"]["val"]["shards"][0]["samples"]
    assert len(predictions) == val_videos and all(set(p) == {"image_id", "caption"} for p in predictions)
    # TensorBoard: a few val videos' generated and reference captions as text, at the eval's step
    text = events(tmp_path / "reference").Tensors("captions/val/text_summary")
    assert [t.step for t in text] == [6]
    table = text[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| video | generated | reference(s) |") and len(table.splitlines()) == 2 + 6
    assert f"| {predictions[0]['image_id']} | {predictions[0]['caption']} |" in table  # the first val videos
