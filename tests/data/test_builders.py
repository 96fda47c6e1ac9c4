"""`lamscale shards build` from small but real-layout inputs of every format: each field read back
exactly, each kind of bad input in rejects.jsonl, written + rejected = input."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lamscale import cli, storage
from lamscale.data.captions import load_tokenizer
from lamscale.data.schema import decode_sample
from lamscale.data.stream import iter_samples
from lamscale.data.urls import expand_urls
from lamscale.data.verify import sample_problems, tar_samples
from lamscale.data.writer import parse_size

ROOT = Path(__file__).resolve().parents[2]


def build(capsys, *args):
    code = cli.main(["shards", "build", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def manifest_of(url):
    return json.loads(storage.read_bytes(storage.join(storage.normalize(str(url)), "manifest.json")))


def rejects_of(url):
    text = storage.read_bytes(storage.join(storage.normalize(str(url)), "rejects.jsonl")).decode()
    return {r["id"]: r for r in map(json.loads, text.splitlines())}


def read_back(url):
    """{split: {key: Sample}} from every shard the manifest lists."""
    url, manifest = storage.normalize(str(url)), manifest_of(url)
    out = {}
    for split, info in manifest["splits"].items():
        out[split] = {}
        for shard in info["shards"]:
            for raw in tar_samples(storage.read_bytes(storage.join(url, shard["name"]))):
                out[split][raw["__key__"]] = decode_sample(raw)
    return out


def assert_counts_add_up(manifest, rejects):
    """One input per sample (formats whose inputs are the samples themselves)."""
    for split, c in manifest["counts"].items():
        assert c["written"] + c["rejected"] == c["input"]
        assert c["written"] == manifest["splits"][split]["samples"] == sum(s["samples"] for s in manifest["splits"][split]["shards"])
        assert c["rejected"] == sum(r["split"] == split for r in rejects.values())


def save_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


# --- QVHighlights -------------------------------------------------------------------------------------

def write_qvhighlights(root: Path) -> dict:
    """Real annotation lines + random features in the moment_detr layout; returns what each qid should become."""
    rng = np.random.default_rng(0)
    lines = [json.loads(l) for l in (ROOT / "shards/qvhighlights_sample/train.jsonl").read_text().splitlines()[:9]]
    feats = root / "features"
    expected = {}
    for i, ann in enumerate(lines):
        slowfast, clip = rng.standard_normal((6, 2304)), rng.standard_normal((5, 512)).astype(np.float32)  # T differs by one
        text = rng.standard_normal((4 + i, 512))
        save_npz(feats / "slowfast_features" / f"{ann['vid']}.npz", features=slowfast)
        save_npz(feats / "clip_features" / f"{ann['vid']}.npz", features=clip)
        save_npz(feats / "clip_text_features" / f"qid{ann['qid']}.npz", last_hidden_state=text, pooler_output=text[0])
        expected[ann["qid"]] = (ann, np.concatenate([slowfast[:5], clip], axis=1).astype(np.float16), text.astype(np.float16))
    a = [ann["qid"] for ann in lines]
    # one bad input of each kind
    (feats / "slowfast_features" / f"{lines[1]['vid']}.npz").unlink()                              # missing_file
    save_npz(feats / "clip_features" / f"{lines[2]['vid']}.npz", features=np.full((5, 512), np.nan))  # nonfinite
    lines[3]["relevant_windows"] = [[140, 160]]                                                     # bad_window
    save_npz(feats / "clip_text_features" / f"qid{a[4]}.npz", last_hidden_state=np.ones((3, 256)))  # bad_dim
    save_npz(feats / "clip_text_features" / f"qid{a[5]}.npz", last_hidden_state=np.full((3, 512), 1e6))  # float16_overflow
    del lines[6]["vid"]                                                                             # missing_field
    train = [json.dumps(l) for l in lines[:7]] + ["{not json", json.dumps(lines[0])]                # bad_json, duplicate_key
    (root / "data").mkdir(parents=True)
    (root / "data/highlight_train_release.jsonl").write_text("\n".join(train) + "\n")
    (root / "data/highlight_val_release.jsonl").write_text("\n".join(json.dumps(l) for l in lines[7:]) + "\n")
    return {"expected": expected, "bad": {f"qid{a[1]}": "missing_file", f"qid{a[2]}": "nonfinite", f"qid{a[3]}": "bad_window",
                                          f"qid{a[4]}": "bad_dim", f"qid{a[5]}": "float16_overflow", f"qid{a[6]}": "missing_field",
                                          "highlight_train_release.jsonl:8": "bad_json"}, "good": [a[0], a[7], a[8]]}


def test_qvhighlights_round_trip_and_rejects(tmp_path, capsys):
    data = write_qvhighlights(tmp_path / "qvh")
    out = tmp_path / "shards"
    code, stdout, _ = build(capsys, tmp_path / "qvh", "--format", "qvhighlights", "--out", out)
    assert code == 0
    manifest, rejects = manifest_of(out), rejects_of(out)
    assert manifest["counts"]["train"] == {"input": 9, "written": 1, "rejected": 8, "rejected_by_kind": {
        "missing_file": 1, "nonfinite": 1, "bad_window": 1, "bad_dim": 1, "float16_overflow": 1, "missing_field": 1,
        "bad_json": 1, "duplicate_key": 1}}
    assert manifest["counts"]["val"] == {"input": 2, "written": 2, "rejected": 0, "rejected_by_kind": {}}
    assert_counts_add_up(manifest, {f"{r['split']}/{i}": r for i, r in rejects.items()})
    for rid, kind in data["bad"].items():
        assert rejects[rid]["kind"] == kind, rejects[rid]
    reason = {kind: rejects[rid]["reason"] for rid, kind in data["bad"].items()}
    assert "features/slowfast_features/" in reason["missing_file"] and "features/clip_features/" in reason["nonfinite"]
    assert manifest["feature_dims"] == {"video": 2816, "text": 512} and manifest["format"] == "qvhighlights"
    assert manifest["members"] == ["json", "text.npy", "video.npy"] and manifest["clip_len"] == 2.0
    assert "train: 9 inputs, 1 written" in stdout and "8 rejected" in stdout and "bad_window: 1" in stdout

    # read back through the trainer's own reader
    seen = set()
    for split in ("train", "val"):
        for sample in iter_samples(expand_urls(storage.join(str(out), manifest["splits"][split]["pattern"]))):
            ann, video, text = data["expected"][sample.meta["qid"]]
            assert sample.key == f"qid{ann['qid']}" and sample.video.dtype == np.float16
            assert np.array_equal(sample.video, video) and np.array_equal(sample.text, text)
            for field in ("vid", "query", "duration", "relevant_windows", "relevant_clip_ids", "saliency_scores"):
                assert sample.meta[field] == ann[field]
            assert sample.meta["clip_len"] == 2.0
            seen.add(ann["qid"])
    assert seen == set(data["good"])


def write_qvh_release(root: Path, lines: list[dict]) -> dict:
    """`lines` as the train jsonl, each with its own features (named by the qid as released); qid → (video, text)."""
    rng, feats, arrays = np.random.default_rng(3), root / "features", {}
    for ann in lines:
        slowfast, clip, text = rng.standard_normal((4, 2304)), rng.standard_normal((4, 512)), rng.standard_normal((3, 512))
        save_npz(feats / "slowfast_features" / f"{ann['vid']}.npz", features=slowfast)
        save_npz(feats / "clip_features" / f"{ann['vid']}.npz", features=clip)
        save_npz(feats / "clip_text_features" / f"qid{ann['qid']}.npz", last_hidden_state=text)
        arrays[ann["qid"]] = (np.concatenate([slowfast, clip], axis=1).astype(np.float16), text.astype(np.float16))
    (root / "highlight_train_release.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return arrays


def test_qvhighlights_unsafe_qids_become_safe_keys_and_bad_queries_are_rejected(tmp_path, capsys):
    lines = [json.loads(l) for l in (ROOT / "shards/qvhighlights_sample/train.jsonl").read_text().splitlines()[:7]]
    lines[0]["qid"] = "8.5"                                 # a dot: WebDataset would split it as key "qid8", ext "5.json"
    lines[1]["qid"] = "8_5"                                 # the same safe key: duplicate_key
    lines[2]["query"], lines[3]["query"], lines[4]["query"] = None, "  ", 7   # bad_field
    lines[5]["qid"] = "a b+c"                               # a space and a plus
    arrays = write_qvh_release(tmp_path / "qvh", lines)
    out = tmp_path / "shards"
    code, _, _ = build(capsys, tmp_path / "qvh", "--format", "qvhighlights", "--out", out)
    assert code == 0
    rejects = rejects_of(out)
    q = [l["qid"] for l in lines]
    assert {i: r["kind"] for i, r in rejects.items()} == {"qid8_5": "duplicate_key", f"qid{q[2]}": "bad_field",
                                                          f"qid{q[3]}": "bad_field", f"qid{q[4]}": "bad_field"}
    assert rejects[f"qid{q[2]}"]["reason"] == "query null is not a non-empty string"
    assert rejects[f"qid{q[3]}"]["reason"] == 'query "  " is not a non-empty string'
    assert rejects[f"qid{q[4]}"]["reason"] == "query 7 is not a non-empty string"
    # its own verify accepts what it wrote, and the trainer's reader gets the qid as released
    assert cli.main(["shards", "verify", str(out)]) == 0
    manifest = manifest_of(out)
    got = {s.key: s for s in iter_samples(expand_urls(storage.join(str(out), manifest["splits"]["train"]["pattern"])))}
    assert sorted(got) == sorted(["qid8_5", "qida_b_c", f"qid{q[6]}"])
    assert got["qid8_5"].meta["qid"] == "8.5" and got["qida_b_c"].meta["qid"] == "a b+c"
    assert np.array_equal(got["qid8_5"].video, arrays["8.5"][0]) and np.array_equal(got["qid8_5"].text, arrays["8.5"][1])
    assert got["qid8_5"].meta["query"] == lines[0]["query"]


def test_driver_rejects_a_key_that_would_not_read_back():
    """Whatever a format module makes of its ids, a key with a dot or a slash never reaches a shard."""
    from lamscale.data.builders import Reject, _validated
    from lamscale.data.schema import Sample

    with pytest.raises(Reject, match=r"sample key 'qid8\.5' has characters other than"):
        _validated(Sample("qid8.5", {}, {"video": np.ones((2, 3))}), {}, [], set(), set())


# --- MAD: movie-level shards, in tests/data/test_movies.py ---------------------------------------------


# --- ImageNet-style class folders ---------------------------------------------------------------------

def jpeg_bytes(seed, size=(12, 9)):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_imagefolder(root: Path) -> dict:
    files, seed = {}, 0
    for split, classes in (("train", ("n01440764_tench", "n01443537_goldfish")), ("val", ("n01440764_tench", "n01443537_goldfish"))):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                path = root / split / name / f"{name[:9]}_{i}.JPEG"
                path.write_bytes(jpeg_bytes(seed))
                seed += 1
                files[f"{split}/{name}/{path.name}"] = path
    gradient = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (10, 1, 3))
    Image.fromarray(gradient).save(root / "train/n01443537_goldfish/drawn.png")             # kept as PNG
    Image.fromarray(gradient[::-1]).save(root / "train/n01443537_goldfish/named.jpg", format="PNG")  # a PNG named .jpg
    palette = Image.fromarray(gradient).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(root / "train/n01443537_goldfish/animated.png", format="GIF")              # a GIF: re-encoded as PNG
    (root / "train/n01440764_tench/broken.jpg").write_bytes(jpeg_bytes(5)[:200])            # unreadable_image (truncated)
    (root / "train/n01440764_tench/fake.jpg").write_text("not a JPEG at all")               # unreadable_image (no image)
    (root / "train/n01440764_tench/notes.txt").write_text("not an image")                  # not_an_image
    (root / "train/LICENSE").write_text("outside any class folder")                         # not_in_class_folder
    return {"files": files, "gradient": gradient, "gif": np.asarray(palette.convert("RGB"))}


def test_imagefolder_round_trip_and_rejects(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "imagenet")
    out = tmp_path / "shards"
    code, _, _ = build(capsys, tmp_path / "imagenet", "--format", "imagefolder", "--out", out, "--max-per-shard", "2")
    assert code == 0
    manifest, rejects = manifest_of(out), rejects_of(out)
    assert_counts_add_up(manifest, rejects)
    # JPEG and PNG members side by side, listed as WebDataset's alternatives
    assert manifest["classes"] == ["n01440764_tench", "n01443537_goldfish"] and manifest["members"] == ["jpg;png", "json"]
    assert {i: r["kind"] for i, r in rejects.items()} == {
        "n01440764_tench/broken.jpg": "unreadable_image", "n01440764_tench/fake.jpg": "unreadable_image",
        "n01440764_tench/notes.txt": "not_an_image", "LICENSE": "not_in_class_folder"}
    assert manifest["counts"]["train"] == {"input": 11, "written": 7, "rejected": 4, "rejected_by_kind": {
        "not_in_class_folder": 1, "not_an_image": 1, "unreadable_image": 2}}
    # each reason names the file and what is wrong with it, never a Python object
    fake, broken = rejects["n01440764_tench/fake.jpg"]["reason"], rejects["n01440764_tench/broken.jpg"]["reason"]
    assert fake.startswith(str(tmp_path / "imagenet/train/n01440764_tench/fake.jpg")) and "not an image" in fake
    assert "6e 6f 74 20" in fake  # "not " — the bytes it does hold
    assert broken.startswith(str(tmp_path / "imagenet/train/n01440764_tench/broken.jpg")) and "truncated" in broken.lower()
    assert not any("object at 0x" in r["reason"] for r in rejects.values())
    assert all(s["samples"] <= 2 for split in manifest["splits"].values() for s in split["shards"])
    back = read_back(out)
    for rel, path in data["files"].items():
        split, class_name, name = rel.split("/")
        sample = back[split][f"{class_name}_{name.split('.')[0]}"]
        assert sample.files["jpg"] == path.read_bytes()  # JPEGs keep their original bytes
        assert sample.meta == {"label": manifest["classes"].index(class_name), "class": class_name,
                               "path": f"{class_name}/{name}", "width": 12, "height": 9}
    # PNGs keep their bytes under .png, whatever the file is called; another format is re-encoded losslessly, and says so
    goldfish = tmp_path / "imagenet/train/n01443537_goldfish"
    drawn, named = back["train"]["n01443537_goldfish_drawn"], back["train"]["n01443537_goldfish_named"]
    assert set(drawn.files) == set(named.files) == {"png"} and drawn.meta["label"] == named.meta["label"] == 1
    assert drawn.files["png"] == (goldfish / "drawn.png").read_bytes() and named.files["png"] == (goldfish / "named.jpg").read_bytes()
    assert "reencoded_from" not in drawn.meta and named.meta["path"] == "n01443537_goldfish/named.jpg"
    gif = back["train"]["n01443537_goldfish_animated"]
    assert set(gif.files) == {"png"} and gif.files["png"][:8] == b"\x89PNG\r\n\x1a\n" and gif.meta["reencoded_from"] == "GIF"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(gif.files["png"])).convert("RGB")), data["gif"])
    # and the dataset's own verify accepts the mix
    assert cli.main(["shards", "verify", str(out)]) == 0


def test_verify_checks_image_members_by_their_real_format():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
    png, jpg, meta = buf.getvalue(), jpeg_bytes(0), b"{}"
    mixed = ["jpg;png", "json"]
    assert sample_problems({"__key__": "a", "png": png, "json": meta}, mixed, {}) == []
    assert sample_problems({"__key__": "a", "jpg": jpg, "json": meta}, mixed, {}) == []
    assert sample_problems({"__key__": "a", "jpg": png, "json": meta}, ["jpg", "json"], {}) == ["jpg member holds a PNG image"]
    assert sample_problems({"__key__": "a", "png": png, "json": meta}, ["jpg", "json"], {}) == [
        "members ['json', 'png'], manifest says ['jpg', 'json']"]
    assert sample_problems({"__key__": "a", "jpg": jpg, "png": png, "json": meta}, mixed, {}) == [
        "members ['jpg', 'json', 'png'], manifest says ['jpg;png', 'json']"]


# --- MSR-VTT ------------------------------------------------------------------------------------------

def write_msrvtt(root: Path, n_videos: int = 7) -> dict:
    rng = np.random.default_rng(2)
    splits = ["train", "train", "train", "validate", "test", "train", "train"][:n_videos]
    videos = [{"video_id": f"video{i}", "split": s, "category": i % 3, "url": f"https://youtu.be/x{i}", "start time": 1.5,
               "end time": 11.0 + i, "id": i} for i, s in enumerate(splits)]
    sentences = [{"video_id": f"video{i}", "caption": f"caption {j} of video {i}", "sen_id": 10 * i + j}
                 for i in range(n_videos) if i not in (4, 6) for j in range(1 + i % 3)]
    sentences.append({"video_id": "video99", "caption": "a caption of no listed video", "sen_id": 999})
    sentences.append({"video_id": "video0", "caption": "  ", "sen_id": 5})  # an empty caption: rejected alone
    (root / "video_features").mkdir(parents=True)
    (root / "audio_features").mkdir()
    (root / "train_val_videodatainfo.json").write_text(json.dumps({"info": {}, "videos": videos[:4] + videos[5:], "sentences": sentences}))
    (root / "test_videodatainfo.json").write_text(json.dumps({"videos": videos[4:5], "sentences": []}))
    features = {}
    for i in range(n_videos):
        video, audio = rng.standard_normal((8 + i, 16)).astype(np.float32), rng.standard_normal((3 + i, 8))
        np.save(root / "video_features" / f"video{i}.npy", video)
        np.save(root / "audio_features" / f"video{i}.npy", audio)
        features[f"video{i}"] = (video.astype(np.float16), audio.astype(np.float16))
    if n_videos == 7:
        (root / "audio_features/video1.npy").unlink()                                         # missing_file
        np.save(root / "video_features/video2.npy", np.full((4, 16), np.inf))                 # nonfinite
        np.save(root / "video_features/video5.npy", np.ones((4, 15)))                          # bad_dim
    return {"videos": {v["video_id"]: v for v in videos}, "sentences": sentences, "features": features,
            "bad": {"video1": "missing_file", "video2": "nonfinite", "video4": "no_captions", "video5": "bad_dim", "video6": "no_captions"}}


def test_msrvtt_round_trip_and_rejects(tmp_path, capsys):
    data = write_msrvtt(tmp_path / "msrvtt")
    out = tmp_path / "shards"
    code, stdout, _ = build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", f"file://{out}")
    assert code == 0, stdout
    manifest, rejects = manifest_of(out), rejects_of(out)
    # inputs are captions, samples are videos: a bad video rejects each of its captions plus a line of its own
    caption_lines = {i: r["kind"] for i, r in rejects.items() if "inputs" not in r}
    video_lines = {i: (r["kind"], r["inputs"]) for i, r in rejects.items() if "inputs" in r}
    assert caption_lines == {"5": "bad_caption", "10": "missing_file", "11": "missing_file", "20": "nonfinite",
                             "21": "nonfinite", "22": "nonfinite", "50": "bad_dim", "51": "bad_dim", "52": "bad_dim"}
    assert video_lines == {"video1": ("missing_file", 2), "video2": ("nonfinite", 3), "video4": ("no_captions", 0),
                           "video5": ("bad_dim", 3), "video6": ("no_captions", 0)}
    assert rejects["5"]["item"] == "video0" and "video video0 sen_id 5: caption '  ' is empty" in rejects["5"]["reason"]
    assert manifest["counts"]["train"] == {"input": 10, "written": 1, "rejected": 9,
                                           "rejected_by_kind": {"bad_caption": 1, "missing_file": 2, "nonfinite": 3, "bad_dim": 3},
                                           "videos": {"input": 5, "written": 1, "rejected": 4}}
    assert manifest["counts"]["test"]["videos"] == {"input": 1, "written": 0, "rejected": 1}
    assert list(manifest["splits"]) == ["train", "validate", "test"]
    assert manifest["feature_dims"] == {"video": 16, "audio": 8} and manifest["orphan_captions"] == 1
    assert manifest["members"] == ["audio.npy", "json", "video.npy"]
    assert "audio_features/video1.npy" in rejects["10"]["reason"]
    # the vocabulary: the training split's usable captions only (video3 is in validate)
    tokenizer = load_tokenizer(str(out / manifest["tokenizer"]))
    vocab = tokenizer.get_vocab()
    assert {"caption", "of", "video", "0", "1", "2", "5"} <= set(vocab) and "3" not in vocab
    assert json.loads((out / manifest["caption_stats"]).read_text())["most_frequent"] == "caption 0 of video 0"
    back = read_back(out)
    assert set(back["train"]) == {"video0"} and set(back["validate"]) == {"video3"} and back["test"] == {}
    for split in back.values():
        for key, sample in split.items():
            video, audio = data["features"][key]
            assert np.array_equal(sample.arrays["video"], video) and np.array_equal(sample.arrays["audio"], audio)
            captions = [s for s in data["sentences"] if s["video_id"] == key and s["caption"].strip()]
            assert sample.meta["captions"] == [s["caption"] for s in captions]
            assert sample.meta["sen_ids"] == [s["sen_id"] for s in captions]
            assert {k: sample.meta[k] for k in data["videos"][key]} == data["videos"][key]


def test_msrvtt_training_caption_of_only_unknown_words_is_rejected(tmp_path, capsys):
    """With min_frequency=1 every training word is known, except what the normaliser strips: a caption of
    combining accents only (NFD + StripAccents) has no token at all."""
    data = write_msrvtt(tmp_path / "msrvtt", n_videos=4)
    info = json.loads((tmp_path / "msrvtt" / "train_val_videodatainfo.json").read_text())
    info["sentences"].append({"video_id": "video0", "caption": "\u0301\u0301", "sen_id": 7})
    (tmp_path / "msrvtt" / "train_val_videodatainfo.json").write_text(json.dumps(info))
    assert build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", tmp_path / "out")[0] == 0
    line = rejects_of(tmp_path / "out")["7"]
    assert line["kind"] == "bad_caption" and "has no tokens" in line["reason"] and line["item"] == "video0"
    assert data["videos"]["video0"]["split"] == "train"


# --- the command around the builders ------------------------------------------------------------------

def test_bad_input_is_one_clear_error_line(tmp_path, capsys):
    code, _, err = build(capsys, tmp_path / "nowhere", "--format", "msrvtt", "--out", tmp_path / "out")
    assert code == 2 and err.startswith("lamscale: error: input folder ") and err.strip().endswith("nowhere does not exist")
    write_msrvtt(tmp_path / "msrvtt", n_videos=2)
    code, _, err = build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", tmp_path / "out", "--shard-size", "lots")
    assert code == 2 and "--shard-size: 'lots'" in err and len(err.strip().splitlines()) == 1
    code, _, err = build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", tmp_path / "out", "--video-features", "feats")
    assert code == 2 and str(tmp_path / "msrvtt" / "feats") in err


def test_rebuild_needs_overwrite_and_drops_stale_shards(tmp_path, capsys):
    write_msrvtt(tmp_path / "msrvtt", n_videos=4)
    out = tmp_path / "out"
    assert build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", out, "--max-per-shard", "1")[0] == 0
    assert (out / "train-000002.tar").exists()
    code, _, err = build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", out)
    assert code == 2 and "--overwrite" in err and "manifest.json" in err
    assert build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "validate-000000.tar"]


def test_shard_size_parsing():
    assert parse_size("256MB") == 256 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("500k") == 500_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="--shard-size: '12XB'"):
        parse_size("12XB")


def test_build_into_s3(seaweedfs, tmp_path, capsys, monkeypatch):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    data = write_msrvtt(tmp_path / "msrvtt")
    url = "s3://lamscale-test/msrvtt-shards"
    code, stdout, _ = build(capsys, tmp_path / "msrvtt", "--format", "msrvtt", "--out", url)
    assert code == 0 and f"{url}/train-{{000000..000000}}.tar" in stdout
    assert seaweedfs.fs().exists("lamscale-test/msrvtt-shards/manifest.json")
    assert cli.main(["shards", "verify", url]) == 0
    assert "OK" in capsys.readouterr().out
    sample = read_back(url)["train"]["video0"]
    assert np.array_equal(sample.arrays["video"], data["features"]["video0"][0])
    assert {i for i, r in rejects_of(url).items() if "inputs" in r} == data["bad"].keys()
