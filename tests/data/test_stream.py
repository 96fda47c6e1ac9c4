import itertools

import pytest

from lamscale.data.stream import TrainStream, eval_samples
from lamscale.data.urls import absolute_pattern, check_shards, expand_urls
from lamscale.storage import StorageError

TRAIN = "train-{000000..000003}.tar"
VAL = "val-{000000..000001}.tar"


def keys(stream, n):
    return [s.key for s in itertools.islice(iter(stream), n)]


def test_expand_urls_makes_local_paths_absolute(tmp_path):
    urls = expand_urls(f"{tmp_path}/a-{{0..2}}.tar, s3://b/x.tar")
    assert urls == [f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar", f"{tmp_path}/a-2.tar", "s3://b/x.tar"]


def test_a_pipe_pattern_is_one_shell_command_per_shard():
    assert expand_urls("pipe:curl -s http://host/a-{0..1}.tar") == ["pipe:curl -s http://host/a-0.tar",
                                                                   "pipe:curl -s http://host/a-1.tar"]
    assert absolute_pattern(" pipe:cat a.tar ") == "pipe:cat a.tar"
    assert check_shards("pipe:cat /nonexistent/a.tar", "data.train") == ["pipe:cat /nonexistent/a.tar"]  # not probed


def test_check_shards_names_the_missing_url(sample_shards):
    with pytest.raises(StorageError, match="train-000004.tar") as err:
        check_shards(f"{sample_shards}/train-{{000000..000009}}.tar", "data.train")
    assert "data.train" in str(err.value)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_each_epoch(sample_shards, world):
    per_rank = []
    for rank in range(world):
        stream = TrainStream(f"{sample_shards}/{TRAIN}", rank, world, seed=3, buffer=64)
        epoch = []
        for s in stream:
            if stream.epoch > 0:
                break
            epoch.append(s.key)
        per_rank.append(epoch)
    everything = [k for ks in per_rank for k in ks]
    assert len(everything) == len(set(everything)) == 1200


def test_resume_from_state_continues_exactly_across_an_epoch_boundary(sample_shards):
    pattern = f"{sample_shards}/{TRAIN}"
    uninterrupted = keys(TrainStream(pattern, 1, 2, seed=5, buffer=32), 700)  # rank 1 has 600 per epoch
    first = TrainStream(pattern, 1, 2, seed=5, buffer=32)
    head = keys(first, 590)
    resumed = TrainStream(pattern, 1, 2, seed=5, buffer=32)
    resumed.load_state_dict(first.state_dict())
    assert head + keys(resumed, 110) == uninterrupted
    assert resumed.state_dict()["epoch"] == 1


def test_epochs_are_reshuffled_and_seeded(sample_shards):
    pattern = f"{sample_shards}/{TRAIN}"
    a = keys(TrainStream(pattern, 0, 1, seed=1, buffer=64), 2400)
    assert a[:1200] != a[1200:] and sorted(a[:1200]) == sorted(a[1200:])
    assert keys(TrainStream(pattern, 0, 1, seed=2, buffer=64), 50) != a[:50]


def test_eval_split_covers_every_sample_once(sample_shards):
    pattern = f"{sample_shards}/val-{{000000..000001}}.tar"
    parts = [[s.key for s in eval_samples(pattern, r, 3)] for r in range(3)]
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat)) == 400


def test_long_samples_are_refused_or_cut_and_counted(sample_shards):
    """A query longer than model.max_text (or a video longer than max_clips) is an error naming shard,
    key and length; with data.truncate it is cut and counted (train stream and eval), never silently."""
    from lamscale.data.batch import LengthLimit
    from lamscale.data.ops import VideoOps
    from lamscale.data.reader import DataError

    pattern = f"{sample_shards}/{VAL}"
    lengths = {s.key: len(s.text) for s in eval_samples(pattern, 0, 1)}
    long = {k for k, n in lengths.items() if n > 10}
    assert 0 < len(long) < len(lengths)
    with pytest.raises(DataError, match=r"val-00000\d\.tar: sample '[^']+' has 1\d text tokens, more than model.max_text=10"):
        list(eval_samples(pattern, 0, 1, ops=VideoOps(limit=LengthLimit(max_text=10))))
    with pytest.raises(DataError, match=r"has 75 clips, more than model.max_clips=60"):
        list(eval_samples(pattern, 0, 1, ops=VideoOps(limit=LengthLimit(max_clips=60))))
    counts = {}
    cut = list(eval_samples(pattern, 0, 1, ops=VideoOps(limit=LengthLimit(max_text=10, truncate=True)), counts=counts))
    assert counts["truncated"] == len(long) and len(cut) == len(lengths) and max(len(s.text) for s in cut) == 10
    stream = TrainStream(pattern, 0, 1, seed=1, buffer=8, ops=VideoOps(limit=LengthLimit(max_text=10, truncate=True)))
    first_epoch = list(itertools.islice(iter(stream), len(lengths)))
    assert {s.key for s in first_epoch} == set(lengths) and stream.skipped()["truncated"] == len(long)
