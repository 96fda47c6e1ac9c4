"""A real captioning run on 2 Ray workers (the embedded sample): generated captions scored by pycocoevalcap,
written as predictions and as TensorBoard text at each eval, and a bit-exact resume from a checkpoint. Both
runs go to conftest's shared `ray start --head`, the resumed one beside the reference once it has committed
step 4 (as test_engine_variants.py does)."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import reference_and_resumed

pytestmark = pytest.mark.slow
SHORT = ["train.max_steps=6", "train.eval_every=100", "train.ckpt_every=2", "train.log_every=1", "train.keep_last=3",
         "data.batch_size=8", "data.val=shards/caption_sample/val-{000000..000000}.tar"]


def events(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_captioning_trains_generates_scores_and_resumes_bit_exact(repo_root, tmp_path, ray_cluster):
    reference, out = reference_and_resumed(repo_root, "configs/captioning_sample.yaml", tmp_path,
                                           ray_cluster.gcs_address, SHORT)
    resumed = tmp_path / "resumed"
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
