"""MADv2 audio descriptions in the AutoAD layout (lamscale.data.builders.madv2_ad) → AD movie samples
(lamscale.data.ad_movies): every bad row named in rejects.jsonl, the tokenizer of the train ADs beside the
manifest, a 30k-frame movie read back through webdataset frame for frame, and the context cut from a movie."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import pytest
import webdataset as wds

from lamscale import cli
from lamscale.data.ad_movies import ADMovie, ad_segment, decode_ad_movie, encode_ad_movie, previous_ads, subtitles_between
from lamscale.data.captions import UNK, load_tokenizer
from lamscale.data.schema import SampleError

DIM, FPS = 16, 5.0
LONG = "10142"  # a train movie of 30,500 frames (6100 s at 5 fps)
WORDS = "man woman door car window street dog phone table light rain stairs gun letter kiss night".split()
VERBS = "opens closes watches grabs drops follows finds hides".split()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _frames(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)


def autoad_release(root: Path) -> dict:
    """AutoAD's layout: annotations/MAD-v2/*.csv (pandas' unnamed index column as the AD id),
    CLIP_L14_frames_features_5fps/<movie>.npy, datasets/mad_split.json. Returns what the checks need."""
    ads = []  # [movie, start, end, text, movie_duration]
    for j in range(40):  # the long movie: its first AD at 0 s, "He looks around." three times (the most frequent)
        text = "He looks around." if j < 3 else f"The {WORDS[j % 16]} {VERBS[j % 8]} the {WORDS[(3 * j + 1) % 16]}."
        ads.append([LONG, 0.0 if j == 0 else 150.0 * j + 0.4, 2.0 if j == 0 else 150.0 * j + 3.4, text, 6100.0])
    bad = {len(ads): "bad_window", len(ads) + 1: "bad_window", len(ads) + 2: "bad_field"}
    ads += [[LONG, 500.0, 500.0, "xylophone quagga", 6100.0],  # end <= start
            [LONG, 6099.0, 6100.5, "The man waves.", 6100.0],  # past the movie
            [LONG, 700.0, 703.0, "", 6100.0]]  # no text
    ads += [["2723", 5.0 + 10 * j, 8.0 + 10 * j, f"A {WORDS[j]} {VERBS[j]} slowly.", 120.0] for j in range(4)]
    bad.update({len(ads): "unknown_words", len(ads) + 1: "bad_duration"})
    ads += [["2723", 60.0, 62.0, " \u0301", 120.0],  # a combining accent alone: no token once normalised
            ["2723", 70.0, 72.0, "A dog barks.", 150.0]]  # its movie_duration disagrees with the movie's
    bad.update({len(ads): "missing_features", len(ads) + 1: "missing_features"})
    ads += [["3001", 1.0, 2.0, "The car stops.", 100.0], ["3001", 3.0, 4.0, "The car starts.", 100.0]]  # no features
    bad.update({len(ads): "bad_dim", len(ads) + 1: "bad_dim"})
    ads += [["4001", 1.0, 2.0, "The dog runs.", 100.0], ["4001", 3.0, 4.0, "The dog sits.", 100.0]]  # 8-d features
    eval_first = len(ads)
    ads += [["1005_Signs", 20.0, 25.0, "The man opens the door.", 60.0],  # written sorted by start
            ["1005_Signs", 1.0, 3.0, "A platypus swims.", 60.0],  # a word no train AD has: fine in eval
            ["1005_Signs", 5.0, 8.0, "The woman watches the rain.", 60.0]]
    bad.update({len(ads): "no_split", len(ads) + 1: "bad_row", len(ads) + 2: "duplicate_id"})
    ads += [["9999", 1.0, 2.0, "The man sleeps.", 50.0],  # a movie mad_split.json places nowhere
            ["", 1.0, 2.0, "The man sleeps.", 50.0]]  # no movie
    rows = [[i, *a] for i, a in enumerate(ads)] + [[0, "2723", 90.0, 91.0, "A duplicate id.", 120.0]]
    _write_csv(root / "annotations/MAD-v2/mad-v2-ad-unnamed.csv", ["", "movie", "start", "end", "text", "movie_duration"], rows)
    _write_csv(root / "annotations/MAD-v2/mad-v2-subs.csv", ["movie", "start", "end", "text"], [
        [LONG, 1.0, 2.5, "Where are we going?"], [LONG, 6099.0, 6105.0, "End."], [LONG, 6200.0, 6201.0, "Gone."],
        ["1005_Signs", 4.0, 6.0, "Look at that."], ["1005_Signs", 7.0, 9.0, ""]])
    features = root / "CLIP_L14_frames_features_5fps"
    features.mkdir()
    movies = {LONG: _frames(30_500, seed=1), "2723": _frames(600, seed=2), "1005_Signs": _frames(300, seed=3),
              "9999": _frames(250, seed=4), "4001": _frames(500, dim=8, seed=5)}
    for movie, frames in movies.items():
        np.save(features / f"{movie}.npy", frames)
    (root / "datasets").mkdir()
    split = {"EVAL": ["1005_Signs"], "TRAIN": [LONG, "2723", "3001", "4001"], "V1-VAL": ["1005_Signs", "0001_X"]}
    (root / "datasets/mad_split.json").write_text(json.dumps(split))
    return {"ads": ads, "bad": bad, "frames": movies, "eval_first": eval_first}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("autoad"), tmp_path_factory.mktemp("shards") / "madv2"
    release = autoad_release(root)
    code = cli.main(["shards", "build", str(root), "--format", "madv2_ad", "--out", str(out), "--video-dim", str(DIM)])
    assert code == 0
    return release, out, json.loads((out / "manifest.json").read_text())


def movies_of(out: Path, manifest: dict, split: str) -> dict[str, ADMovie]:
    """Through webdataset's own tar reading, as training streams them."""
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    return {m.meta["movie"]: m for m in map(decode_ad_movie, wds.WebDataset(urls, shardshuffle=False))}


