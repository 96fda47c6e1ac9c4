"""The grounding task: training windows, per-frame targets, proposals, sliding-window merging."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lamscale.config import load_config
from lamscale.data.movies import MovieSample
from lamscale.data.reader import DataError
from lamscale.tasks import get_task
from lamscale.tasks.grounding import collate, draw_window, random_proposals, sentence_item

FPS = 5.0


def movie(frames: int = 100, sentences=((4.0, 6.0), (10.0, 11.0)), tokens=(3, 2)) -> MovieSample:
    offsets = np.cumsum([0, *tokens])
    meta = {"movie": "m1", "duration": frames / FPS, "fps": FPS,
            "sentences": [{"sid": f"s{i}", "sentence": f"sentence {i}", "timestamps": list(ts),
                           "tokens": [int(offsets[i]), n]} for i, (ts, n) in enumerate(zip(sentences, tokens))]}
    rng = np.random.default_rng(0)
    return MovieSample("m1", meta, rng.standard_normal((frames, 4)).astype(np.float16),
                       rng.standard_normal((int(offsets[-1]), 3)).astype(np.float16))


def task(*overrides: str):
    cfg = load_config("configs/mad_sample.yaml", ["model.video_dim=4", "model.text_dim=3", "model.max_clips=100",
                                                  "task.window=10", *overrides])
    return get_task(cfg)


def test_training_windows_hold_the_moment_at_varied_places_inside_the_movie():
    rng = random.Random(0)
    starts = [draw_window(100, 20, 30, 16, rng) for _ in range(300)]
    assert all(14 <= s <= 20 for s in starts)  # frames 20..29 inside [s, s + 16) and s + 16 ≤ 100
    assert set(starts) == set(range(14, 21))  # every placement occurs: not always centred
    assert {draw_window(100, 95, 100, 16, rng) for _ in range(50)} == {84}  # at the movie's end
    assert {draw_window(12, 3, 5, 16, rng) for _ in range(20)} == {0}  # a movie shorter than the window
    inside = {draw_window(100, 20, 60, 16, rng) for _ in range(300)}  # moment longer than the window
    assert inside == set(range(20, 45))


def test_collate_targets_by_hand():
    # window of 10 frames at 5 fps (span 2 s) starting at frame 18 (3.6 s); the moment is [4.0, 6.0] s,
    # i.e. [0.4, 2.4] s inside the window. Frame centres 0.1, 0.3, …: frames 2..11 → only 2..9 exist.
    item = sentence_item(movie(), 0, 18, 10)
    assert item.meta["timestamps"] == pytest.approx([0.4, 2.4]) and item.meta["gt"] == [4.0, 6.0]
    batch = collate([item], span_frames=10)
    assert batch.foreground[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    # frame 2: centre 0.5 → (0.5 − 0.4) / 2 = 0.05 to the start, (2.4 − 0.5) / 2 = 0.95 to the end
    torch.testing.assert_close(batch.offsets[0, 2], torch.tensor([0.05, 0.95]))
    torch.testing.assert_close(batch.offsets[0, 9], torch.tensor([0.75, 0.25]))
    assert batch.offsets[0, :2].abs().sum() == 0 and batch.tokens == 10 + 3


def test_training_draw_is_seeded_and_eval_yields_each_sentence_over_the_whole_movie():
    t = task()
    ops = t.sample_ops()
    draws = [ops.prepare(movie(), random.Random(k), "shard")[0] for k in range(20)]
    again = [ops.prepare(movie(), random.Random(k), "shard")[0] for k in range(20)]
    assert [d.key for d in draws] == [d.key for d in again] and {d.key for d in draws} == {"m1/s0", "m1/s1"}
    assert all(len(d.video) == 10 for d in draws)
    whole, truncated = ops.prepare(movie(), None, "shard")
    items = list(t.eval_items(whole))
    assert not truncated and [i.meta["query_id"] for i in items] == ["s0", "s1"]
    assert all(len(i.video) == 100 and i.meta["offset_s"] == 0 for i in items)


def test_sliding_windows_cover_the_movie_and_merge_per_sentence():
    t = task("task.eval_window=40", "task.eval_stride=25")
    items = list(t.eval_items(movie()))
    starts = sorted({round(i.meta["offset_s"] * FPS) for i in items})
    assert starts == [0, 25, 50, 60]  # the last window ends with the movie (60 + 40 = 100)
    pieces = [{"query_id": "s0", "movie": "m1", "predicted_times": [[4.0, 6.0], [20.0, 30.0]],
               "predicted_scores": [0.9, 0.1], "tokens": 43},
              {"query_id": "s0", "movie": "m1", "predicted_times": [[4.2, 6.0], [12.0, 14.0]],
               "predicted_scores": [0.8, 0.5], "tokens": 43}]
    merged, truths = t.collect(pieces, [{"query_id": "s0", "timestamps": [4, 6]}] * 2)
    # NMS at 0.3 over both windows: [4.2, 6] overlaps [4, 6] by 0.9 and goes; the rest rank by score
    assert merged == [{"query_id": "s0", "movie": "m1", "predicted_times": [[4.0, 6.0], [12.0, 14.0], [20.0, 30.0]],
                       "predicted_scores": [0.9, 0.5, 0.1], "tokens": 43}]
    assert truths == [{"query_id": "s0", "timestamps": [4, 6]}]


def test_a_movie_longer_than_max_clips_is_one_line_naming_it():
    t = task("model.max_clips=50")
    with pytest.raises(DataError, match="movie 'm1' has 100 frames, more than model.max_clips=50"):
        list(t.eval_items(movie()))


def test_a_too_long_sentence_names_movie_and_sentence_or_is_cut_and_counted():
    long = movie(tokens=(3, 9))
    with pytest.raises(DataError, match="movie 'm1' sentence 's1' has 9 tokens, more than model.max_text=8"):
        task("model.max_text=8").sample_ops().prepare(long, None, "shard")
    cut, truncated = task("model.max_text=8", "data.truncate=true").sample_ops().prepare(long, None, "shard")
    assert truncated and cut.tokens(1).shape == (8, 3)


def test_perfect_outputs_decode_to_the_moment_first():
    t = task()
    item = sentence_item(movie(), 0, 0, 100)  # the whole movie; moment [4, 6] s = frames 20..29
    batch = collate([item], span_frames=10)
    logits = torch.full((1, 100), -8.0)
    logits[0, 20:30] = 8.0
    logits[0, 25] = 9.0  # the best frame: centre 5.1 s
    out = {"fg_logits": logits, "offsets": batch.offsets.clone()}
    record = t.predict(out, batch)[0]
    assert record["predicted_times"][0] == [4.0, 6.0]
    assert len(record["predicted_times"]) <= 100 and record["tokens"] == 103
    scores = record["predicted_scores"]
    assert scores == sorted(scores, reverse=True)
    metrics = t.metrics(*t.collect([record], t.ground_truth(batch)))
    assert metrics["official"]["R@1,IoU=0.7"] == metrics["cone"]["R@1,IoU=0.7"] == 100.0
    assert metrics["brief"]["R1@0.3"] == 100.0 and metrics["longest_forward_tokens"] == 103


def test_random_proposals_score_near_what_their_lengths_predict():
    # 2 s moments in 1000 s movies, 100 random 2 s windows each: a window reaches IoU ≥ 0.5 iff its centre
    # is within 2/3 s of the moment's centre, so R@100 ≈ 1 − (1 − (4/3)/1000)^100 ≈ 12.5 %
    truths = [{"query_id": f"q{i}", "timestamps": [500.0, 502.0], "duration": 1000.0} for i in range(400)]
    t = task()
    chance = t.metrics(t.chance(truths), truths)
    assert 8.0 < chance["official"]["R@100,IoU=0.5"] < 17.0
    assert chance["official"]["R@1,IoU=0.5"] < 1.5


def test_chance_is_the_mean_of_twenty_draws():
    truths = [{"query_id": f"q{i}", "timestamps": [500.0, 502.0], "duration": 1000.0} for i in range(10)]
    t = task()
    draws = [t.metrics(random_proposals(truths, 100, seed), truths)["official"]["R@100,IoU=0.5"] for seed in range(20)]
    assert t.chance_metrics(truths)["official"]["R@100,IoU=0.5"] == round(sum(draws) / 20, 2)
    assert len(set(draws)) > 1  # the draws differ: one of them alone is a noisy chance level
