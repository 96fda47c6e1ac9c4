"""MAD long-form grounding metrics: Recall@{1,5,10,50,100} x IoU{0.1,0.3,0.5,0.7}, two conventions.

Re-implemented (numpy only, no torch) from the reference code, read in these versions:

* ``official`` -- Soldelli/MAD @ a815cd808528055d572db44188464a7c86f11656:
  ``baselines/VLG-Net/lib/engine/evaluation.py`` (``evaluate``, ``nms``, ``pretty_print_results``)
  and the ``iou`` it calls, ``baselines/VLG-Net/lib/data/datasets/utils.py``.
* ``cone`` -- houzhijian/CONE @ 9e22af4167ccf6b2786a902eb25e8db7215bd7fa:
  ``standalone_eval/evaluate_mad.py`` (``evaluate_nlq_performance``, ``_iou``, ``display_results``);
  formats from ``cone/inference.py`` @ 512f3fd41c4f91ac0776383b798089b0a35498c8 (it writes
  ``predicted_times`` rows ``[s, e, score, ...]``) and ``data/reformat_data.py`` (ground truth
  ``{"query_id", "timestamps": [s, e], "duration", ...}``).

Both references, kept here:

* IoU = max(0, min(e, e') - max(s, s')) / (max(e, e') - min(s, s')), all in float32 (torch
  ``.float()``), compared with a float32 tensor of thresholds: we compute in float32 too, so an IoU
  of exactly 3/10 equals the 0.3 threshold, as in the references.
* A query hits at (k, t) when any of its first k proposals passes t. With fewer than k proposals
  the missing ones are misses (official pads the IoUs with 0 up to 100; CONE slices ``[:k]``).
  Only the first 100 proposals are read.
* Recall = hits summed over queries / number of queries, in float32, then x100 and printed with
  ``%.2f``: we return that number, ``float("%.2f" % pct)``.

Where they differ:

* ``official``: IoU >= t. Proposals ranked by score, descending (``scores.sort``): by
  ``predicted_scores`` when given (ties keep the file order; torch leaves tie order unspecified),
  else in file order. Every ground-truth query is evaluated (MAD scores each dataset item) and the
  recall divides by their number: a query without a prediction counts as all misses.
* ``cone``: IoU > t (strict). ``predicted_times`` in file order, scores ignored. The query_ids of
  predictions and ground truth must be the same set (its ``assert``): a ground-truth query without a
  prediction raises ValueError.

Neither applies NMS here: it belongs to producing the predictions (MAD's VLG-Net does it inside its
evaluation from raw proposal scores, CONE in its inference; our task keeps the top 100 after NMS at
IoU 0.3). An empty ``predicted_times`` list scores no hit (CONE's script would crash on it). Bad
input -- not JSON lines, a missing or malformed key, a window with end < start, a query_id twice, a
prediction for an unknown query -- raises ValueError with one line saying where and what is expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from lamscale.tasks.qvhighlights_metrics import load_jsonl as _read_json_lines

RECALLS: tuple[int, ...] = (1, 5, 10, 50, 100)
IOUS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
CONVENTIONS: tuple[str, ...] = ("official", "cone")
# The headline numbers the trainer logs: name -> (k, IoU threshold).
BRIEF: dict[str, tuple[int, float]] = {"R1@0.3": (1, 0.3), "R5@0.3": (5, 0.3),
                                       "R1@0.5": (1, 0.5), "R5@0.5": (5, 0.5)}
_THRESHOLDS32 = np.asarray(IOUS, dtype=np.float32)  # torch.tensor(thresholds) is float32
_KINDS = {"predictions": "predicted_times", "truths": "timestamps"}
_PRED_SHAPE = "a list of [start, end, ...] in seconds, best first"


def cell(k: int, iou: float) -> str:
    """Key of one table cell, e.g. 'R@1,IoU=0.3'."""
    return f"R@{k},IoU={iou}"


class _Bad(ValueError):
    """A record's problem; the caller prefixes where the record is."""


def _pairs32(value: Any, what: str, shape: str = _PRED_SHAPE) -> np.ndarray:
    # [[s, e, ...], ...] -> (n, 2) float32, as torch.tensor(...).float() holds them.
    try:
        if not isinstance(value, list) or any(not isinstance(w, list) or len(w) < 2 for w in value):
            raise TypeError
        arr = np.array([w[:2] for w in value], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError, OverflowError):
        raise _Bad(f"'{what}' must be {shape}") from None
    if not np.isfinite(arr).all():
        raise _Bad(f"'{what}' has a non-finite time; expected seconds")
    bad = np.flatnonzero(arr[:, 1] < arr[:, 0])
    if bad.size:
        raise _Bad(f"'{what}' window {value[bad[0]][:2]!r} has end < start")
    return arr.astype(np.float32)


