"""QVHighlights moment-retrieval (MR) and highlight-detection (HL) metrics.

A clean re-implementation of the official evaluation (`standalone_eval/eval.py` and `utils.py` of
jayleicn/moment_detr): same numbers, same nested key order, computed serially with numpy only.
Details the official code fixes and that we keep on purpose:

* mAP uses the first 10 predicted windows *in submission order*, then ranks them by score (stable).
* R1 uses the first predicted window *in submission order* (not the top-scored one), matched to the
  GT window it overlaps most.
* short/middle/long keep only GT windows of length in (0, 10], (10, 30], (30, 150] and only the
  queries left with at least one; "full" keeps everything unfiltered.
* HL-mAP is averaged over (query, annotator) pairs; HL-Hit1 takes the max over the 3 annotators.
* every number is `float(f"{100 * x:.2f}")`; IoU thresholds are those strings parsed back.

Where the official code would crash (an empty window list, a clip id past the video, ...) we
raise ValueError with one line naming the qid; a length range with no query (a crash there too)
gives NaN instead.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

# Thresholds are round-tripped through "%.2f" like the official code, so 0.55 is the literal 0.55.
IOU_THDS: list[float] = [float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10)]
LENGTH_RANGES: dict[str, tuple[float, float]] = {
    "short": (0, 10), "middle": (10, 30), "long": (30, 150), "full": (0, 150)}
SALIENCY_LEVELS: dict[str, int] = {"Fair": 2, "Good": 3, "VeryGood": 4}
MAX_PRED_WINDOWS = 10
CLIP_SECONDS = 2


def load_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line; anything else raises ValueError naming the file and line."""
    rows, number = [], 0
    with open(path, "r", encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON Lines ({e.msg}); expected one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
                rows.append(row)
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number + 1}: not UTF-8 text; expected JSON Lines") from None
    return rows


def _pct(x: float) -> float:
    # The official rounding: format to 2 decimals, parse back.
    return float(f"{100 * x:.2f}")


# ----------------------------------------------------------------------------- input checks

_NUM_TYPES = (int, float, np.integer, np.floating)  # concrete types: much faster than Real


def _is_num(x: Any) -> bool:
    return isinstance(x, _NUM_TYPES) and not isinstance(x, bool) and math.isfinite(x)


def _index_by_qid(items: list[dict], what: str) -> dict:
    out: dict = {}
    for i, d in enumerate(items):
        if not isinstance(d, dict) or "qid" not in d:
            raise ValueError(f"{what} line {i + 1}: expected a JSON object with a 'qid' key")
        if d["qid"] in out:
            raise ValueError(f"{what} qid {d['qid']!r}: appears twice; expected one entry per qid")
        out[d["qid"]] = d
    return out


def _check_windows(who: str, qid: Any, windows: Any, key: str, width: int) -> None:
    shape = "[start, end, score]" if width == 3 else "[start, end]"
    if not isinstance(windows, list) or not windows:
        raise ValueError(f"{who} qid {qid!r}: '{key}' must be a non-empty list of {shape} windows")
    for w in windows:
        if not (isinstance(w, (list, tuple)) and len(w) == width and all(map(_is_num, w))
                and w[0] <= w[1]):
            raise ValueError(f"{who} qid {qid!r}: malformed window {w!r} in '{key}'; "
                             f"expected {shape} of finite numbers with start <= end")


def _check_saliency(pred: dict, gt: dict) -> None:
    qid = pred["qid"]
    scores = pred.get("pred_saliency_scores")
    try:
        arr = np.asarray(scores) if isinstance(scores, list) else np.empty(0)
    except ValueError:  # ragged nesting
        arr = np.empty(0)
    if arr.ndim != 1 or not arr.size or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
        raise ValueError(f"prediction qid {qid!r}: 'pred_saliency_scores' must be a non-empty "
                         f"list of finite numbers, one per {CLIP_SECONDS} s clip")
    n_clips = int(gt.get("duration", 0) / CLIP_SECONDS)
    ids, sal = gt.get("relevant_clip_ids", []), gt.get("saliency_scores", [])
    if n_clips < 1 or len(ids) != len(sal) or any(not 0 <= i < n_clips for i in ids) \
            or any(not isinstance(s, list) or len(s) != 3 for s in sal):
        raise ValueError(f"ground-truth qid {qid!r}: expected a duration of at least "
                         f"{CLIP_SECONDS} s, relevant_clip_ids in [0, {n_clips}) and one "
                         f"[a1, a2, a3] saliency triple per clip id")


def _match_qids(preds: list[dict], gts: list[dict], match_number: bool
                ) -> tuple[list[dict], list[dict]]:
    pred_by_qid = _index_by_qid(preds, "prediction")
    gt_by_qid = _index_by_qid(gts, "ground-truth")
    if match_number:
        for qid in pred_by_qid:
            if qid not in gt_by_qid:
                raise ValueError(f"prediction qid {qid!r} is not in the ground truth; expected "
                                 f"the same qids (or pass match_number=False)")
        missing = [q for q in gt_by_qid if q not in pred_by_qid]
        if missing:
            raise ValueError(f"ground-truth qid {missing[0]!r} has no prediction ({len(missing)} "
                             f"missing); expected the same qids (or pass match_number=False)")
        return preds, gts
    preds = [d for d in preds if d["qid"] in gt_by_qid]
    gts = [d for d in gts if d["qid"] in pred_by_qid]
    if not preds:
        raise ValueError("no prediction qid is in the ground truth; expected shared qids")
    return preds, gts