def test_manifest_counts_and_files(built):
    _, out, manifest = built
    assert manifest["format"] == "madv2_ad" and manifest["sample_type"] == "captioning_movie"
    assert manifest["members"] == ["json", "video.npy"] and manifest["feature_dims"] == {"video": DIM}
    assert manifest["fps"] == FPS and manifest["tokenizer"] == "tokenizer.json" and manifest["caption_stats"] == "caption_stats.json"
    assert manifest["split_source"].startswith("mad_split.json") and manifest["annotations"] == "mad-v2-ad-unnamed.csv"
    assert manifest["subtitles"] == {"kept": 3, "dropped": 2}
    assert list(manifest["splits"]) == ["train", "eval", "unassigned"]
    assert manifest["counts"]["train"] == {
        "input": 53, "written": 44, "rejected": 9, "movies": {"input": 4, "written": 2, "rejected": 2},
        "rejected_by_kind": {"bad_window": 2, "bad_field": 1, "unknown_words": 1, "bad_duration": 1, "missing_features": 2,
                             "bad_dim": 2}}
    assert manifest["counts"]["eval"] == {"input": 3, "written": 3, "rejected": 0, "rejected_by_kind": {},
                                          "movies": {"input": 1, "written": 1, "rejected": 0}}
    assert manifest["counts"]["unassigned"] == {"input": 3, "written": 0, "rejected": 3, "movies": {"input": 1, "written": 0, "rejected": 1},
                                                "rejected_by_kind": {"no_split": 1, "bad_row": 1, "duplicate_id": 1}}
    assert manifest["splits"]["unassigned"]["shards"] == []
    assert json.loads((out / "caption_stats.json").read_text()) == {"most_frequent": "he looks around."}
    assert cli.main(["shards", "verify", str(out)]) == 0


def test_each_bad_row_is_named_in_the_rejects(built):
    release, out, _ = built
    lines = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    rows = len(release["ads"])
    for row, kind in release["bad"].items():
        rid = f"row {row}" if kind in ("bad_row", "duplicate_id") else str(row)
        r = by_id[rid]
        assert r["kind"] == kind, r
        if kind not in ("bad_row", "duplicate_id", "no_split"):
            movie = release["ads"][row][0]
            assert r["reason"].startswith(f"movie {movie}, AD {row}: ") and r["item"] == movie, r
    assert by_id[f"row {rows}"]["kind"] == "duplicate_id" and "AD id '0' is already taken" in by_id[f"row {rows}"]["reason"]
    reasons = {row: by_id[str(row)]["reason"] for row in release["bad"] if str(row) in by_id}
    assert reasons[40].endswith("timestamps [500.0, 500.0] have end <= start")
    assert reasons[41].endswith("timestamps [6099.0, 6100.5] outside the movie [0, 6100.0]")
    assert reasons[42].endswith('text "" is empty')
    assert "has no tokens" in reasons[47] and "disagrees with the movie's 120.0 s" in reasons[48]
    assert reasons[49].endswith("no CLIP_L14_frames_features_5fps/3001.npy")
    assert reasons[51].endswith("video features are 8-d, expected 16-d")
    # the movies that wrote nothing have a line of their own, with their number of ADs
    assert {m: (by_id[m]["kind"], by_id[m]["inputs"]) for m in ("3001", "4001", "9999")} == {
        "3001": ("missing_features", 2), "4001": ("bad_dim", 2), "9999": ("no_split", 1)}
    assert by_id["9999"]["reason"] == "in no split of mad_split.json (TRAIN -> train, EVAL -> eval)"
    assert len(lines) == 9 + 3 + 3  # train, unassigned inputs + the three movie lines


