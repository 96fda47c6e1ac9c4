"""Captioning metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), by pycocoevalcap 1.2 as its
``COCOEvalCap.evaluate()`` computes them: the Stanford PTB tokenizer (lower-cased, punctuation
dropped) on the references and on the predictions, then ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and
``Cider()`` over the ground truth's videos, in its order.

SPICE is left out: it needs Stanford CoreNLP models downloaded on first use, which cannot happen here.

Java must be on PATH (the tokenizer and METEOR 1.5 are jars): ``require_java()`` says so in one line.
METEOR starts a JVM that loads its paraphrase tables (~9 s here, ~1 GB resident; a score of a few
hundred videos then takes ~0.2 s); ``evaluate`` kills it when done, and a caller scoring many sets can
pass one from ``meteor_scorer()``, or ``shared_meteor()`` (one per process, kept until it exits). The
tokenizer writes its input to a temporary file in pycocoevalcap's own folder, which must be writable.

Differences from COCOEvalCap, none changing a score of well-formed input: the inputs are checked
first (one prediction per ground-truth video and no other, else ValueError naming the id);
line-breaking characters other than ``\\n`` in a caption become spaces (the Java tokenizer splits
lines at ``\\r``, ``\\f``, ``\\v``, U+2028, which shifted every later caption to the wrong video);
BLEU's prints are kept off stdout. An empty predicted caption is fine and scores 0.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # str.splitlines' set
_PRED_SHAPE = 'a JSON list of {"image_id": id, "caption": str} (COCO captioning results)'
_TRUTH_SHAPE = ('COCO captions {"images": [{"id"}...], "annotations": [{"image_id", "id", "caption"}...]} '
                'or records {"image_id": id, "captions": [str, ...]} as a JSON list or JSON Lines')


def require_java() -> None:
    """Raise RuntimeError (one line) when `java` is not on PATH."""
    if shutil.which("java") is None:
        raise RuntimeError("captioning metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run on it): "
                           "`java` is not on PATH; install OpenJDK (e.g. apt-get install openjdk-17-jre-headless)")


@contextlib.contextmanager
def meteor_scorer() -> Iterator[Meteor]:
    """A METEOR 1.5 scorer whose JVM is killed on exit (pycocoevalcap only stops it in ``__del__``)."""
    require_java()
    meteor = Meteor()
    try:
        yield meteor
    finally:
        _stop(meteor)


def _stop(meteor: Meteor) -> None:
    # __del__ takes the scorer's lock: a compute_score that raised mid-way still holds it, and __del__
    # would block forever. Called twice (again at garbage collection) it does nothing more.
    if meteor.lock.locked():
        meteor.lock.release()
    meteor.__del__()


_SHARED: list[Meteor] = []  # at most one: shared_meteor()'s scorer
atexit.register(lambda: _SHARED and _stop(_SHARED.pop()))


def shared_meteor() -> Meteor:
    """This process's METEOR scorer, for one thread at a time: started on first use and stopped at exit
    (its JVM also exits when the process is killed: its stdin closes). A training run's evals and their
    chance level share it: one JVM start per run instead of two at the first eval and one at every later
    eval. One left mid-score by an error (its lock still held) or whose JVM died is replaced."""
    if _SHARED and (_SHARED[0].lock.locked() or _SHARED[0].meteor_p.poll() is not None):
        _stop(_SHARED.pop())
    if not _SHARED:
        require_java()
        _SHARED.append(Meteor())
    return _SHARED[0]


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _references(truths: list[dict], name: str) -> dict[Any, list[str]]:
    """image_id -> reference captions, in file order; a malformed or repeated record raises ValueError."""
    refs: dict[Any, list[str]] = {}
    for i, rec in enumerate(truths):
        caps = rec.get("captions") if isinstance(rec, dict) else None
        if not (isinstance(rec, dict) and _is_id(rec.get("image_id")) and isinstance(caps, list) and caps
                and all(isinstance(c, str) for c in caps)):
            raise ValueError(f"{name}: record {i} is {json.dumps(rec)[:80]}; expected "
                             '{"image_id": int or str, "captions": [str, ...]} with at least one caption')
        if rec["image_id"] in refs:
            raise ValueError(f"{name}: image_id {rec['image_id']!r} appears twice; expected one record per video")
        refs[rec["image_id"]] = caps
    if not refs:
        raise ValueError(f"{name}: no videos; expected at least one ground-truth record")
    return refs


def _hypotheses(predictions: list[dict], refs: dict[Any, list[str]], names: tuple[str, str]) -> dict[Any, str]:
    """image_id -> the predicted caption: exactly one per ground-truth video, no other ids."""
    hyps: dict[Any, str] = {}
    for i, rec in enumerate(predictions):
        if not (isinstance(rec, dict) and _is_id(rec.get("image_id")) and isinstance(rec.get("caption"), str)):
            raise ValueError(f"{names[0]}: prediction {i} is {json.dumps(rec)[:80]}; expected "
                             '{"image_id": int or str, "caption": str}')
        vid = rec["image_id"]
        if vid not in refs:
            raise ValueError(f"{names[0]}: image_id {vid!r} is not in {names[1]}; expected predictions "
                             "for the ground-truth videos only")
        if vid in hyps:
            raise ValueError(f"{names[0]}: image_id {vid!r} has two predictions; expected exactly one per video")
        hyps[vid] = rec["caption"]
    missing = [vid for vid in refs if vid not in hyps]
    if missing:
        raise ValueError(f"{names[0]}: no prediction for image_id {missing[0]!r} of {names[1]} "
                         f"({len(missing)} videos without one); expected exactly one per video")
    return hyps


def _tokenize(refs: dict[Any, list[str]], hyps: dict[Any, list[str]]) -> tuple[dict, dict]:
    """PTBTokenizer on references and hypotheses in one call (one JVM, not COCOEvalCap's two: it tokenizes
    line by line, so the tokens are the same); its lines are checked against the captions."""
    sides = {(side, vid): caps for side, captions in (("ref", refs), ("hyp", hyps)) for vid, caps in captions.items()}
    tokens = PTBTokenizer().tokenize({key: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps]
                                      for key, caps in sides.items()})
    if any(len(tokens.get(key, ())) != len(caps) for key, caps in sides.items()):  # it zips: lost lines
        raise RuntimeError("pycocoevalcap's PTB tokenizer returned another number of lines than captions given")
    return ({vid: tokens[("ref", vid)] for vid in refs}, {vid: tokens[("hyp", vid)] for vid in hyps})


def evaluate(predictions: list[dict], truths: list[dict], *, meteor: Meteor | None = None,
             names: tuple[str, str] = ("predictions", "truths")) -> dict:
    """The metrics (pycocoevalcap's scale) and ``"brief"``: each x100, rounded to 2 decimals.

    `predictions`: [{"image_id", "caption"}]; `truths`: [{"image_id", "captions": [...]}]; `meteor`: a
    running scorer to reuse (else one is started and stopped); `names` name the two in errors.
    """
    refs = _references(truths, names[1])
    hyps = _hypotheses(predictions, refs, names)
    require_java()
    gts, res = _tokenize(refs, {vid: [hyps[vid]] for vid in refs})
    with contextlib.ExitStack() as stack:
        if meteor is None:
            meteor = stack.enter_context(meteor_scorer())
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts: keep a CLI's JSON clean
            bleu, _ = Bleu(4).compute_score(gts, res)
            scores = [*bleu, meteor.compute_score(gts, res)[0], Rouge().compute_score(gts, res)[0],
                      Cider().compute_score(gts, res)[0]]
    result: dict = {key: float(value) for key, value in zip(METRICS, scores)}
    result["brief"] = {key: round(100 * value, 2) for key, value in result.items()}
    return result


def _read_json(path: str | Path, expected: str) -> Any:
    """One JSON document, else JSON Lines (a list of their values); else ValueError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {expected}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON nor JSON Lines ({e.msg}); expected {expected}") from None


def load_predictions(path: str | Path) -> list[dict]:
    """A COCO captioning results file (JSON list; JSON Lines too), each record checked."""
    data = _read_json(path, _PRED_SHAPE)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}; expected {_PRED_SHAPE}")
    for i, rec in enumerate(data):
        if not (isinstance(rec, dict) and _is_id(rec.get("image_id")) and isinstance(rec.get("caption"), str)):
            raise ValueError(f"{path}: record {i} is {json.dumps(rec)[:80]}; expected {_PRED_SHAPE}")
    return data


