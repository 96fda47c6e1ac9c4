"""The captioning task: its data path (clips and AD movies), batches, baseline, TensorBoard text and the
checks that run before any worker."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lamscale import cli
from lamscale.config import load_config
from lamscale.data.ad_movies import ADMovie
from lamscale.data.caption_sample import build_caption_sample
from lamscale.data.captions import BOS, EOS, PAD, TOKENIZER_FILE, load_tokenizer, tokenizer_bytes, train_tokenizer
from lamscale.data.reader import DataError
from lamscale.data.schema import Sample, SampleError, encode_sample
from lamscale.data.stream import iter_samples
from lamscale.data.urls import expand_urls
from lamscale.tasks import get_task


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("caption_sample")
    build_caption_sample(str(out))
    return out


def task(shards, *overrides):
    cfg = load_config("configs/captioning_sample.yaml", [f"data.train={shards}/train-{{000000..000003}}.tar",
                                                        f"data.val={shards}/val-{{000000..000001}}.tar", *overrides])
    return get_task(cfg)


def test_the_sample_is_real_queries_with_their_words_in_the_frames(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 1177 and manifest["splits"]["val"]["samples"] == 386
    qvh = [json.loads(line) for line in open("shards/qvhighlights_sample/train.jsonl")]
    t = task(shards)
    ops = t.sample_ops()
    samples = {s.key: s for s in iter_samples(expand_urls(t.cfg.data.train), ops=ops)}
    several = [s for s in samples.values() if len(s.meta["captions"]) > 1]
    assert len(several) == 23  # QVH videos with several queries: every query is a reference
    first = samples[next(iter(samples))]
    assert first.meta["captions"][0] == qvh[0]["query"]
    words = len(qvh[0]["query"].split())
    assert first.arrays["video"].shape[0] >= 2 + 2 * words - 2 and first.arrays["audio"].shape[1] == 32


def test_training_draws_a_reference_per_visit_and_eval_keeps_them_all(shards):
    t = task(shards)
    ops = t.sample_ops()
    sample = next(s for s in iter_samples(expand_urls(t.cfg.data.train), ops=ops) if len(s.meta["captions"]) > 1)
    tok = load_tokenizer(str(shards / TOKENIZER_FILE))
    drawn = {tuple(ops.prepare(sample, random.Random(seed), "x")[0].target) for seed in range(20)}
    assert len(drawn) == len(set(sample.meta["captions"]))  # every reference gets drawn
    references = {tuple(tok.encode(c).ids) for c in sample.meta["captions"]}
    for target in drawn:
        assert target[0] == BOS and target[-1] == EOS and tuple(target[1:-1]) in references
    again = ops.prepare(sample, random.Random(7), "x")[0].target
    assert again == ops.prepare(sample, random.Random(7), "x")[0].target  # seeded: a resumed run draws the same
    item, cut = ops.prepare(sample, None, "x")
    assert item.target == [] and item.meta["captions"] == sample.meta["captions"] and not cut


def test_long_captions_are_cut_to_max_caption_and_counted(shards):
    t = task(shards, "task.max_caption=5")
    ops = t.sample_ops()
    sample = next(iter(iter_samples(expand_urls(t.cfg.data.train), ops=ops)))
    item, cut = ops.prepare(sample, random.Random(0), "x")
    assert cut and len(item.target) == 5 and item.target[0] == BOS and item.target[-1] == EOS


def test_collate_pads_and_marks_every_modality(shards):
    t = task(shards)
    ops = t.sample_ops()
    samples = list(iter_samples(expand_urls(t.cfg.data.train), ops=ops))[:3]
    items = [ops.prepare(s, random.Random(i), "x")[0] for i, s in enumerate(samples)]
    batch = t.collate(items)
    assert batch.video.shape[:2] == batch.video_valid.shape and batch.audio.shape[:2] == batch.audio_valid.shape
    for b, it in enumerate(items):
        assert batch.video_valid[b].sum() == len(it.video) and batch.audio_valid[b].sum() == len(it.audio)
        assert batch.caption[b, : len(it.target)].tolist() == it.target
        assert (batch.caption[b, len(it.target):] == PAD).all() and batch.caption_valid[b].sum() == len(it.target)
    assert batch.context.shape == (3, 0)
    assert batch.tokens == sum(len(i.video) + len(i.audio) + len(i.target) for i in items)


def test_bad_samples_are_one_line_naming_them(shards, tmp_path):
    t = task(shards)
    ops = t.sample_ops()
    video, audio = np.zeros((4, 64)), np.zeros((3, 32))
    cases = {
        "no video": (Sample("v1", {"captions": ["a man"]}, {"audio": audio}), "no video features"),
        "no audio": (Sample("v2", {"captions": ["a man"]}, {"video": video}), "no audio features"),
        "wrong dim": (Sample("v3", {"captions": ["a man"]}, {"video": np.zeros((4, 63)), "audio": audio}), "(T>0, 64)"),
        "empty caption": (Sample("v4", {"captions": ["a man", " "]}, {"video": video, "audio": audio}), "non-empty strings"),
    }
    for name, (sample, message) in cases.items():
        raw = {**encode_sample(sample), "__url__": "s/train-000000.tar"}
        with pytest.raises(SampleError, match="s/train-000000.tar: sample 'v") as e:
            ops.decode(raw)
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1, name
    # a shipped vocabulary that knows none of a training caption's words
    other = tmp_path / "other.json"
    other.write_bytes(tokenizer_bytes(train_tokenizer(["completely different words"])))
    ops = task(shards, f"task.tokenizer={other}").sample_ops()
    sample = Sample("v5", {"captions": ["a man sings"]}, {"video": video, "audio": audio})
    with pytest.raises(DataError, match=r"s/x\.tar: sample 'v5': caption 'a man sings' is all unknown tokens"):
        ops.prepare(sample, random.Random(0), "s/x.tar")


def ad_movie() -> ADMovie:
    ads = [{"sid": f"a{i}", "text": text, "timestamps": ts} for i, (text, ts) in
           enumerate([("a man walks in", [2.0, 4.0]), ("he sits down", [10.0, 12.0]), ("she smiles at him", [30.0, 33.0])])]
    subs = [{"text": "hello there", "timestamps": [25.0, 27.0]}]
    meta = {"movie": "m1", "duration": 40.0, "fps": 5.0, "ads": ads, "subtitles": subs}
    return ADMovie("m1", meta, np.arange(200 * 64, dtype=np.float16).reshape(200, 64) % 7)


def test_an_ad_is_its_segment_with_the_earlier_ads_and_subtitles_as_context(shards, tmp_path):
    (tmp_path / TOKENIZER_FILE).write_bytes(tokenizer_bytes(train_tokenizer(
        ["a man walks in", "he sits down", "she smiles at him", "hello there"])))
    t = task(shards, f"task.tokenizer={tmp_path / TOKENIZER_FILE}", "model.audio_dim=0", "task.context_s=10",
             "task.prev_ads=1", "model.max_clips=60", "model.max_text=16")
    ops, tok = t.sample_ops(), load_tokenizer(str(tmp_path / TOKENIZER_FILE))
    movie = ad_movie()
    item, _ = ops.ad_item(movie, 2)
    # [30 − 10, 33] s at 5 fps = frames 100..164, of which the last max_clips=60 frames: 105..164
    assert np.array_equal(item.video, movie.video[105:165]) and item.audio is None
    words = lambda text: tok.encode(text).ids  # noqa: E731
    assert item.context == [*words("he sits down"), EOS, *words("hello there"), EOS]  # 1 earlier AD, then subtitles
    assert item.target == [BOS, *words("she smiles at him"), EOS] and item.meta["image_id"] == "m1/a2"
    assert [i.meta["image_id"] for i in t.eval_items(movie)] == ["m1/a0", "m1/a1", "m1/a2"]
    drawn = {ops.prepare(movie, random.Random(s), "x")[0].meta["image_id"] for s in range(30)}
    assert drawn == {"m1/a0", "m1/a1", "m1/a2"}
    small = task(shards, f"task.tokenizer={tmp_path / TOKENIZER_FILE}", "model.audio_dim=0", "model.max_text=3").sample_ops()
    assert small.ad_item(movie, 2)[0].context == [*words("hello there"), EOS][-3:]  # the most recent words


def test_baseline_texts_and_metrics(shards):
    t = task(shards, "task.show_captions=2")
    truths = [{"image_id": "a", "captions": ["a man is cooking food", "someone cooks"]},
              {"image_id": "b", "captions": ["a dog runs on the beach"]}]
    assert [p["caption"] for p in t.chance(truths)] == ["old man speaks into a professional mic."] * 2
    predictions = [{"image_id": "a", "caption": "a man is cooking food"}, {"image_id": "b", "caption": "a cat sleeps"}]
    text = t.texts(predictions, truths)["captions/val"]
    assert "| a | a man is cooking food | a man is cooking food / someone cooks |" in text
    assert "| b | a cat sleeps | a dog runs on the beach |" in text
    metrics = t.metrics(predictions, truths)
    assert metrics["brief"]["BLEU-1"] > t.metrics(t.chance(truths), truths)["brief"]["BLEU-1"]


def test_no_java_is_one_line_before_any_worker(shards, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    code = cli.main(["train", "configs/captioning_sample.yaml", f"data.train={shards}/train-{{000000..000003}}.tar",
                     f"data.val={shards}/val-{{000000..000001}}.tar", f"run.storage={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2 and "captioning metrics need Java" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_missing_tokenizer_is_one_line(shards, tmp_path, capsys):
    code = cli.main(["train", "configs/captioning_sample.yaml", f"data.train={shards}/train-{{000000..000003}}.tar",
                     f"data.val={shards}/val-{{000000..000001}}.tar", f"task.tokenizer={tmp_path}/none.json",
                     f"run.storage={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path}/none.json: no tokenizer" in err and len(err.strip().splitlines()) == 1
