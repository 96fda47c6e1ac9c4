"""Movie-level samples (lamscale.data.movies), the MAD builder that writes them, and the embedded MAD-like
sample (lamscale.data.mad_sample)."""
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from lamscale import cli
from lamscale.data import mad_sample
from lamscale.data.mad_sample import build_mad_sample, directions
from lamscale.data.movies import MovieSample, check_dims, decode_movie, encode_movie
from lamscale.data.schema import SampleError
from lamscale.data.verify import tar_samples

ROOT = Path(__file__).resolve().parents[2]
URL = "s3://bucket/mad/train-000003.tar"


def movie(n_frames=50, fps=5.0, duration=10.0) -> MovieSample:
    rng = np.random.default_rng(0)
    sentences = [{"sid": "s1", "sentence": "A man waves.", "timestamps": [1.0, 2.5], "tokens": [0, 3]},
                 {"sid": "s2", "sentence": "A dog barks at night.", "timestamps": [4.2, 9.8], "tokens": [3, 5]}]
    meta = {"movie": "0001_Some_Movie", "duration": duration, "fps": fps, "sentences": sentences}
    return MovieSample("0001_Some_Movie", meta, rng.standard_normal((n_frames, 6)).astype(np.float16),
                       rng.standard_normal((8, 4)).astype(np.float16))


def raw_of(sample: MovieSample) -> dict:
    return {**encode_movie(sample), "__url__": URL}


def test_round_trip():
    sample = movie()
    raw = raw_of(sample)
    assert sorted(k for k in raw if not k.startswith("__")) == ["json", "text.npy", "video.npy"]
    back = decode_movie(raw)
    assert back.key == sample.key and back.meta == sample.meta
    assert back.video.dtype == back.text.dtype == np.float16
    assert np.array_equal(back.video, sample.video) and np.array_equal(back.text, sample.text)
    assert np.array_equal(back.tokens(0), sample.text[:3]) and np.array_equal(back.tokens(1), sample.text[3:8])
    # a couple of frames short of duration·fps is rounding, not an error
    assert len(decode_movie(raw_of(movie(n_frames=48))).video) == 48


def _sentence(i, **fields):
    def change(sample):
        sample.meta["sentences"][i].update(fields)
    return change


def _set(name, fn):
    def change(sample):
        setattr(sample, name, fn(getattr(sample, name)))
    return change


def _nan_at(index, value):
    def put(array):
        array[index] = value
        return array
    return put


