import math

import numpy as np
import torch

from lamscale.config import MomentRetrievalConfig
from lamscale.data.schema import MomentSample
from lamscale.tasks import moment_retrieval as task
from lamscale.tasks.localization import iou
from lamscale.tasks.qvhighlights_metrics import evaluate


def sample(qid=1, duration=20, windows=((4, 10),), clips=(2, 3, 4), scores=((4, 4, 4), (2, 2, 1), (0, 1, 0))):
    meta = {"qid": qid, "vid": f"v{qid}", "query": "q", "duration": duration, "clip_len": 2.0,
            "relevant_windows": [list(w) for w in windows], "relevant_clip_ids": list(clips),
            "saliency_scores": [list(s) for s in scores]}
    n = math.ceil(duration / 2)
    return MomentSample(f"qid{qid}", meta, np.zeros((n, 6), np.float16), np.zeros((3, 4), np.float16))


def perfect_outputs(batch: task.MomentBatch) -> dict[str, torch.Tensor]:
    fg = batch.foreground
    return {"fg_logits": (fg * 2 - 1) * 20, "offsets": batch.offsets.clone(), "saliency": batch.saliency.clone()}


def test_collate_targets():
    batch = task.collate([sample(), sample(2, duration=8, windows=((0, 2),), clips=(0,), scores=((1, 1, 1),))], 12, 5)
    assert batch.video.shape == (2, 12, 6) and batch.text.shape == (2, 5, 4)
    assert batch.video_valid[0].sum() == 10 and batch.video_valid[1].sum() == 4
    assert batch.foreground[0].nonzero().flatten().tolist() == [2, 3, 4]
    span = 12 * 2.0
    assert torch.allclose(batch.offsets[0, 3], torch.tensor([(7 - 4) / span, (10 - 7) / span]))
    assert batch.saliency[0, 2] == 4 and batch.saliency[0, 0] == -1


def test_perfect_predictions_have_low_loss_and_full_metrics():
    cfg = MomentRetrievalConfig()
    samples = [sample(), sample(2, duration=30, windows=((10, 20),), clips=(5, 6, 7, 8, 9), scores=((3, 3, 3),) * 5)]
    batch = task.collate(samples, 15, 3)
    out = perfect_outputs(batch)
    loss, parts = task.losses(out, batch, cfg)
    assert parts["l1"] < 1e-6 and parts["giou"] < 1e-5 and parts["focal"] < 1e-6
    predictions = task.decode(out, batch, cfg)
    assert predictions[0]["pred_relevant_windows"][0][:2] == [4.0, 10.0]
    assert len(predictions[1]["pred_saliency_scores"]) == 15
    truths = [task.ground_truth(s.meta) for s in samples]
    assert evaluate(predictions, truths)["brief"]["MR-full-R1@0.7"] == 100.0


def test_decode_windows_stay_inside_the_video_and_are_suppressed():
    cfg = MomentRetrievalConfig(max_windows=3, nms_iou=0.5)
    batch = task.collate([sample(duration=40)], 20, 3)
    out = {"fg_logits": torch.randn(1, 20), "offsets": torch.rand(1, 20, 2), "saliency": torch.randn(1, 20)}
    windows = task.decode(out, batch, cfg)[0]["pred_relevant_windows"]
    assert 1 <= len(windows) <= 3
    assert all(0 <= s < e <= 40 for s, e, _ in windows)
    assert [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    for i in range(len(windows)):
        for j in range(i):
            assert iou(windows[i], windows[j]) <= 0.5


def test_losses_backpropagate():
    cfg = MomentRetrievalConfig()
    batch = task.collate([sample(), sample(3)], 12, 3)
    out = {k: torch.randn(*v.shape, requires_grad=True) for k, v in perfect_outputs(batch).items()}
    out["offsets"] = out["offsets"].abs()
    loss, parts = task.losses(out, batch, cfg)
    loss.backward()
    assert torch.isfinite(loss) and all(v >= 0 for v in parts.values())


def test_random_predictions_are_valid_submissions():
    truths = [task.ground_truth(sample(q).meta) for q in range(1, 6)]
    preds = task.random_predictions(truths, MomentRetrievalConfig(), 2.0)
    metrics = evaluate(preds, truths)
    assert 0 <= metrics["brief"]["MR-full-mAP"] < 100


def test_ranking_loss_hand_computed():
    """scores (0, .25, .5), saliency (2, unannotated, 1), margin .5: background pairs (0,1) → .75 and
    (2,1) → .25 average to .5; the one pair inside the moment (0,2) → 1.0; total 1.5."""
    from lamscale.tasks.moment_retrieval import _ranking_loss

    scores = torch.tensor([[0.0, 0.25, 0.5]])
    target = torch.tensor([[2.0, -1.0, 1.0]])
    loss = _ranking_loss(scores, target, torch.ones(1, 3, dtype=torch.bool), margin=0.5)
    assert float(loss) == 1.5


def test_ranking_loss_on_a_movie_is_not_quadratic():
    """T = 6000 clips: no tensor of T² elements, and perfectly ordered scores with the margin met cost 0."""
    from conftest import NumelRecorder
    from lamscale.tasks.moment_retrieval import _ranking_loss

    T = 6000
    target = torch.full((1, T), -1.0)
    target[0, 100:160] = torch.linspace(0, 4, 60)
    scores = (target * 10).requires_grad_()
    with NumelRecorder() as rec:
        loss = _ranking_loss(scores, target, torch.ones(1, T, dtype=torch.bool), margin=0.2)
        loss.backward()
    assert float(loss) == 0.0 and rec.max_numel < T * T // 8
    bad = _ranking_loss(-target * 10, target, torch.ones(1, T, dtype=torch.bool), margin=0.2)
    assert float(bad) > 1.0  # reversed order is penalised by the sampled pairs too


def test_nms_equals_the_greedy_definition_on_random_windows():
    """Against the definition, written out pair by pair: best score first, drop a row whose IoU with any kept
    row exceeds the threshold, stop at `keep` (ties in score keep their input order)."""
    import random

    from lamscale.tasks.localization import iou, nms

    rng = random.Random(0)
    for trial in range(200):
        rows = []
        for _ in range(rng.randrange(1, 40)):
            start = round(rng.uniform(0, 50), 2)
            rows.append([start, round(start + rng.uniform(0.5, 20), 2), round(rng.choice([0.5, rng.random()]), 4)])
        threshold, keep = rng.choice([0.0, 0.3, 0.5, 0.7]), rng.randrange(1, 12)
        expected = []
        for row in sorted(rows, key=lambda r: -r[2]):  # sorted() is stable: ties keep their input order
            if all(iou(row, k) <= threshold for k in expected):
                expected.append(row)
            if len(expected) == keep:
                break
        assert nms(rows, threshold, keep) == expected, (trial, rows, threshold, keep)
