"""The training loader: exact resume with loader workers, length buckets, training windows, bad data, pipe: URLs."""
from __future__ import annotations

import io
import itertools
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from lamscale.config import ConfigError, load_config
from lamscale.data.bucketing import budget_batches
from lamscale.data.batch import LengthLimit
from lamscale.data.loader import LoaderSpec, TrainLoader
from lamscale.data.ops import VideoOps
from lamscale.data.reader import DataError, ReadOptions, read_samples
from lamscale.data.schema import MomentSample, encode
from lamscale.data.stream import TrainStream, eval_samples
from lamscale.data.urls import expand_urls
from lamscale.data.windows import crop, window_rng

TRAIN = "train-{000000..000003}.tar"  # the embedded sample: 1200 samples in 4 shards of 300
SMALL = "train-{000000..000005}.tar"  # 120 of them in 6 shards of 20 (quick to read)


def keys(samples: list[MomentSample]) -> list[str]:
    return [s.key for s in samples]


def take(loader: TrainLoader, n: int) -> list:
    return list(itertools.islice(iter(loader), n))


@pytest.fixture(scope="module")
def small(sample_shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("small")
    samples = itertools.islice(read_samples(expand_urls(f"{sample_shards}/{TRAIN}"), ReadOptions()), 120)
    for shard, group in itertools.groupby(enumerate(samples), key=lambda item: item[0] // 20):
        with wds.TarWriter(str(out / f"train-{shard:06d}.tar")) as writer:
            for _, sample in group:
                writer.write(encode(sample))
    return str(out)


def spec(shards: str, **kw) -> LoaderSpec:
    return LoaderSpec(f"{shards}/{SMALL}", **{"seed": 5, "batch_size": 8, "shuffle_buffer": 8, **kw})


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_with_two_ranks_and_two_workers_continues_exactly_across_epoch_boundaries(small, rank):
    # a rank holds 3 shards: its worker 0 reads 40 samples per epoch, worker 1 only 20, so the workers
    # cross epoch boundaries at different times; 7 + 24 batches of 8 span several epochs of both
    s = spec(small)
    uninterrupted = TrainLoader(s, rank, 2, 2, keys)
    everything = take(uninterrupted, 31)
    first = TrainLoader(s, rank, 2, 2, keys)
    head = take(first, 7)  # odd: worker 1's turn is next
    state = first.state_dict()
    assert state["next"] == 1 and [p["stream"]["epoch"] for p in state["positions"]] == [0, 1]
    resumed = TrainLoader(s, rank, 2, 2, keys)
    resumed.load_state_dict(state)
    assert head + take(resumed, 24) == everything
    after = resumed.state_dict()
    assert after == uninterrupted.state_dict() and [p["stream"]["epoch"] for p in after["positions"]] == [3, 5]


@pytest.mark.parametrize("workers", [2, 4])  # 3 shards per rank: split by shard, or (4 workers) by sample
def test_ranks_and_workers_partition_each_epoch(small, workers):
    epoch0 = []
    for rank, worker in itertools.product(range(2), range(workers)):
        stream = TrainStream(f"{small}/{SMALL}", rank, 2, seed=1, buffer=4, worker=worker, workers=workers)
        for sample in stream:
            if stream.epoch > 0:
                break
            epoch0.append(sample.key)
    assert len(epoch0) == len(set(epoch0)) == 120


def test_no_workers_one_worker_and_the_single_process_stream_agree(small):
    s = spec(small)
    in_process, one_worker = TrainLoader(s, 1, 2, 0, keys), TrainLoader(s, 1, 2, 1, keys)
    batches = take(in_process, 12)
    assert batches == take(one_worker, 12) and in_process.state_dict() == one_worker.state_dict()
    stream = TrainStream(s.pattern, 1, 2, s.seed, s.shuffle_buffer)  # what ran before loader workers
    samples = iter(stream)
    assert [keys(list(itertools.islice(samples, 8))) for _ in range(9)] == batches[:9]  # batches span epochs
    legacy = TrainLoader(s, 1, 2, 0, keys)
    legacy.load_state_dict({"epoch": stream.epoch, "offset": stream.offset})  # a checkpoint of that format
    assert take(legacy, 3) == batches[9:12]


def test_resume_needs_the_same_number_of_worker_streams(small):
    first = TrainLoader(spec(small), 0, 1, 2, keys)
    take(first, 3)
    with pytest.raises(DataError, match="resume with data.workers=2"):
        TrainLoader(spec(small), 0, 1, 3, keys).load_state_dict(first.state_dict())


def test_a_changed_shard_list_is_refused_at_resume(small):
    first = TrainLoader(spec(small), 0, 1, 0, keys)
    take(first, 3)
    fewer = TrainLoader(LoaderSpec(f"{small}/train-{{000000..000004}}.tar", 5, 8, 8), 0, 1, 0, keys)
    fewer.load_state_dict(first.state_dict())
    with pytest.raises(DataError, match="the shard list changed"):
        take(fewer, 1)


def test_token_budget_batches_fit_the_budget_cover_the_stream_and_resume(small):
    s = spec(small, token_budget=800, bucket_pool=60, ops=VideoOps(limit=LengthLimit(75, 32)))
    batches = take(TrainLoader(s, 0, 1, 2, keys), 16)
    size = {x.key: min(len(x.video), 75) + len(x.text) for x in eval_samples(s.pattern, 0, 1)}
    assert all(len(b) * max(size[k] for k in b) <= 800 for b in batches) and len({len(b) for b in batches}) > 1
    # worker 0 (batches 0, 2, 4…) emits its first pool of 60 samples before anything else
    stream = iter(TrainStream(s.pattern, 0, 1, s.seed, s.shuffle_buffer, worker=0, workers=2))
    first_pool, emitted = {x.key for x in itertools.islice(stream, 60)}, []
    for b in batches[0::2]:
        emitted += b
        if len(emitted) >= 60:
            break
    assert len(emitted) == 60 and set(emitted) == first_pool
    first = TrainLoader(s, 0, 1, 2, keys)
    head = take(first, 5)  # inside a pool
    resumed = TrainLoader(s, 0, 1, 2, keys)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 11) == batches


def test_budget_batches_and_trimmed_padding(small):
    samples = list(eval_samples(f"{small}/{SMALL}", 0, 1))
    batches = budget_batches(samples, 900, VideoOps(limit=LengthLimit(75, 32)).size)
    assert sorted(keys([s for b in batches for s in b])) == sorted(keys(samples))
    for b in batches:
        assert len(b) * (max(min(len(s.video), 75) for s in b) + max(len(s.text) for s in b)) <= 900
    short = [s for b in batches for s in b if len(s.text) < 10][:4]
    from lamscale.tasks.moment_retrieval import collate

    batch = collate(short, 75, 32).trimmed()
    assert batch.text.shape[1] == max(len(s.text) for s in short) < 32
    assert batch.video_valid.all(1).any() and batch.foreground.shape == batch.video_valid.shape


def long_sample(n_clips: int = 500) -> MomentSample:
    meta = {"qid": 1, "vid": "v", "query": "q", "duration": n_clips * 2.0, "clip_len": 2.0,
            "relevant_windows": [[600.0, 640.0]], "relevant_clip_ids": list(range(300, 320)),
            "saliency_scores": [[1, 2, 3]] * 20}
    video = np.arange(n_clips, dtype=np.float16)[:, None].repeat(4, 1)  # clip i holds the value i
    return MomentSample("movie", meta, video, np.zeros((3, 4), np.float16))


def test_training_windows_hold_the_moment_and_are_seeded():
    starts = set()
    for epoch in range(20):
        cut = crop(long_sample(), 64, window_rng(0, epoch, "movie"))
        first = int(cut.video[0, 0])
        starts.add(first)
        assert len(cut.video) == 64 and cut.meta["window"] == [first * 2.0, (first + 64) * 2.0]
        assert cut.meta["relevant_windows"] == [[600.0 - 2 * first, 640.0 - 2 * first]]
        assert cut.meta["relevant_clip_ids"] == list(range(300 - first, 320 - first))
        assert cut.meta["duration"] == 128.0 and len(cut.meta["saliency_scores"]) == 20
        assert cut.meta == crop(long_sample(), 64, window_rng(0, epoch, "movie")).meta
    assert len(starts) > 10  # random across epochs
    inside = crop(long_sample(), 8, window_rng(0, 0, "movie"))  # a window shorter than the moment lies inside it
    assert 300 <= int(inside.video[0, 0]) <= 312 and inside.meta["relevant_windows"] == [[0.0, 16.0]]
    assert crop(long_sample(40), 64, window_rng(0, 0, "movie")).meta == long_sample(40).meta


def test_windowed_training_batches_resume_exactly(small):
    s = spec(small, ops=VideoOps(20, LengthLimit(75, 32)))
    windows = lambda samples: [(x.key, x.meta.get("window", [None])[0]) for x in samples]  # noqa: E731
    everything = take(TrainLoader(s, 0, 1, 0, windows), 12)
    assert all(len(s.video) > 20 for s in eval_samples(s.pattern, 0, 1))
    assert all(start is not None for b in everything for _, start in b)
    first = TrainLoader(s, 0, 1, 0, windows)
    head = take(first, 5)
    resumed = TrainLoader(s, 0, 1, 0, windows)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 7) == everything