def _parse(rec: Any, kind: str) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """(query_id, float32 windows, float32 scores or None) of one record, or _Bad."""
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
    if "query_id" not in rec:
        raise _Bad("missing 'query_id'")
    qid = rec["query_id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise _Bad(f"'query_id' must be a string or integer, got {qid!r}")
    key = _KINDS[kind]
    if key not in rec:
        raise _Bad(f"query_id {qid!r}: missing '{key}'")
    try:
        if kind == "truths":
            ts = rec[key]
            shape = f"[start, end] in seconds, got {ts!r}"
            if not isinstance(ts, list) or len(ts) != 2:
                raise _Bad(f"'{key}' must be {shape}")
            windows = _pairs32([ts], key, shape)
            if not windows[0, 1] > windows[0, 0]:
                raise _Bad(f"'{key}' {ts!r} must have end > start")
            return qid, windows[0], None
        windows = _pairs32(rec[key], key)
        scores = rec.get("predicted_scores")
        if scores is not None:
            try:
                arr = np.asarray(scores) if isinstance(scores, list) else np.empty(0)
            except (ValueError, OverflowError):  # ragged nesting
                arr = np.empty(0)
            if arr.shape != (len(windows),) or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
                raise _Bad(f"'predicted_scores' must hold one finite number per predicted window "
                           f"({len(windows)})")
            scores = arr.astype(np.float32)
        return qid, windows, scores
    except _Bad as e:
        raise _Bad(f"query_id {qid!r}: {e}") from None


def _index(records: list, kind: str, where: Callable[[int], str]) -> dict:
    """query_id -> parsed record; any problem raises ValueError prefixed by where(i)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    out: dict = {}
    first: dict = {}
    for i, rec in enumerate(records):
        try:
            qid, windows, scores = _parse(rec, kind)
        except _Bad as e:
            raise ValueError(f"{where(i)}: {e}; expected {_record_shape(kind)}") from None
        if qid in out:
            raise ValueError(f"{where(i)}: query_id {qid!r} appears again (first at {where(first[qid])}); "
                             "expected one record per query")
        out[qid], first[qid] = (windows, scores), i
    return out


def _record_shape(kind: str) -> str:
    if kind == "truths":
        return '{"query_id": ..., "timestamps": [start, end]} with end > start'
    return '{"query_id": ..., "predicted_times": [[start, end], ...], "predicted_scores": [...]}'


def load_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """Read predictions or ground truth (kind 'predictions' | 'truths'; None: from the first record).

    Every record is checked; a problem raises ValueError naming the file and line.
    """
    rows = _read_json_lines(path)
    if kind is None:
        kind = next((k for k, key in _KINDS.items() if rows and key in rows[0]), "")
        if not kind:
            raise ValueError(f"{path}: expected MAD predictions ({_record_shape('predictions')}) "
                             f"or ground truth ({_record_shape('truths')}) per line")
    with open(path, encoding="utf-8") as f:  # the same line split as the reader: number the records
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    _index(rows, kind, lambda i: f"{path}:{lines[i]}")
    return rows


def _first_hits(windows: np.ndarray, scores: np.ndarray | None, gt: np.ndarray,
                convention: str) -> np.ndarray:
    """Per threshold, the 0-based rank of the first proposal that passes it (inf: none)."""
    if convention == "official" and scores is not None:
        windows = windows[np.argsort(-scores, kind="stable")]
    windows = windows[:RECALLS[-1]]
    if not len(windows):  # no proposal: all misses (argmax has nothing to look at)
        return np.full(len(IOUS), np.inf)
    inter = np.minimum(windows[:, 1], gt[1]) - np.maximum(windows[:, 0], gt[0])
    union = np.maximum(windows[:, 1], gt[1]) - np.minimum(windows[:, 0], gt[0])  # > 0: gt end > start
    iou = np.maximum(inter, np.float32(0)) / union  # float32 throughout, like the references
    passed = iou[:, None] >= _THRESHOLDS32 if convention == "official" else iou[:, None] > _THRESHOLDS32
    return np.where(passed.any(axis=0), passed.argmax(axis=0), np.inf)


def evaluate(predictions: list[dict], truths: list[dict], convention: str = "official",
             names: tuple[str, str] = ("predictions", "ground truth")) -> dict:
    """The 20 cells 'R@k,IoU=t' and 'brief', as percentages with 2 decimals like the references.

    `names` label the two inputs in error lines (the CLI passes the file paths).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    if not truths or not predictions:
        raise ValueError(f"{names[1] if not truths else names[0]}: empty; expected at least one record")
    gt = _index(truths, "truths", lambda i: f"{names[1]} record {i + 1}")
    preds = _index(predictions, "predictions", lambda i: f"{names[0]} record {i + 1}")
    unknown = [q for q in preds if q not in gt]
    if unknown:
        raise ValueError(f"{names[0]}: query_id {unknown[0]!r} is not in {names[1]} ({len(unknown)} such); "
                         "expected predictions only for ground-truth queries")
    missing = [q for q in gt if q not in preds]
    if missing and convention == "cone":
        raise ValueError(f"{names[1]}: query_id {missing[0]!r} has no prediction ({len(missing)} missing); "
                         "CONE's evaluate_mad.py expects one per query (the official convention "
                         "counts them as misses)")
    first = np.full((len(gt), len(IOUS)), np.inf)
    for row, (qid, (gt_window, _)) in enumerate(gt.items()):
        if qid in preds:
            first[row] = _first_hits(*preds[qid], gt_window, convention)
    return _table(first)


def _table(first: np.ndarray) -> dict:
    # float32 like recall_x_iou: hits / queries, then x100; printed "%.2f" by both references.
    n = np.float32(len(first))
    out: dict[str, Any] = {}
    for k in RECALLS:
        for j, t in enumerate(IOUS):
            pct = np.float32(np.count_nonzero(first[:, j] < k)) / n * np.float32(100)
            out[cell(k, t)] = float(f"{float(pct):.2f}")
    out["brief"] = {name: out[cell(k, t)] for name, (k, t) in BRIEF.items()}
    return out


def evaluate_both(predictions: list[dict], truths: list[dict],
                  names: tuple[str, str] = ("predictions", "ground truth")) -> dict[str, dict]:
    """{'official': table, 'cone': table} on the same predictions."""
    return {c: evaluate(predictions, truths, c, names) for c in CONVENTIONS}
