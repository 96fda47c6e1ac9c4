"""A real grounding run (movie-level shards, each val sentence against its whole movie) under ZeRO-3 with
every parameter really partitioned (persistence threshold 0) through training, eval, mask images, save and
a bit-exact resume. (ZeRO-1 with bf16 runs in test_preemption.py; moment retrieval's kill/resume and
`lamscale eval` in test_train_e2e.py.) Both runs go to conftest's shared `ray start --head`, the resumed one
beside the reference from the moment the reference has committed step 4."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import reference_and_resumed

pytestmark = pytest.mark.slow
# one val shard: two movies (6,000 and 3,000 frames, 18 sentences), each sentence a forward over its movie
SHORT = ["train.eval_every=100", "train.ckpt_every=2", "train.log_every=1", "data.batch_size=8",
         "data.val=shards/mad_sample/val-{000000..000000}.tar"]


def scalars(run, tag):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {e.step: e.value for e in acc.Scalars(tag)}


def test_zero3_grounding_partitions_trains_evaluates_whole_movies_and_resumes_bit_exact(repo_root, mad_shards,
                                                                                         tmp_path, ray_cluster):
    z3 = ["train.zero_stage=3", "train.zero3_param_persistence=0", "train.precision=fp32", "train.keep_last=3"]
    reference, out = reference_and_resumed(repo_root, "configs/mad_sample.yaml", tmp_path, ray_cluster.gcs_address,
                                           [*SHORT, *z3, "train.max_steps=6"])
    resumed = tmp_path / "resumed"
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