# --- bad data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_shards(small, tmp_path_factory) -> tuple[str, str]:
    """The small shards with train-000001 cut in half, and in train-000002 a garbage video .npy (returns its key)."""
    out = tmp_path_factory.mktemp("bad")
    for i in (0, 3, 4, 5):
        shutil.copy(f"{small}/train-{i:06d}.tar", out)
    data = open(f"{small}/train-000001.tar", "rb").read()
    (out / "train-000001.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(f"{small}/train-000002.tar") as src, tarfile.open(out / "train-000002.tar", "w") as dst:
        members = src.getmembers()
        bad = [m for m in members if m.name.endswith(".video.npy")][4]
        for m in members:
            body = src.extractfile(m).read()
            dst.addfile(m, io.BytesIO(b"\x93NUMPY garbage" + bytes(len(body) - 14) if m is bad else body))
    return str(out), bad.name.split(".")[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_raises_one_line_naming_shard_and_key(bad_shards, workers):
    out, bad_key = bad_shards
    lines = []
    for shard in ("train-000002.tar", "train-000001.tar"):
        with pytest.raises(DataError) as err:
            take(TrainLoader(LoaderSpec(f"{out}/{shard}", 0, 8, 4), 0, 1, workers, keys), 10)
        lines.append(str(err.value))
    assert all("\n" not in line for line in lines), lines
    assert lines[0].startswith(f"{out}/train-000002.tar: sample {bad_key!r}: cannot decode")
    assert lines[1].startswith(f"{out}/train-000001.tar: truncated or corrupt tar in sample 'qid")


def test_bad_data_skipped_and_counted(bad_shards, small, capfd):
    out, bad_key = bad_shards
    skip = ReadOptions(on_error="skip")
    readable = keys(read_samples([f"{out}/train-000001.tar"], skip))  # the samples before the cut
    whole = keys(read_samples([f"{small}/train-000001.tar"], skip))
    assert 0 < len(readable) < len(whole) and readable == whole[: len(readable)]
    expected = {k for k in keys(eval_samples(f"{small}/{SMALL}", 0, 1)) if k != bad_key and k not in whole[len(readable):]}

    stream = TrainStream(f"{out}/{SMALL}", 0, 1, seed=2, buffer=4, options=skip)
    epoch0 = [s.key for s in itertools.takewhile(lambda _: stream.epoch == 0, stream)]
    assert sorted(epoch0) == sorted(expected) and stream.skipped_before == {"samples": 1, "shards": 1, "truncated": 0}

    loader = TrainLoader(LoaderSpec(f"{out}/{SMALL}", 0, 8, 4, options=skip), 0, 1, 2, keys)
    got = []
    for batch in loader:
        got += batch
        if min(p["stream"]["epoch"] if p else 0 for p in loader.state_dict()["positions"]) == 1:
            break
    assert set(got) == expected and loader.skipped()["samples"] >= 1 and loader.skipped()["shards"] >= 1
    assert f"skipped (sample): {out}/train-000002.tar: sample {bad_key!r}" in capfd.readouterr().err
    resumed = TrainLoader(loader.spec, 0, 1, 2, keys)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.skipped() == loader.skipped()


# --- pipe: URLs and config -----------------------------------------------------------------------------


def test_pipe_urls_are_refused_unless_allowed(small):
    pattern = f"pipe:cat {small}/{SMALL}"
    with pytest.raises(DataError, match="data.train: 'pipe:cat .*data.allow_pipe=true"):
        take(TrainLoader(LoaderSpec(pattern, 0, 8, 4), 0, 1, 0, keys), 1)
    piped = TrainLoader(LoaderSpec(pattern, 0, 8, 4, options=ReadOptions(allow_pipe=True)), 0, 1, 0, keys)
    assert take(piped, 3) == take(TrainLoader(LoaderSpec(f"{small}/{SMALL}", 0, 8, 4), 0, 1, 0, keys), 3)


@pytest.mark.parametrize("override, named", [
    ("data.train=pipe:curl -s http://h/t-{0..3}.tar", "data.train: 'pipe:curl -s http://h/t-{0..3}.tar' is a pipe: URL"),
    ("data.val=pipe:cat /x.tar", "data.val: 'pipe:cat /x.tar' is a pipe: URL"),
    ("data.workers=-1", "data.workers: expected 0 or more"),
    ("data.on_error=ignore", "data.on_error: expected one of ['raise', 'skip']"),
    ("data.token_budget=50", "data.token_budget: 50 cannot hold one sample"),
    ("data.window=100", "data.window: 100 clips is more than model.max_clips=75"),
])
def test_config_refuses_bad_data_settings_in_one_line(repo_root, override, named):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "tiny.yaml", [override])
    assert named in str(err.value) and "\n" not in str(err.value)
    allowed = ["data.allow_pipe=true", "data.train=pipe:cat /x.tar", "data.workers=2"]
    assert load_config(repo_root / "configs" / "tiny.yaml", allowed).data.workers == 2