# ----------------------------------------------------------------------------- IoU and AP

def _iou_cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 2) x (M, 2) -> (N, M) true IoU; 0/0 stays NaN as in the official code."""
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    right = np.minimum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(right - left, 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _iou_paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU; the official divides by the hull, equal to the union whenever they overlap."""
    inter = np.maximum(0, np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]))
    hull = np.maximum(a[:, 1], b[:, 1]) - np.minimum(a[:, 0], b[:, 0])
    return np.divide(inter, hull, out=np.zeros_like(inter), where=hull != 0)


def _voc_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Interpolated AP (VOC 2011) of each (T, K) row: precision envelope over recall steps."""
    pad = np.zeros((len(precision), 1))
    prec = np.hstack([pad, precision, pad])
    rec = np.hstack([pad, recall, pad + 1])
    envelope = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    steps = (rec[:, 1:] - rec[:, :-1]) * envelope[:, 1:]
    changed = rec[:, 1:] != rec[:, :-1]
    # Sum only the selected steps, in order, so float rounding matches the official exactly.
    return np.array([np.sum(row[keep]) for row, keep in zip(steps, changed)])


def _detection_ap(gt_windows: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """AP of one query's (K, 3) predictions against its (M, 2) GT windows, per IoU threshold."""
    pred = pred[np.argsort(-pred[:, 2], kind="stable")]  # ties keep submission order
    tp = np.zeros((len(IOU_THDS), len(pred)))
    taken = np.zeros((len(IOU_THDS), len(gt_windows)), dtype=bool)
    all_ious = _iou_cross(pred[:, :2], gt_windows)  # (K, M)
    all_ranked = np.argsort(all_ious, axis=1)[:, ::-1]  # the official's default argsort, reversed
    for k, (ious, ranked) in enumerate(zip(all_ious, all_ranked)):
        for t, thd in enumerate(IOU_THDS):
            for j in ranked:  # greedy: best-overlapping GT window not yet taken at this thd
                if ious[j] < thd:
                    break
                if not taken[t, j]:
                    tp[t, k], taken[t, j] = 1, True
                    break
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(1 - tp, axis=1)
    recall = tp_cum / len(gt_windows)
    precision = tp_cum / (tp_cum + fp_cum)
    return _voc_ap(precision, recall)