def test_tokenizer_covers_the_train_words_only(built):
    release, out, manifest = built
    tokenizer = load_tokenizer(str(out / manifest["tokenizer"]))
    written = {ad["sid"]: ad for m in movies_of(out, manifest, "train").values() for ad in m.meta["ads"]}
    assert len(written) == 44
    for ad in written.values():
        assert UNK not in tokenizer.encode(ad["text"]).ids, ad
    assert UNK not in tokenizer.encode("Where are we going?").ids  # train subtitles too
    vocab = tokenizer.get_vocab()
    assert "platypus" not in vocab and "xylophone" not in vocab and "sleeps" not in vocab  # eval, rejected, unassigned


def test_long_movie_round_trips_through_webdataset(built):
    release, out, manifest = built
    movies = movies_of(out, manifest, "train")
    assert sorted(movies) == [LONG, "2723"]
    long = movies[LONG]
    assert long.key == LONG and long.video.dtype == np.float16 and long.video.shape == (30_500, DIM)
    assert np.array_equal(long.video, release["frames"][LONG])
    assert long.meta["duration"] == 6100.0 and long.meta["fps"] == FPS
    assert [ad["sid"] for ad in long.meta["ads"]] == [str(j) for j in range(40)]
    assert long.meta["ads"][0] == {"sid": "0", "text": "He looks around.", "timestamps": [0.0, 2.0]}
    assert long.meta["subtitles"] == [{"text": "Where are we going?", "timestamps": [1.0, 2.5]},
                                      {"text": "End.", "timestamps": [6099.0, 6100.0]}]
    assert subtitles_between(long, 0.0, 1.5) == ["Where are we going?"]
    assert ad_segment(long, 39, 60.0, 1000) == (round((150 * 39 + 0.4 - 60) * 5), 29_267)
    (signs,) = movies_of(out, manifest, "eval").values()
    assert [ad["timestamps"][0] for ad in signs.meta["ads"]] == [1.0, 5.0, 20.0]  # sorted by start
    assert previous_ads(signs, 2, 5) == ["A platypus swims.", "The woman watches the rain."]
    assert subtitles_between(signs, 5.0, 8.0) == ["Look at that."]


