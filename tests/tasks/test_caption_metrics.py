"""Captioning metrics: `lamscale metrics captioning` against pycocoevalcap's COCOEvalCap on the same
files, hand-derived values, bad input and a missing Java.

METEOR starts a JVM that loads its paraphrase tables (~10 s on a busy 2-core box): the tests share one
scorer (`meteor`), started before the first test needs it so that it loads while other work runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lamscale.cli import main
from lamscale.tasks import caption_metrics
from lamscale.tasks.caption_metrics import (METRICS, evaluate, load_predictions, load_truths, meteor_scorer,
                                            require_java, to_coco_captions)

TRUTHS = [
    {"image_id": 1, "captions": ["A man is riding a horse on the beach.", "a person rides a brown horse",
                                 "Someone on horseback near the sea."]},
    {"image_id": 2, "captions": ["a woman slices tomatoes in a kitchen", "A cook is cutting vegetables.",
                                 "someone chops red tomatoes on a board"]},
    {"image_id": 3, "captions": ["two dogs play with a ball in the park", "Dogs chase a ball on the grass!"]},
    {"image_id": 4, "captions": ["a child plays the piano", "A little girl is playing a piano.",
                                 "kid practicing piano at home", "a young pianist performs"]},
    {"image_id": 5, "captions": ["cars drive down a busy street at night", "Traffic moves on a city road."]},
    {"image_id": 6, "captions": ["a man explains how to fix a bike tire", "someone repairs a bicycle wheel"]},
    {"image_id": 7, "captions": ["a cat sleeps on a sofa", "The cat is napping on the couch."]},
]
PREDICTIONS = [
    {"image_id": 1, "caption": "a man is riding a horse on the beach"},  # an exact match, once tokenized
    {"image_id": 2, "caption": "A WOMAN is cutting tomatoes, in a kitchen..."},  # case and punctuation
    {"image_id": 3, "caption": "a dog plays with a ball"},  # partial
    {"image_id": 4, "caption": "a man is playing the guitar"},
    {"image_id": 5, "caption": "cars drive down a street"},
    {"image_id": 6, "caption": ""},  # empty: scores 0
    {"image_id": 7, "caption": "the cat is napping on the couch"},
]
COCO_KEYS = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}


@pytest.fixture(scope="module")
def meteor():
    with meteor_scorer() as scorer:
        yield scorer
    assert scorer.meteor_p.poll() is not None  # the JVM is gone


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_cli_equals_cocoevalcap(tmp_path: Path, capsys, monkeypatch, meteor) -> None:
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    gt = _write(tmp_path / "gt.json", to_coco_captions(TRUTHS))
    preds = _write(tmp_path / "preds.json", PREDICTIONS)
    started = []

    class Recording(caption_metrics.Meteor):  # the CLI's own scorer: started once, stopped after
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(caption_metrics, "Meteor", Recording)
    assert main(["metrics", "captioning", "--preds", str(preds), "--gt", str(gt)]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert len(started) == 1 and started[0].meteor_p.poll() is not None

    class NoSpice:  # SPICE downloads CoreNLP models on first use: not here
        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    monkeypatch.setattr(coco_eval, "Meteor", lambda: meteor)  # the same jar, one JVM less to load
    coco = COCO(str(gt))
    reference = coco_eval.COCOEvalCap(coco, coco.loadRes(str(preds)))
    reference.evaluate()
    assert list(ours) == [*METRICS, "brief"]
    for key, coco_key in COCO_KEYS.items():
        assert ours[key] == pytest.approx(reference.eval[coco_key], abs=1e-9), key
        assert ours["brief"][key] == round(100 * ours[key], 2)
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0


def test_perfect_set_and_brief_scaling(meteor) -> None:
    # Each prediction equals its only reference once tokenized (lower case, punctuation dropped):
    # every n-gram matches and the lengths agree, so BLEU-n = 1 (up to its 1e-9 smoothing); LCS =
    # both lengths, so ROUGE-L = 1. CIDEr-D: hypothesis and reference tf-idf vectors are equal and
    # non-zero (each caption has a 4-gram, and no n-gram is in all 3 videos' references), so each
    # n's cosine is 1, the length penalty exp(0) = 1, the mean over n is 1, times 10: 10.
    truths = [{"image_id": "v1", "captions": ["a man rides a horse"]},
              {"image_id": "v2", "captions": ["two dogs chase a red ball"]},
              {"image_id": "v3", "captions": ["the chef slices fresh tomatoes"]}]
    # "\r" and U+2028 end a line for the Java tokenizer: unreplaced, later captions would shift videos
    preds = [{"image_id": "v1", "caption": "A man rides\ra horse.\u2028"},
             {"image_id": "v3", "caption": "The chef slices fresh tomatoes!"},
             {"image_id": "v2", "caption": "two dogs, chase a red ball"}]
    got = evaluate(preds, truths, meteor=meteor)
    for n in range(1, 5):
        assert got[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-9)
        assert got["brief"][f"BLEU-{n}"] == 100.0
    assert got["ROUGE-L"] == 1.0 and got["brief"]["ROUGE-L"] == 100.0
    assert got["CIDEr"] == pytest.approx(10.0, abs=1e-9) and got["brief"]["CIDEr"] == 1000.0


def test_partial_and_empty_predictions(meteor) -> None:
    # a: "a dog runs fast" against "a dog sits fast"; b: "" against "the cat sleeps".
    # BLEU (corpus): unigrams 3 of 4, bigrams 1 of 3; hypothesis length 4, closest references 4 + 3 = 7:
    #   brevity penalty exp(1 - 7/4). BLEU-1 = 3/4 * bp, BLEU-2 = sqrt(3/4 * 1/3) * bp = bp / 2.
    # ROUGE-L: a has LCS 3 of 4 and 4 words: F = 3/4; b scores 0: mean 3/8.
    # CIDEr-D with 2 videos: every reference n-gram is in one video, idf log 2 (so are the hypothesis'
    #   unseen ones); a's cosines are 3/4 (unigrams) and 1/3 (bigrams), 0 for 3- and 4-grams, equal
    #   lengths: 10 * (3/4 + 1/3) / 4 = 130/48; b has no n-gram: 0; mean 65/48.
    truths = [{"image_id": "a", "captions": ["a dog sits fast"]}, {"image_id": "b", "captions": ["the cat sleeps"]}]
    got = evaluate([{"image_id": "b", "caption": ""}, {"image_id": "a", "caption": "a dog runs fast"}], truths,
                   meteor=meteor)
    bp = math.exp(1 - 7 / 4)
    assert got["BLEU-1"] == pytest.approx(0.75 * bp, abs=1e-9) and got["brief"]["BLEU-1"] == 35.43
    assert got["BLEU-2"] == pytest.approx(0.5 * bp, abs=1e-9) and got["brief"]["BLEU-2"] == 23.62
    assert got["brief"]["BLEU-3"] == got["brief"]["BLEU-4"] == 0.0  # no matching 3-gram
    assert got["ROUGE-L"] == pytest.approx(0.375, abs=1e-12) and got["brief"]["ROUGE-L"] == 37.5
    assert got["CIDEr"] == pytest.approx(65 / 48, abs=1e-9) and got["brief"]["CIDEr"] == 135.42
    assert 0 < got["METEOR"] < 1

    # one video only: CIDEr's idf is log(1/1) = 0 for every n-gram, so even a perfect caption scores 0
    one = evaluate([{"image_id": 9, "caption": "a dog sits fast"}], [{"image_id": 9, "captions": ["a dog sits fast"]}],
                   meteor=meteor)
    assert one["CIDEr"] == 0.0 and one["BLEU-1"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("preds, says", [
    ([{"image_id": 1, "caption": "x"}, {"image_id": 99, "caption": "y"}], "P: image_id 99 is not in G; expected"),
    ([{"image_id": 2, "caption": "x"}], "P: no prediction for image_id 1 of G (1 videos without one); expected"),
    ([{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}, {"image_id": 1, "caption": "z"}],
     "P: image_id 1 has two predictions; expected exactly one"),
    ([{"image_id": 1, "caption": None}, {"image_id": 2, "caption": "y"}], "P: prediction 0 is "),
])
def test_bad_predictions_name_the_id(preds: list, says: str) -> None:
    truths = [{"image_id": 1, "captions": ["a"]}, {"image_id": 2, "captions": ["b"]}]
    with pytest.raises(ValueError) as err:
        evaluate(preds, truths, names=("P", "G"))
    assert str(err.value).startswith(says) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON nor JSON Lines"),
    (json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 2, "id": 1, "caption": "a"}]}), "annotation 0 is "),
    (json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "id": 1, "caption": "a"}]}),
     "image 2 has no annotation"),
    (json.dumps({"images": "x", "annotations": []}), '"images" is not a list'),
    (json.dumps([{"image_id": 1, "captions": []}]), "record 0 is "),
    (json.dumps([{"image_id": 1, "captions": ["a"]}, {"image_id": 1, "captions": ["b"]}]), "image_id 1 appears twice"),
    (json.dumps([{"image_id": 1, "caption": "a"}]), "record 0 is "),
])
def test_malformed_ground_truth_file(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "gt.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_truths(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and says in msg and "expected" in msg and "\n" not in msg, msg


def test_loaders_read_coco_records_and_jsonl(tmp_path: Path) -> None:
    coco = _write(tmp_path / "gt.json", to_coco_captions(TRUTHS))
    assert load_truths(coco) == TRUTHS
    assert load_truths(_write(tmp_path / "records.json", TRUTHS)) == TRUTHS
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in TRUTHS))
    assert load_truths(lines) == TRUTHS
    assert load_predictions(_write(tmp_path / "p.json", PREDICTIONS)) == PREDICTIONS
    with pytest.raises(ValueError, match=r"p2\.json: a JSON dict; expected a JSON list of"):
        load_predictions(_write(tmp_path / "p2.json", {"image_id": 1, "caption": "a"}))


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    gt = _write(tmp_path / "gt.json", to_coco_captions(TRUTHS))
    bad = _write(tmp_path / "bad.json", [*PREDICTIONS, {"image_id": 42, "caption": "x"}])
    preds = _write(tmp_path / "preds.json", PREDICTIONS)
    cases = [(["--preds", str(bad), "--gt", str(gt)], f"{bad}: image_id 42 is not in {gt}"),
             (["--preds", str(preds), "--gt", str(gt), "--subset"], "--subset and --convention are for"),
             (["--preds", str(preds), "--gt", str(gt), "--convention", "cone"], "--subset and --convention are for"),
             (["--preds", str(gt), "--gt", str(gt)], f"{gt}: a JSON dict; expected")]
    for args, says in cases:
        assert main(["metrics", "captioning", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    monkeypatch.setenv("PATH", str(tmp_path))  # no java there
    assert main(["metrics", "captioning", "--preds", str(preds), "--gt", str(gt)]) == 2
    assert "`java` is not on PATH" in capsys.readouterr().err


def test_require_java_without_java_on_path(tmp_path: Path, monkeypatch) -> None:
    require_java()  # this machine has it
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        require_java()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("captioning metrics need Java") and "`java` is not on PATH" in msg
    with pytest.raises(RuntimeError, match="need Java"):  # before any JVM would be started
        evaluate([{"image_id": 1, "caption": "a"}], [{"image_id": 1, "captions": ["a"]}])


def test_shared_meteor_is_kept_and_a_stuck_one_replaced(meteor) -> None:
    """A run's evals share one JVM (its start is most of an eval's metric time); one left holding its lock
    by a score that raised mid-way would block every later eval, so it is stopped and replaced."""
    truths = [{"image_id": "a", "captions": ["a dog sits fast"]}, {"image_id": "b", "captions": ["the cat sleeps"]}]
    preds = [{"image_id": "a", "caption": "a dog runs fast"}, {"image_id": "b", "caption": "a cat sleeps"}]
    shared = caption_metrics.shared_meteor()
    assert caption_metrics.shared_meteor() is shared and shared.meteor_p.poll() is None
    want = evaluate(preds, truths, meteor=meteor)["METEOR"]  # a scorer of its own, same jar
    assert evaluate(preds, truths, meteor=shared)["METEOR"] == want and 0 < want < 1
    shared.lock.acquire()  # as a compute_score that raised between its write and its read leaves it
    fresh = caption_metrics.shared_meteor()
    assert fresh is not shared and shared.meteor_p.poll() is not None  # the stuck JVM was stopped
    assert caption_metrics.shared_meteor() is fresh and evaluate(preds, truths, meteor=fresh)["METEOR"] == want
