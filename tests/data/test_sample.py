import json

import numpy as np

from lamscale.data.sample import FeatureGenerator, tokenize
from lamscale.data.schema import decode, encode


def annotation(qid=7):
    return {"qid": qid, "query": "A man plays the guitar.", "duration": 20, "vid": "v_0.0_20.0",
            "relevant_windows": [[4, 10]], "relevant_clip_ids": [2, 3, 4], "saliency_scores": [[4, 4, 4], [2, 2, 1], [0, 1, 0]]}


def test_generation_is_deterministic_and_shaped():
    gen = FeatureGenerator(video_dim=16, text_dim=8, max_text=32)
    a, b = gen(annotation()), gen(annotation())
    assert np.array_equal(a.video, b.video) and np.array_equal(a.text, b.text)
    assert a.video.shape == (10, 16) and a.text.shape == (len(tokenize("A man plays the guitar.", 32)), 8)
    assert a.video.dtype == np.float16 and a.meta["clip_len"] == 2.0


def test_relevant_clips_carry_the_query_signal_by_saliency():
    gen = FeatureGenerator(video_dim=64, text_dim=32, max_text=32)
    sample = gen(annotation())
    q = gen.projection @ sample.text.astype(np.float64).mean(0)
    q /= np.linalg.norm(q)
    # strip the noise: regenerate with the relevant clips removed and compare
    plain = gen({**annotation(), "relevant_clip_ids": [], "saliency_scores": []})
    lift = (sample.video.astype(np.float64) - plain.video.astype(np.float64)) @ q
    assert lift[2] > lift[3] > lift[4] > 0 and np.allclose(lift[[0, 1, 5, 6, 7, 8, 9]], 0, atol=1e-2)


def test_schema_round_trip():
    sample = FeatureGenerator(8, 4, 32)(annotation())
    back = decode(encode(sample))
    assert back.key == sample.key and back.meta == json.loads(json.dumps(sample.meta))
    assert np.array_equal(back.video, sample.video) and np.array_equal(back.text, sample.text)