def test_h5_features_without_durations_or_split_file(tmp_path, capsys):
    """MAD's .h5, the named csv's `sentence` column and AD ids, no movie_duration: durations are frames/fps, an AD
    past the frames is rejected once they are read; without a split file --splits names the one split."""
    root, out = tmp_path / "release", tmp_path / "out"
    _write_csv(root / "mad-v2-ad-named.csv", ["anno_idx", "movie", "start", "end", "sentence"], [
        ["a1", "m1", 1.0, 3.0, "Tom runs."], ["a2", "m1", 18.0, 21.0, "Tom stops."], ["a3", "m2", 0.0, 5.0, "Ann sits."]])
    with h5py.File(root / "CLIP_frames_features_5fps.h5", "w") as h5:
        h5["m1"], h5["m2"] = _frames(100).astype(np.float32), _frames(50)
    args = ["shards", "build", str(root), "--format", "madv2_ad", "--out", str(out), "--video-dim", str(DIM)]
    assert cli.main(args) == 2 and "pass --splits NAME" in capsys.readouterr().err
    assert cli.main([*args, "--splits", "train"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"]["written"] == 2 and manifest["split_source"] == "--splits train (every movie)"
    (reject,) = map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
    assert reject["id"] == "a2" and reject["reason"] == "movie m1, AD a2: timestamps [18.0, 21.0] outside the movie [0, 20.0]"
    movies = movies_of(out, manifest, "train")
    assert {m: x.meta["duration"] for m, x in movies.items()} == {"m1": 20.0, "m2": 10.0}
    assert movies["m1"].meta["subtitles"] == [] and manifest["subtitles"] == {"kept": 0, "dropped": 0}


# --- the sample format and the context cut from it --------------------------------------------------------------

URL = "s3://bucket/madv2/train-000001.tar"


def ad_movie(n_frames=500, duration=100.0) -> ADMovie:
    ads = [{"sid": "a0", "text": "He looks around.", "timestamps": [0.0, 2.0]},
           {"sid": "a1", "text": "She opens the door.", "timestamps": [2.2, 3.0]},
           {"sid": "a2", "text": "They run.", "timestamps": [50.0, 52.3]},
           {"sid": "a3", "text": "The end.", "timestamps": [98.0, 100.0]},
           {"sid": "a4", "text": "Credits roll.", "timestamps": [99.8, 100.0]}]
    subs = [{"text": "one", "timestamps": [1.0, 3.0]}, {"text": "two", "timestamps": [3.0, 5.0]},
            {"text": "three", "timestamps": [10.0, 12.0]}]
    meta = {"movie": "1005_Signs", "duration": duration, "fps": FPS, "ads": ads, "subtitles": subs}
    return ADMovie("1005_Signs", meta, _frames(n_frames))


def test_ad_segment_by_hand():
    m = ad_movie()
    assert ad_segment(m, 0, 10.0, 100) == (0, 10)  # at the movie's start: the context is clipped to 0
    assert ad_segment(m, 1, 0.0, 100) == (11, 15)  # 2.2 s × 5 fps is frame 11, not 10, despite float error
    assert ad_segment(m, 2, 8.0, 100) == (210, 262)  # [42, 52.3] s: frame 261 covers [52.2, 52.4)
    assert ad_segment(m, 2, 8.0, 20) == (242, 262)  # too long: the frames nearest the AD
    assert ad_segment(m, 0, 100.0, 4) == (6, 10)  # context longer than max_frames
    assert ad_segment(m, 3, 0.0, 100) == (490, 500)  # ends with the movie
    short = ad_movie(n_frames=498)  # within the rounding slack: the AD still gets the last frame
    assert ad_segment(short, 4, 0.0, 100) == (497, 498)
    with pytest.raises(ValueError, match="max_frames 0"):
        ad_segment(m, 0, 1.0, 0)


def test_previous_ads_and_subtitles_by_hand():
    m = ad_movie()
    assert previous_ads(m, 0, 3) == []
    assert previous_ads(m, 3, 2) == ["She opens the door.", "They run."]
    assert previous_ads(m, 2, 10) == ["He looks around.", "She opens the door."]
    assert previous_ads(m, 2, 0) == []
    assert subtitles_between(m, 3.0, 4.0) == ["two"]  # "one" ends at 3.0: touching is not overlapping
    assert subtitles_between(m, 2.9, 3.1) == ["one", "two"]
    assert subtitles_between(m, 5.0, 10.0) == []


def test_round_trip():
    m = ad_movie()
    raw = {**encode_ad_movie(m), "__url__": URL}
    assert sorted(k for k in raw if not k.startswith("__")) == ["json", "video.npy"]
    back = decode_ad_movie(raw)
    assert back.key == m.key and back.meta == m.meta and np.array_equal(back.video, m.video)


def _ad(i, **fields):
    def change(m):
        m.meta["ads"][i].update(fields)
    return change


def _nan_frame(m):
    m.video[7, 3] = np.nan


BAD = {  # case: (change to a good movie, the message, the AD it names)
    "empty text": (_ad(1, text="  "), 'text "  " is empty', "a1"),
    "end before start": (_ad(2, timestamps=[52.0, 51.0]), "timestamps [52.0, 51.0] have end <= start", "a2"),
    "past the movie": (_ad(3, timestamps=[98.0, 100.5]), "timestamps [98.0, 100.5] outside the movie [0, 100.0]", "a3"),
    "before 0": (_ad(0, timestamps=[-1.0, 2.0]), "outside the movie [0, 100.0]", "a0"),
    "out of order": (_ad(2, timestamps=[1.0, 1.5]), "starts at 1.0, before the AD ahead of it", "a2"),
    "no sid": (lambda m: m.meta["ads"][1].pop("sid"), "not an object with sid, text, timestamps", "?"),
    "nan frame": (_nan_frame, "video frame 7 holds NaN/Inf", None),
    "too few frames": (lambda m: setattr(m, "video", m.video[:400]), "400 frames at 5.0 fps cover 80.0 s of a 100.0 s movie", None),
    "no ads": (lambda m: m.meta.update(ads=[]), "no ADs", None),
    "bad subtitle": (lambda m: m.meta["subtitles"][2].update(timestamps=[10.0, 120.0]), "subtitle 2: timestamps", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_movie_is_one_line_naming_shard_movie_and_ad(case):
    change, message, sid = BAD[case]
    m = ad_movie()
    change(m)
    with pytest.raises(SampleError) as e:
        decode_ad_movie({**encode_ad_movie(m), "__url__": URL})
    line = str(e.value)
    assert "\n" not in line and message in line, line
    prefix = f"{URL}: movie '1005_Signs'"
    assert line.startswith(f"{prefix}, AD {sid!r}: " if sid else prefix), line


def test_missing_member_is_one_line():
    raw = {**encode_ad_movie(ad_movie()), "__url__": URL}
    del raw["video.npy"]
    with pytest.raises(SampleError, match=rf"^{URL}: movie '1005_Signs': missing member\(s\) \['video.npy'\]$"):
        decode_ad_movie(raw)


# --- captioning over it: the task's data path and a training step over minutes of frames ------------------------------

def test_an_ad_late_in_the_30k_frame_movie_trains_over_8k_frames_of_context(built):
    """The last AD of the 30,500-frame movie with 1,700 s of context before it: > 8,000 frames in one sequence,
    through the captioning task's own decode, AD draw and collate, and one training step of its model on CPU."""
    from lamscale.config import load_config
    from lamscale.data.stream import iter_samples
    from lamscale.data.urls import expand_urls
    from lamscale.tasks import get_task

    _, out, manifest = built
    cfg = load_config("configs/madv2_ad.yaml", [
        f"data.train={out}/{manifest['splits']['train']['pattern']}", f"data.val={out}/{manifest['splits']['eval']['pattern']}",
        "cluster.use_gpu=false", "train.precision=fp32", "model.video_dim=16", "model.dim=32", "model.layers=2",
        "model.heads=4", "model.ffn_mult=2", "model.lam.rank=4", "model.lam.hidden=16", "model.lam.backend=cpp",
        "model.max_clips=9000", "model.max_text=32", "task.decoder_layers=1", "task.context_s=1700"])
    task = get_task(cfg)
    ops = task.sample_ops()
    movie = next(m for m in iter_samples(expand_urls(cfg.data.train), ops=ops) if m.meta["movie"] == LONG)
    assert len(movie.video) == 30_500
    last = len(movie.meta["ads"]) - 1
    item, _ = ops.ad_item(movie, last)
    assert len(item.video) >= 8000 and item.context and item.target[1:-1]  # earlier ADs as words; the AD itself
    batch = task.collate([item])
    torch.manual_seed(0)
    model = task.build_model().train()
    loss, _ = task.loss(model(*batch.inputs()), batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoder.video_proj[1].weight.grad.abs().sum() > 0  # the frames were learned from


def test_a_captioning_training_step_grows_linearly_with_the_segment(tmp_path):
    """`lamscale bench movie` with a captioning config: a training step (forward + backward) at 2,000 and 8,000
    frames, each in a fresh process; 4× the frames is ~4× the peak memory (a dense N×N mask would be 16×).
    Run as its own command: a child forked from this test process would copy its pages into the peak."""
    small = ["cluster.use_gpu=false", "model.dim=64", "model.layers=2", "model.heads=4", "model.ffn_mult=2",
             "model.video_dim=16", "task.decoder_layers=1", "model.lam.rank=8", "model.lam.hidden=32",
             "model.lam.backend=cpp"]
    cmd = [sys.executable, "-m", "lamscale", "bench", "movie", "--config", "configs/madv2_ad.yaml", "--lengths",
           "2000,8000", "--out", str(tmp_path / "caption"), *[a for s in small for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = json.loads((tmp_path / "caption.json").read_text())["rows"]
    assert not any("error" in r for r in rows), rows
    assert [r["N"] for r in rows] == [2000 + 88, 8000 + 88]  # + 64 context words + a 24-token caption
    assert rows[0]["case"] == "madv2_ad training step"
    assert 2.0 < rows[1]["peak_mib"] / rows[0]["peak_mib"] < 6.0, rows