BAD = {  # case: (change to a good movie, the message, the sentence it names)
    "no sentences": (lambda s: s.meta.update(sentences=[]), "no sentences", None),
    "start before 0": (_sentence(0, timestamps=[-0.5, 2.0]), "timestamps [-0.5, 2.0] outside the movie [0, 10.0]", "s1"),
    "end past duration": (_sentence(1, timestamps=[4.2, 10.4]), "timestamps [4.2, 10.4] outside the movie [0, 10.0]", "s2"),
    "end before start": (_sentence(1, timestamps=[5.0, 5.0]), "timestamps [5.0, 5.0] have end <= start", "s2"),
    "tokens past text": (_sentence(1, tokens=[3, 6]), "tokens [3, 6] outside the 8 token features in text.npy", "s2"),
    "no tokens": (_sentence(0, tokens=[0, 0]), "tokens [0, 0] outside the 8 token features", "s1"),
    "video not 2-d": (_set("video", lambda v: v.reshape(-1)), "expected 2-d video/text arrays", None),
    "too few frames": (_set("video", lambda v: v[:47]), "47 frames at 5.0 fps cover 9.4 s of a 10.0 s movie", None),
    "nan frame": (_set("video", _nan_at((7, 2), np.nan)), "video frame 7 holds NaN/Inf", None),
    "inf token": (_set("text", _nan_at((4, 0), np.inf)), "token features hold NaN/Inf", "s2"),
    "no duration": (lambda s: s.meta.pop("duration"), "json lacks duration", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_movie_is_one_line_naming_shard_movie_and_sentence(case):
    change, message, sid = BAD[case]
    sample = movie()
    change(sample)
    with pytest.raises(SampleError) as e:
        decode_movie(raw_of(sample))
    line = str(e.value)
    assert "\n" not in line and message in line, line
    prefix = f"{URL}: movie '0001_Some_Movie'"
    assert line.startswith(f"{prefix}, sentence {sid!r}: " if sid else f"{prefix}: "), line


def test_missing_member_is_one_line():
    raw = raw_of(movie())
    del raw["text.npy"]
    with pytest.raises(SampleError, match=rf"^{URL}: movie '0001_Some_Movie': missing member\(s\) \['text.npy'\]$"):
        decode_movie(raw)


def test_check_dims_names_movie_and_dims():
    sample = movie()
    check_dims(sample, 6, 4, "data.val")
    with pytest.raises(SampleError, match=r"^data\.val: movie '0001_Some_Movie': video features are 6-d, expected 64-d; "
                                          r"text features are 4-d, expected 32-d$"):
        check_dims(sample, 64, 32, "data.val")
    with pytest.raises(SampleError, match=r"text features are 4-d, expected 512-d$"):
        check_dims(sample, 6, 512, "x")


# --- the embedded MAD-like sample ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mad_sample")
    build_mad_sample(str(out))
    return out


def movies_of(folder: Path, split: str) -> list[MovieSample]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [decode_movie({**raw, "__url__": shard["name"]}) for shard in manifest["splits"][split]["shards"]
            for raw in tar_samples((folder / shard["name"]).read_bytes())]


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_sample_is_deterministic(sample_dir, tmp_path):
    build_mad_sample(str(tmp_path))
    assert digests(tmp_path) == digests(sample_dir)
    assert len(digests(tmp_path)) == 4 + 2 + 2  # shards, val_gt.jsonl, manifest.json
    other = tmp_path / "seed1"
    build_mad_sample(str(other), seed=1)
    assert digests(other)["train-000000.tar"] != digests(sample_dir)["train-000000.tar"]


def test_sample_counts_and_moments(sample_dir):
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    assert manifest["dataset"] == "mad-sample" and manifest["generator_version"] == mad_sample.GENERATOR_VERSION
    assert manifest["feature_dims"] == {"video": 64, "text": 32} and manifest["fps"] == 5.0
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["name"] for s in manifest["splits"]["val"]["shards"]] == ["val-000000.tar", "val-000001.tar"]
    assert [s["samples"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]] == [3, 3, 3, 3, 2, 2]
    assert sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"]) < 20e6
    queries = {split: {json.loads(l)["query"] for l in (ROOT / f"shards/qvhighlights_sample/{split}.jsonl").read_text().splitlines()}
               for split in ("train", "val")}
    seen_movies, seen_sids = {}, {}
    for split in ("train", "val"):
        movies = movies_of(sample_dir, split)
        assert len(movies) == {"train": 12, "val": 4}[split]
        counts = manifest["counts"][split]
        assert counts == {"movies": len(movies), "sentences": sum(len(m.meta["sentences"]) for m in movies),
                          "frames": sum(len(m.video) for m in movies)}
        for m in movies:
            assert 3000 <= len(m.video) <= 12000 and m.video.shape[1] == 64 and m.text.shape[1] == 32
            assert m.meta["duration"] == len(m.video) / 5.0
            assert 6 <= len(m.meta["sentences"]) <= 12
            windows = sorted(s["timestamps"] for s in m.meta["sentences"])
            for (s, e), (s2, _) in zip(windows, windows[1:]):
                assert e < s2  # non-overlapping within the movie
            for i, s in enumerate(m.meta["sentences"]):
                start, end = s["timestamps"]
                assert 0 <= start and end <= m.meta["duration"] and 2.0 - 1e-6 <= end - start <= 8.0 + 1e-6
                assert s["sentence"] in queries[split]  # real QVHighlights queries, val ones for val movies
                assert len(m.tokens(i)) == s["tokens"][1] >= 1
            seen_movies[m.meta["movie"]] = split
            seen_sids.update({s["sid"]: split for s in m.meta["sentences"]})
    assert len(seen_movies) == 16
    assert len(seen_sids) == manifest["counts"]["train"]["sentences"] + manifest["counts"]["val"]["sentences"]
    # the metrics' ground truth: one line per val sentence
    gt = [json.loads(l) for l in (sample_dir / "val_gt.jsonl").read_text().splitlines()]
    assert len(gt) == manifest["counts"]["val"]["sentences"]
    assert {g["query_id"] for g in gt} == {s for s, split in seen_sids.items() if split == "val"}
    by_sid = {s["sid"]: (m, s) for m in movies_of(sample_dir, "val") for s in m.meta["sentences"]}
    for g in gt:
        m, s = by_sid[g["query_id"]]
        assert g == {"query_id": s["sid"], "timestamps": s["timestamps"], "duration": m.meta["duration"], "movie": m.meta["movie"]}


def test_sample_moments_carry_their_sentence(sample_dir):
    """A planted moment's frames project onto its sentence's direction more strongly than the movie's
    other frames, the other moments' frames included."""
    projection, _ = directions(64, 32)
    margins = []
    for m in movies_of(sample_dir, "val") + movies_of(sample_dir, "train"):
        centres = (np.arange(len(m.video)) + 0.5) / m.meta["fps"]
        video = m.video.astype(np.float32)
        moments = [(centres >= s["timestamps"][0]) & (centres <= s["timestamps"][1]) for s in m.meta["sentences"]]
        for i, inside in enumerate(moments):
            direction = projection @ m.tokens(i).astype(np.float32).mean(0)
            score = video @ (direction / np.linalg.norm(direction))
            others = np.any([o for j, o in enumerate(moments) if j != i], axis=0)
            assert 10 <= inside.sum() <= 40  # 2–8 s at 5 fps
            assert score[inside].mean() > score[~inside].mean() + 1.5
            assert score[inside].mean() > score[others].mean() + 1.0
            margins.append(score[inside].mean() - score[~inside].mean())
    assert np.mean(margins) > 3.5


def test_first_use_generates_once_and_again_when_the_generator_changes(tmp_path, monkeypatch):
    from lamscale.cluster.launch import _ensure_sample

    folder = tmp_path / "mad_sample"
    monkeypatch.setattr(mad_sample, "SAMPLE_DIR", folder)
    data = SimpleNamespace(train=f"{folder}/train-{{000000..000003}}.tar", val=f"{folder}/val-{{000000..000001}}.tar")
    cfg = SimpleNamespace(data=data,
                          model=SimpleNamespace(video_dim=16, text_dim=8, max_text=4))
    _ensure_sample(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["feature_dims"] == {"video": 16, "text": 8}
    assert max(m.text.shape[0] / len(m.meta["sentences"]) for m in movies_of(folder, "val")) <= 4  # max_text
    before = (folder / "train-000000.tar").stat().st_mtime_ns
    _ensure_sample(cfg)
    assert (folder / "train-000000.tar").stat().st_mtime_ns == before
    (folder / "manifest.json").write_text(json.dumps({**manifest, "generator_version": 0}))
    _ensure_sample(cfg)
    assert json.loads((folder / "manifest.json").read_text())["generator_version"] == mad_sample.GENERATOR_VERSION


# --- the MAD builder: `lamscale shards build --format mad` → movie-level shards ----------------------------

def build(capsys, src: Path, out: Path, *args) -> tuple[int, str]:
    code = cli.main(["shards", "build", str(src), "--format", "mad", "--out", str(out), *map(str, args)])
    return code, capsys.readouterr().out


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def rejects_of(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def write_mad_h5(root: Path, movies: dict, anns: dict[str, dict], texts: dict) -> None:
    """The official layout: annotations/MAD_<split>.json (anns: split → {sid: ann}) and the two feature h5 files."""
    (root / "annotations").mkdir(parents=True)
    (root / "features").mkdir()
    with h5py.File(root / "features/CLIP_frames_features_5fps.h5", "w") as h5:
        for name, frames in movies.items():
            h5.create_dataset(name, data=frames)
    with h5py.File(root / "features/CLIP_language_tokens_features.h5", "w") as h5:
        for sid, tokens in texts.items():
            h5.create_dataset(sid, data=tokens)
    for split, split_anns in anns.items():
        (root / f"annotations/MAD_{split}.json").write_text(json.dumps(split_anns))


def write_mad(root: Path) -> dict:
    rng = np.random.default_rng(1)
    movies = {"3001_21_JUMP_STREET": rng.standard_normal((40, 512)).astype(np.float32),
              "0001_American_Beauty": rng.standard_normal((25, 512)),
              "0002_All_Bad": rng.standard_normal((20, 512)), "0003_Narrow": rng.standard_normal((30, 300)),
              "0004_Short": rng.standard_normal((10, 512))}
    durations = {"0004_Short": 6.0}  # 10 frames at 5 fps are 2 s
    ann = lambda movie, s, e, text: {"movie": movie, "sentence": text, "timestamps": [s, e], "ext_timestamps": [s, e],
                                      "movie_duration": durations.get(movie, len(movies.get(movie, np.zeros(30))) / 5)}
    train = {"11": ann("3001_21_JUMP_STREET", 1.0, 2.4, "Someone runs."), "12": ann("0001_American_Beauty", 0.0, 5.0, "He smiles."),
             "13": ann("3001_21_JUMP_STREET", 6.2, 8.0, "They drive off."),
             "14": ann("9999_MISSING", 1.0, 2.0, "Gone."),                  # missing_features (no such movie)
             "15": ann("3001_21_JUMP_STREET", 5.0, 3.0, "Backwards."),     # bad_window
             "16": ann("3001_21_JUMP_STREET", 7.0, 9.0, "Past the end."),  # bad_window (duration 8.0)
             "17": ann("0001_American_Beauty", 1.0, 2.0, "NaN tokens."),   # nonfinite
             "18": ann("0001_American_Beauty", 1.0, 2.0, "Narrow tokens."),  # bad_dim
             "19": ann("0001_American_Beauty", 1.0, 2.0, "No tokens."),    # missing_features (no text dataset)
             "20": ann("0001_American_Beauty", 1.0, 2.0, None),             # bad_field (no sentence)
             "22": ann("0002_All_Bad", -1.0, 2.0, "Before the start."),    # bad_window } the movie: no_sentences
             "23": ann("0002_All_Bad", 3.0, 3.0, "Empty."),                # bad_window }
             "24": ann("0003_Narrow", 1.0, 2.0, "One."), "25": ann("0003_Narrow", 2.0, 3.0, "Two."),  # bad_dim (300-d frames)
             "26": ann("0004_Short", 1.0, 2.0, "Too few frames."),         # short_video
             "27": "not an object"}                                         # bad_json (no movie to group it under)
    val = {"21": ann("0001_American_Beauty", 2.0, 4.6, "She looks up.")}
    texts = {sid: rng.standard_normal((3 + int(sid) % 5, 512)) for sid in [*train, *val] if sid != "19"}
    texts["17"][1, 2] = np.nan
    texts["18"] = rng.standard_normal((4, 300))
    write_mad_h5(root, movies, {"train": train, "val": val}, texts)
    return {"movies": movies, "texts": texts, "anns": {**train, **val},
            "bad": {"14": "missing_features", "15": "bad_window", "16": "bad_window", "17": "nonfinite", "18": "bad_dim",
                    "19": "missing_features", "20": "bad_field", "22": "bad_window", "23": "bad_window", "24": "bad_dim",
                    "25": "bad_dim", "26": "short_video", "27": "bad_json"},
            "bad_movies": {"9999_MISSING": "missing_features", "0002_All_Bad": "no_sentences", "0003_Narrow": "bad_dim",
                           "0004_Short": "short_video"}}


def read_movies(out: Path) -> dict[str, dict[str, MovieSample]]:
    """{split: {key: MovieSample}} through decode_movie, from every shard the manifest lists."""
    return {split: {m.key: m for m in movies_of(out, split)} for split in manifest_of(out)["splits"]}


def test_mad_round_trip_and_rejects(tmp_path, capsys):
    data = write_mad(tmp_path / "mad")
    out = tmp_path / "shards"
    code, stdout = build(capsys, tmp_path / "mad", out, "--max-per-shard", 1)
    assert code == 0
    manifest, rejects = manifest_of(out), rejects_of(out)
    # the inputs are sentences, the samples movies; every sentence is written or rejected
    assert manifest["counts"]["train"] == {"input": 16, "written": 3, "rejected": 13, "rejected_by_kind": {
        "missing_features": 2, "bad_window": 4, "nonfinite": 1, "bad_dim": 3, "bad_field": 1, "short_video": 1, "bad_json": 1},
        "movies": {"input": 6, "written": 2, "rejected": 4}}
    assert manifest["counts"]["val"] == {"input": 1, "written": 1, "rejected": 0, "rejected_by_kind": {},
                                         "movies": {"input": 1, "written": 1, "rejected": 0}}
    assert manifest["splits"]["train"]["samples"] == 2 and len(manifest["splits"]["train"]["shards"]) == 2
    assert manifest["fps"] == 5.0 and manifest["sample_type"] == "movie" and manifest["feature_dims"] == {"video": 512, "text": 512}
    assert manifest["members"] == ["json", "text.npy", "video.npy"]
    sentence_lines = {i: r for i, r in rejects.items() if "inputs" not in r}
    movie_lines = {i: r for i, r in rejects.items() if "inputs" in r}
    assert {i: r["kind"] for i, r in sentence_lines.items()} == data["bad"]
    assert {i: r["kind"] for i, r in movie_lines.items()} == data["bad_movies"]
    for sid, r in sentence_lines.items():  # one line naming movie and sentence
        if sid != "27":
            movie = data["anns"][sid]["movie"]
            assert r["item"] == movie and r["reason"].startswith(f"movie {movie}, sentence {sid}: ") and "\n" not in r["reason"]
    assert "9999_MISSING" in rejects["14"]["reason"] and "CLIP_frames_features_5fps.h5" in rejects["14"]["reason"]
    assert "300-d, expected 512-d" in rejects["24"]["reason"] and "300-d, expected 512-d" in rejects["18"]["reason"]
    assert "10 frames" in rejects["26"]["reason"] and "6.0 s" in rejects["26"]["reason"]
    assert movie_lines["0002_All_Bad"]["reason"] == "movie 0002_All_Bad: all 2 sentences rejected (bad_window: 2)"
    assert movie_lines["0003_Narrow"]["inputs"] == 2
    assert "train: 16 inputs, 3 written" in stdout and "13 rejected" in stdout and "short_video: 1" in stdout
    assert cli.main(["shards", "verify", str(out)]) == 0

    back = read_movies(out)
    assert {s: sorted(m) for s, m in back.items()} == {"train": ["0001_American_Beauty", "3001_21_JUMP_STREET"],
                                                       "val": ["0001_American_Beauty"]}
    expected_sids = {("train", "3001_21_JUMP_STREET"): ["11", "13"], ("train", "0001_American_Beauty"): ["12"],
                     ("val", "0001_American_Beauty"): ["21"]}
    for (split, movie), sids in expected_sids.items():
        sample = back[split][movie]
        assert sample.video.dtype == np.float16 and np.array_equal(sample.video, data["movies"][movie].astype(np.float16))
        assert sample.meta["movie"] == movie and sample.meta["fps"] == 5.0
        assert sample.meta["duration"] == len(data["movies"][movie]) / 5
        assert [s["sid"] for s in sample.meta["sentences"]] == sids  # annotation order
        for i, sid in enumerate(sids):
            s, ann = sample.meta["sentences"][i], data["anns"][sid]
            assert s["sentence"] == ann["sentence"] and s["timestamps"] == ann["timestamps"]
            assert np.array_equal(sample.tokens(i), data["texts"][sid].astype(np.float16))
        assert len(sample.text) == sum(s["tokens"][1] for s in sample.meta["sentences"])


def test_mad_movie_frames_are_stored_once(tmp_path, capsys):
    """Acceptance (issue 12): a movie with 20 sentences takes < 1.2× the shard bytes of the same movie with 1."""
    rng = np.random.default_rng(4)
    movie = {"0100_Long_Movie": rng.standard_normal((3000, 512)).astype(np.float32)}  # 10 minutes at 5 fps
    anns = {str(100 + i): {"movie": "0100_Long_Movie", "sentence": f"Sentence number {i}.", "timestamps": [6.0 * i, 6.0 * i + 4.2],
                           "movie_duration": 600.0} for i in range(20)}
    texts = {sid: rng.standard_normal((8 + int(sid) % 7, 512)).astype(np.float32) for sid in anns}
    sizes = {}
    for n in (1, 20):
        sids = list(anns)[:n]
        write_mad_h5(tmp_path / f"mad{n}", movie, {"train": {s: anns[s] for s in sids}}, {s: texts[s] for s in sids})
        assert build(capsys, tmp_path / f"mad{n}", tmp_path / f"out{n}")[0] == 0
        manifest = manifest_of(tmp_path / f"out{n}")
        assert manifest["splits"]["train"]["samples"] == 1 and manifest["counts"]["train"]["written"] == n
        sizes[n] = sum((tmp_path / f"out{n}" / s["name"]).stat().st_size for s in manifest["splits"]["train"]["shards"])
    assert sizes[20] < 1.2 * sizes[1], sizes
    sample = read_movies(tmp_path / "out20")["train"]["0100_Long_Movie"]
    assert len(sample.meta["sentences"]) == 20 and np.array_equal(sample.tokens(19), texts["119"].astype(np.float16))
