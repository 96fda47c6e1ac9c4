"""MAD R@k x IoU metrics against hand-computed cases, in both conventions.

The references compute IoU and recall in float32 (torch `.float()`): the arithmetic in the comments
says where that decides a case. IOUS = (0.1, 0.3, 0.5, 0.7); a row below is one k over the 4 IoUs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lamscale_env
from lamscale.tasks.mad_metrics import IOUS, RECALLS, cell, evaluate, evaluate_both, load_jsonl


def _gt(qid: str, start: float, end: float) -> dict:
    return {"query_id": qid, "timestamps": [start, end]}


def _pred(qid: str, *windows: list, scores: list | None = None) -> dict:
    rec: dict = {"query_id": qid, "predicted_times": [list(w) for w in windows]}
    rec["predicted_scores"] = scores if scores is not None else [1.0 - i / 1000 for i in range(len(windows))]
    return rec


def _row(table: dict, k: int) -> list[float]:
    return [table[cell(k, t)] for t in IOUS]


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MISS = [50, 60]  # against a ground truth [0, 10]: no overlap, IoU 0


@pytest.mark.parametrize("t", IOUS)
def test_iou_exactly_at_a_threshold_hits_official_but_not_cone(t: float) -> None:
    # gt [0, 10], pred [0, 10t] with 10t in {1, 3, 5, 7}: IoU = 10t / 10, and the float32 division
    # of two exact integers is float32(t), the very threshold: official (>=) hits, cone (>) misses.
    both = evaluate_both([_pred("q", [0, round(10 * t)])], [_gt("q", 0, 10)])
    j = IOUS.index(t)
    assert _row(both["official"], 1) == [100.0] * (j + 1) + [0.0] * (3 - j)
    assert _row(both["cone"], 1) == [100.0] * j + [0.0] * (4 - j)


def test_iou_is_float32_like_the_references() -> None:
    # gt [0, 1], pred [0.2, 0.7]: float64 0.7 - 0.2 = 0.49999999999999994 (< 0.5), but float32
    # 0.7f - 0.2f = 0.5 exactly -> official hits at 0.5 (and cone, strict, does not).
    both = evaluate_both([_pred("q", [0.2, 0.7])], [_gt("q", 0, 1)])
    assert _row(both["official"], 1) == [100.0, 100.0, 100.0, 0.0]
    assert _row(both["cone"], 1) == [100.0, 100.0, 0.0, 0.0]
    # gt [0, 3], pred [0, 0.9]: float64 0.9 / 3 = 0.3 (would hit official 0.3), float32
    # 0.9f / 3f = 0.29999998 < 0.3f -> a miss at 0.3 in both conventions.
    table = evaluate([_pred("q", [0, 0.9])], [_gt("q", 0, 3)])
    assert _row(table, 1) == [100.0, 0.0, 0.0, 0.0]
    # gt [0, 1], pred [0.1, 0.4]: float64 0.30000000000000004 > 0.3, float32 IoU == 0.3f -> cone misses.
    assert _row(evaluate([_pred("q", [0.1, 0.4])], [_gt("q", 0, 1)], "cone"), 1) == [100.0, 0.0, 0.0, 0.0]


def test_first_hit_rank_sets_which_k_count_and_only_100_are_read() -> None:
    gt = [_gt("q", 0, 10)]
    # exact hit (IoU 1) at 0-based rank r: R@k counts it iff r < k
    for rank, want in [(0, [1, 1, 1, 1, 1]), (4, [0, 1, 1, 1, 1]), (6, [0, 0, 1, 1, 1]),
                       (50, [0, 0, 0, 0, 1]), (99, [0, 0, 0, 0, 1]), (100, [0, 0, 0, 0, 0])]:
        windows = [MISS] * rank + [[0, 10]] + [MISS] * 20  # 121+ proposals; rank 100 is the 101st
        for conv in ("official", "cone"):
            table = evaluate([_pred("q", *windows)], gt, conv)
            assert [table[cell(k, 0.7)] for k in RECALLS] == [100.0 * w for w in want], (rank, conv)


def test_fewer_than_k_proposals_count_the_missing_ones_as_misses() -> None:
    gt = [_gt("q", 0, 10)]
    # 2 proposals, hit [0, 5] (IoU 0.5) second: R@1 nothing; R@5..100 see it; 3 more do not exist
    both = evaluate_both([_pred("q", MISS, [0, 5])], gt)
    assert _row(both["official"], 1) == [0.0] * 4
    for k in RECALLS[1:]:
        assert _row(both["official"], k) == [100.0, 100.0, 100.0, 0.0]
        assert _row(both["cone"], k) == [100.0, 100.0, 0.0, 0.0]  # 0.5 > 0.5 is false
    # no proposal at all: every cell 0 (CONE's script would crash on the empty list)
    both = evaluate_both([_pred("q")], gt)
    assert {v for c in both.values() for k, v in c.items() if k != "brief"} == {0.0}


def test_ties_in_iou_and_in_scores() -> None:
    gt = [_gt("q", 0, 10)]
    # two proposals with the same IoU 0.5 ([0, 5] and [5, 10]): one hit is a hit, no double count
    assert _row(evaluate([_pred("q", [0, 5], [5, 10])], gt), 1) == [100.0, 100.0, 100.0, 0.0]
    # equal scores: the file order stands (stable sort): hit first -> R@1 100, hit second -> 0
    assert evaluate([_pred("q", [0, 10], MISS, scores=[0.5, 0.5])], gt)[cell(1, 0.7)] == 100.0
    assert evaluate([_pred("q", MISS, [0, 10], scores=[0.5, 0.5])], gt)[cell(1, 0.7)] == 0.0
    # scores out of file order: official ranks by score (hit scored 0.9 first), cone keeps the file order
    both = evaluate_both([_pred("q", MISS, [0, 10], scores=[0.1, 0.9])], gt)
    assert both["official"][cell(1, 0.7)] == 100.0 and both["cone"][cell(1, 0.7)] == 0.0
    assert both["official"][cell(5, 0.7)] == both["cone"][cell(5, 0.7)] == 100.0


def test_several_queries_are_averaged_and_rounded_like_the_references() -> None:
    gt = [_gt("a", 0, 10), _gt("b", 0, 10), _gt("c", 0, 10)]
    preds = [_pred("a", [0, 10]),                 # rank 0, IoU 1
             _pred("b", MISS, MISS, [0, 8]),      # rank 2, IoU 0.8
             _pred("c", [0, 2], MISS)]            # IoU 0.2 at rank 0: hits 0.1 only
    table = evaluate(preds, gt)
    # R@1: a and c at 0.1 (2/3), a alone above (1/3); float32 2/3*100 = 66.66667 -> 66.67, 1/3 -> 33.33
    assert _row(table, 1) == [66.67, 33.33, 33.33, 33.33]
    # R@5: b joins: 3/3 at 0.1, 2/3 at 0.3, 0.5, 0.7
    assert _row(table, 5) == [100.0, 66.67, 66.67, 66.67]
    assert table["brief"] == {"R1@0.3": 33.33, "R5@0.3": 66.67, "R1@0.5": 33.33, "R5@0.5": 66.67}
    # 47 hits of 160 queries: float64 29.375 prints 29.38, but the references divide in float32:
    # float32(47 / 160) * 100 = 29.374998 -> "29.37"
    gt = [_gt(f"q{i}", 0, 10) for i in range(160)]
    preds = [_pred(f"q{i}", [0, 10] if i < 47 else MISS) for i in range(160)]
    assert evaluate(preds, gt, "cone")[cell(1, 0.5)] == 29.37


def test_query_without_prediction_is_all_misses_officially_and_an_error_for_cone() -> None:
    gt = [_gt("a", 0, 10), _gt("b", 0, 10)]
    preds = [_pred("a", [0, 10])]
    # MAD evaluates every dataset query: 1 hit / 2 queries
    assert _row(evaluate(preds, gt), 1) == [50.0] * 4
    with pytest.raises(ValueError, match=r"query_id 'b' has no prediction \(1 missing\).*CONE"):
        evaluate(preds, gt, "cone")


def test_cone_rows_with_extra_scores_are_read_like_cone() -> None:
    # CONE's inference writes [start, end, proposal, matching, fusion] rows and no predicted_scores
    pred = {"query_id": "q", "predicted_times": [[50, 60, 0.9, 0.8, 1.7], [0, 10, 0.5, 0.4, 0.9]]}
    both = evaluate_both([pred], [_gt("q", 0, 10)])
    assert both["official"][cell(1, 0.7)] == both["cone"][cell(1, 0.7)] == 0.0  # file order: miss first
    assert both["official"][cell(5, 0.7)] == 100.0


@pytest.mark.parametrize("text, kind, line, says", [
    ('{"query_id": "a", "timestamps": [0, 1]}\n\nnot json\n', "truths", 3, "not JSON Lines"),
    ('{"query_id": "a", "timestamps": [0, 1]}\n{"timestamps": [0, 1]}\n', "truths", 2, "missing 'query_id'"),
    ('{"query_id": "a", "timestamps": [5, 5]}\n', "truths", 1, "query_id 'a': 'timestamps' [5, 5] must have end > start"),
    ('{"query_id": "a", "timestamps": [0]}\n', "truths", 1, "'timestamps' must be [start, end]"),
    ('{"query_id": "a"}\n', "predictions", 1, "query_id 'a': missing 'predicted_times'"),
    ('{"query_id": "a", "predicted_times": [[0, "x"]]}\n', "predictions", 1, "must be a list of [start, end, ...]"),
    ('{"query_id": "a", "predicted_times": [[3, 1]]}\n', "predictions", 1, "window [3, 1] has end < start"),
    ('{"query_id": "a", "predicted_times": [[0, 1]], "predicted_scores": [1, 2]}\n', "predictions", 1,
     "'predicted_scores' must hold one finite number per predicted window (1)"),
    ('{"query_id": "a", "predicted_times": [[0, 1]], "predicted_scores": [[1], [1, 2]]}\n', "predictions", 1,
     "'predicted_scores' must hold one finite number per predicted window (1)"),
    ('{"query_id": 1.5, "predicted_times": []}\n', "predictions", 1, "'query_id' must be a string or integer"),
    ('{"query_id": "a", "predicted_times": []}\n\n{"query_id": "a", "predicted_times": []}\n', None, 3,
     "query_id 'a' appears again (first at "),
])
def test_bad_input_is_one_line_naming_file_line_and_expectation(tmp_path: Path, text: str, kind: str | None,
                                                                 line: int, says: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_jsonl(path, kind)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{line}: ") and says in msg, msg
    assert "expected" in msg, msg


def test_prediction_for_an_unknown_query_names_it() -> None:
    with pytest.raises(ValueError, match=r"^P: query_id 'zz' is not in G \(1 such\); expected"):
        evaluate([_pred("zz", [0, 1])], [_gt("a", 0, 1)], names=("P", "G"))


def test_cli_prints_both_tables_and_one_convention(repo_root: Path, tmp_path: Path, capsys) -> None:
    gt = _write(tmp_path / "gt.jsonl", [_gt("a", 0, 10), _gt("b", 0, 10)])
    preds = _write(tmp_path / "preds.jsonl", [_pred("a", [0, 3]), _pred("b", MISS, [0, 10])])
    # the subprocess spends seconds importing: the in-process checks run meanwhile
    proc = subprocess.Popen([sys.executable, "-m", "lamscale", "metrics", "mad", "--preds", str(preds), "--gt", str(gt)],
                            cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from lamscale.cli import main

    assert main(["metrics", "mad", "--preds", str(preds), "--gt", str(gt), "--convention", "cone"]) == 0
    cone_only = json.loads(capsys.readouterr().out)
    bad = _write(tmp_path / "bad.jsonl", [_pred("zz", [0, 1])])
    assert main(["metrics", "mad", "--preds", str(bad), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: query_id 'zz' is not in {gt}" in err, err

    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    tables = json.loads(stdout)
    assert list(tables) == ["official", "cone"] and cone_only == {"cone": tables["cone"]}
    # a: IoU 0.3 at rank 0; b: IoU 1 at rank 1
    assert _row(tables["official"], 1) == [50.0, 50.0, 0.0, 0.0]
    assert _row(tables["cone"], 1) == [50.0, 0.0, 0.0, 0.0]
    assert _row(tables["official"], 5) == [100.0, 100.0, 50.0, 50.0]
    assert _row(tables["cone"], 5) == [100.0, 50.0, 50.0, 50.0]