def load_truths(path: str | Path) -> list[dict]:
    """Ground truth as our records [{"image_id", "captions"}], from COCO captions or records."""
    data = _read_json(path, _TRUTH_SHAPE)
    if isinstance(data, dict) and "annotations" in data:
        data = _from_coco(data, str(path))
    elif isinstance(data, dict):  # a one-line JSON Lines file
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}; expected {_TRUTH_SHAPE}")
    _references(data, str(path))  # checks every record
    return data


def _from_coco(data: dict, name: str) -> list[dict]:
    images, anns = data.get("images"), data.get("annotations")
    if not (isinstance(images, list) and all(isinstance(im, dict) and _is_id(im.get("id")) for im in images)):
        raise ValueError(f'{name}: "images" is not a list of {{"id": int or str}}; expected {_TRUTH_SHAPE}')
    records: dict[Any, list[str]] = {im["id"]: [] for im in images}
    for i, ann in enumerate(anns if isinstance(anns, list) else [None]):
        if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str) and _is_id(ann.get("image_id"))
                and ann["image_id"] in records):
            raise ValueError(f"{name}: annotation {i} is {json.dumps(ann)[:80]}; expected "
                             '{"image_id": one of "images", "id", "caption": str}')
        records[ann["image_id"]].append(ann["caption"])
    bare = [vid for vid, caps in records.items() if not caps]
    if bare:
        raise ValueError(f"{name}: image {bare[0]!r} has no annotation ({len(bare)} such); expected captions for every image")
    return [{"image_id": vid, "captions": caps} for vid, caps in records.items()]


def to_coco_captions(truths: list[dict]) -> dict:
    """Our records -> the COCO captions format (what pycocotools' COCO and COCOEvalCap read)."""
    refs = _references(truths, "truths")
    pairs = [(vid, c) for vid, caps in refs.items() for c in caps]
    return {"images": [{"id": vid} for vid in refs],
            "annotations": [{"image_id": vid, "id": n, "caption": c} for n, (vid, c) in enumerate(pairs, 1)]}
