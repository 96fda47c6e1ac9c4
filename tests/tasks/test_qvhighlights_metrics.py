"""QVHighlights metrics: exact agreement with the official eval output, plus hand-computed cases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lamscale.tasks.qvhighlights_metrics import IOU_THDS, evaluate, load_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qvhighlights"
THD_KEYS = [str(t) for t in IOU_THDS]


def _assert_same(got: object, want: object, path: str = "") -> None:
    """Walk both structures: same keys in the same order, every number exactly equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        assert list(got) == list(want), f"key order at {path or '<root>'}"
        for k in want:
            _assert_same(got[k], want[k], f"{path}/{k}")
    else:
        assert type(got) is float and got == want, f"{path}: got {got!r}, want {want!r}"


def test_sample_predictions_match_official_output() -> None:
    preds = load_jsonl(FIXTURES / "sample_val_preds.jsonl")
    gt = load_jsonl(FIXTURES / "highlight_val_release.jsonl")
    want = json.loads((FIXTURES / "sample_val_preds_metrics_raw.json").read_text())
    got = evaluate(preds, gt)
    _assert_same(got, want)
    assert json.dumps(got, indent=4) == json.dumps(want, indent=4)


def _gt(qid: int, windows: list[list[int]], duration: int = 150) -> dict:
    # Clips inside the windows get [4, 4, 4], everything else 0: one level covers all thresholds.
    ids = sorted({c for s, e in windows for c in range(s // 2, e // 2)})
    return {"qid": qid, "query": "q", "vid": f"v{qid}", "duration": duration,
            "relevant_windows": windows, "relevant_clip_ids": ids,
            "saliency_scores": [[4, 4, 4] for _ in ids]}


def _perfect(gt: dict) -> dict:
    n_clips = gt["duration"] // 2
    saliency = [1.0 if c in gt["relevant_clip_ids"] else 0.0 for c in range(n_clips)]
    windows = [[float(s), float(e), 1.0 - 0.1 * i]
               for i, (s, e) in enumerate(gt["relevant_windows"])]
    return {"qid": gt["qid"], "pred_relevant_windows": windows, "pred_saliency_scores": saliency}


def test_perfect_prediction_scores_100_everywhere() -> None:
    # One query per length range (short, middle, long), one with two GT windows.
    gt = [_gt(1, [[20, 28]]), _gt(2, [[40, 60]]), _gt(3, [[10, 60], [100, 150]])]
    result = evaluate([_perfect(g) for g in gt], gt)
    assert list(result) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood",
                            "full", "long", "middle", "short"]
    assert list(result["brief"]) == [
        "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75",
        "MR-long-mAP", "MR-middle-mAP", "MR-short-mAP",
        "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP", "HL-min-Good-Hit1",
        "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]
    assert list(result["full"]["MR-mAP"]) == THD_KEYS + ["average"]
    assert list(result["full"]["MR-R1"]) == THD_KEYS
    assert THD_KEYS[1] == "0.55" and THD_KEYS[-1] == "0.95"

    def leaves(d: dict) -> list[float]:
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert set(leaves(result)) == {100.0}


def test_r1_uses_first_window_and_map_ranks_by_score() -> None:
    gt = [_gt(7, [[0, 10]])]
    # Submission order puts a miss first (R1 = 0) though the hit scores lower; mAP ranks by
    # score: miss then hit -> precision 1/2 at full recall -> AP 0.5 at every threshold.
    pred = {"qid": 7, "pred_relevant_windows": [[20.0, 30.0, 0.9], [0.0, 10.0, 0.5]]}
    result = evaluate([pred], gt)
    assert result["short"]["MR-R1"] == {k: 0.0 for k in THD_KEYS}
    assert result["short"]["MR-mAP"] == {**{k: 50.0 for k in THD_KEYS}, "average": 50.0}
    assert result["full"] == result["short"]
    # No GT window in (10, 30] or (30, 150]: the official code crashes there; we report NaN.
    assert all(math.isnan(v) for v in result["long"]["MR-mAP"].values())
    assert all(math.isnan(v) for v in result["middle"]["MR-R1"].values())
    assert not any(k.startswith("HL") for k in result["brief"])  # no saliency -> no HL keys


def test_only_first_ten_windows_count_for_map() -> None:
    gt = [_gt(1, [[0, 10]])]
    misses = [[40.0 + 2 * i, 50.0 + 2 * i, 0.1] for i in range(10)]
    pred = {"qid": 1, "pred_relevant_windows": misses + [[0.0, 10.0, 1.0]]}
    assert evaluate([pred], gt)["full"]["MR-mAP"]["average"] == 0.0


def test_highlight_per_annotator_ap_and_max_hit() -> None:
    gt = [{"qid": 5, "duration": 8, "relevant_windows": [[0, 8]],
           "relevant_clip_ids": [0, 1, 2, 3],
           "saliency_scores": [[4, 0, 2], [0, 4, 2], [0, 0, 2], [0, 0, 0]]}]
    pred = {"qid": 5, "pred_saliency_scores": [0.9, 0.1, 0.5, 0.2]}  # ranking: clips 0, 2, 3, 1
    result = evaluate([pred], gt)
    # Fair (>=2): annotator APs 1, 1/4, (1 + 1 + 3/4)/3 -> mean 0.7222.
    # Good/VeryGood: 1, 1/4 and 0 for the annotator with no positive clip -> mean 0.4167.
    # Hit1: clip 0 is positive for annotator 1, and a hit for any annotator counts.
    assert result["HL-min-Fair"] == {"HL-mAP": 72.22, "HL-Hit1": 100.0}
    assert result["HL-min-Good"] == {"HL-mAP": 41.67, "HL-Hit1": 100.0}
    assert result["HL-min-VeryGood"] == {"HL-mAP": 41.67, "HL-Hit1": 100.0}
    assert list(result) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood"]


def test_unknown_prediction_qid_raises() -> None:
    gt = [_gt(1, [[0, 10]])]
    pred = {**_perfect(gt[0]), "qid": 999}
    with pytest.raises(ValueError, match=r"prediction qid 999 is not in the ground truth"):
        evaluate([pred], gt)
    with pytest.raises(ValueError, match=r"ground-truth qid 2 has no prediction"):
        evaluate([_perfect(gt[0])], gt + [_gt(2, [[0, 10]])])
    # match_number=False scores only the shared qids.
    result = evaluate([_perfect(gt[0]), pred], gt + [_gt(2, [[0, 10]])], match_number=False)
    assert result["full"]["MR-mAP"]["average"] == 100.0


def test_empty_or_malformed_windows_raise() -> None:
    gt = [_gt(3, [[0, 10]])]
    # The official code takes pred_relevant_windows[0] for R1 and fails on an empty list.
    empty = {**_perfect(gt[0]), "pred_relevant_windows": []}
    with pytest.raises(ValueError, match=r"qid 3: 'pred_relevant_windows' must be a non-empty"):
        evaluate([empty], gt)
    for window in ([0.0, 10.0], [10.0, 0.0, 1.0], [0.0, "10", 1.0]):
        bad = {**_perfect(gt[0]), "pred_relevant_windows": [window]}
        with pytest.raises(ValueError, match=r"qid 3: malformed window"):
            evaluate([bad], gt)