def _ranking_ap(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Interpolated AP of a clip ranking: sklearn's precision_recall_curve + the official get_ap."""
    if np.all(y_true == y_true[0]):
        return float(y_true[0] != 0)  # all negative -> 0, all positive -> 1
    order = np.argsort(y_score, kind="mergesort")[::-1]
    score, truth = y_score[order], y_true[order]
    cut = np.append(np.nonzero(np.diff(score))[0], truth.size - 1)  # last index of a score level
    tps = np.cumsum(truth, dtype=np.float64)[cut]
    fps = 1 + cut - tps
    precision = np.append((tps / (tps + fps))[::-1], 1.0)
    recall = np.append((tps / tps[-1])[::-1], 0.0).astype(np.float32)
    precision = np.maximum.accumulate(precision)  # interpolate from high recall downwards
    return float(np.mean(precision[np.nonzero(np.diff(recall))[0]]))


# ----------------------------------------------------------------------------- moment retrieval

def _filter_range(preds: list[dict], gts: list[dict], lo: float, hi: float
                  ) -> tuple[list[dict], list[dict]]:
    if (lo, hi) == LENGTH_RANGES["full"]:
        return preds, gts
    kept = []
    for d in gts:
        windows = [w for w in d["relevant_windows"] if lo < w[1] - w[0] <= hi]
        if windows:
            kept.append({**d, "relevant_windows": windows})
    qids = {d["qid"] for d in kept}
    return [d for d in preds if d["qid"] in qids], kept


def _mr_map(preds: list[dict], gts: list[dict]) -> dict[str, float]:
    if not preds:
        return {**{str(t): math.nan for t in IOU_THDS}, "average": math.nan}
    gt_by_qid = {d["qid"]: np.asarray(d["relevant_windows"], dtype=float) for d in gts}
    ap = np.array([
        _detection_ap(gt_by_qid[d["qid"]],
                      np.asarray(d["pred_relevant_windows"][:MAX_PRED_WINDOWS], dtype=float))
        for d in preds])  # (#queries, #thresholds)
    ap_thds = ap.mean(0)
    out = {str(t): _pct(v) for t, v in zip(IOU_THDS, ap_thds)}
    out["average"] = _pct(np.mean(ap_thds))
    return out


def _mr_r1(preds: list[dict], gts: list[dict]) -> dict[str, float]:
    if not preds:
        return {str(t): math.nan for t in IOU_THDS}
    gt_by_qid = {d["qid"]: d["relevant_windows"] for d in gts}
    top1 = np.array([d["pred_relevant_windows"][0][:2] for d in preds], dtype=float)
    best_gt = []
    for window, d in zip(top1, preds):  # the GT window the top-1 prediction overlaps most
        gt_windows = np.asarray(gt_by_qid[d["qid"]], dtype=float)
        best_gt.append(gt_windows[np.argmax(_iou_cross(window[None], gt_windows)[0])])
    ious = _iou_paired(top1, np.array(best_gt))
    return {str(t): float(f"{np.mean(ious >= t) * 100:.2f}") for t in IOU_THDS}


def _eval_moment_retrieval(preds: list[dict], gts: list[dict]) -> dict[str, dict]:
    out = {}
    for name, (lo, hi) in LENGTH_RANGES.items():
        p, g = _filter_range(preds, gts, lo, hi)
        out[name] = {"MR-mAP": _mr_map(p, g), "MR-R1": _mr_r1(p, g)}
    return out


def _mr_brief(mr: dict[str, dict]) -> dict[str, float]:
    brief = {
        "MR-full-mAP": mr["full"]["MR-mAP"]["average"],
        "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
        "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
        "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
        "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
        "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
        "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
        "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
    }
    return dict(sorted(brief.items()))


# ----------------------------------------------------------------------------- highlight detection

def _gt_saliency(gt: dict) -> np.ndarray:
    """(#clips, 3) annotator scores in [0, 4]; clips outside relevant_clip_ids score 0."""
    scores = np.zeros((int(gt["duration"] / CLIP_SECONDS), 3))
    ids = np.asarray(gt["relevant_clip_ids"], dtype=int)
    if ids.size:
        scores[ids] = np.asarray(gt["saliency_scores"], dtype=float)
    return scores


def _fit_length(scores: np.ndarray, n: int) -> np.ndarray:
    # Extra predicted clips are dropped, missing ones score 0 (as the official does).
    out = np.zeros(n)
    out[:min(n, len(scores))] = scores[:n]
    return out


def _hl_level(preds: list[dict], gt_scores: dict, min_score: int) -> dict[str, float]:
    ap = np.zeros((len(preds), 3))
    hits = np.zeros((len(preds), 3))
    for i, d in enumerate(preds):
        positive = (gt_scores[d["qid"]] >= min_score).astype(float)  # (#clips, 3)
        pred = np.asarray(d["pred_saliency_scores"], dtype=float)
        top = int(np.argmax(pred))
        if top < len(positive):
            hits[i] = positive[top]
        fitted = _fit_length(pred, len(positive))
        ap[i] = [_ranking_ap(positive[:, a], fitted) for a in range(3)]
    # mAP: mean over (query, annotator); Hit1: a hit if any annotator rates the top clip positive.
    return {"HL-mAP": _pct(np.mean(ap)), "HL-Hit1": _pct(np.mean(np.max(hits, 1)))}


def _eval_highlight(preds: list[dict], gts: list[dict]) -> dict[str, dict]:
    gt_scores = {d["qid"]: _gt_saliency(d) for d in gts}
    return {f"HL-min-{name}": _hl_level(preds, gt_scores, level)
            for name, level in SALIENCY_LEVELS.items()}


# ----------------------------------------------------------------------------- entry point

def evaluate(predictions: list[dict], ground_truth: list[dict],
             match_number: bool = True) -> dict:
    """Official QVHighlights metrics, as the ordered dict `standalone_eval/eval.py` writes.

    Which task is scored follows the first prediction, like the official: MR if it has
    'pred_relevant_windows', HL if it has 'pred_saliency_scores'. With match_number=False only the
    qids present in both lists are scored.
    """
    if not predictions:
        raise ValueError("predictions: expected at least one prediction")
    preds, gts = _match_qids(predictions, ground_truth, match_number)
    gt_by_qid = {d["qid"]: d for d in gts}
    metrics: dict[str, dict] = {}
    brief: OrderedDict = OrderedDict()
    if "pred_relevant_windows" in preds[0]:
        for d in preds:
            _check_windows("prediction", d["qid"], d.get("pred_relevant_windows"),
                           "pred_relevant_windows", 3)
        for d in gts:
            _check_windows("ground-truth", d["qid"], d.get("relevant_windows"),
                           "relevant_windows", 2)
        mr = _eval_moment_retrieval(preds, gts)
        metrics.update(mr)
        brief.update(_mr_brief(mr))
    if "pred_saliency_scores" in preds[0]:
        for d in preds:
            _check_saliency(d, gt_by_qid[d["qid"]])
        hl = _eval_highlight(preds, gts)
        metrics.update(hl)
        brief.update((f"{k}-{sub.split('-')[1]}", v) for k, sub_d in hl.items()
                     for sub, v in sub_d.items())
    result: OrderedDict = OrderedDict(brief=brief)
    result.update(sorted(metrics.items()))
    return result
