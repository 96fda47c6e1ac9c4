"""The caption decoder and generation, in float64: the key/value cache equals recomputing the prefix, beam
size 1 equals greedy, beam search never scores below greedy, padding never leaks, a cross-attention LAM at
its init is plain cross-attention."""
import pytest
import torch

from lamscale.config import LAMConfig, ModelConfig
from lamscale.data.captions import BOS, EOS, PAD
from lamscale.model.captioner import CaptionModel
from lamscale.model.generate import beam_search, greedy
from lamscale.tasks.captioning import caption_loss

VOCAB, MAX_CAPTION = 40, 12


def model(cross_lam=True, seed=0, audio=True, layers="all"):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, layers=2, heads=4, ffn_mult=2, video_dim=16, audio_dim=8 if audio else 0, max_clips=60,
                      max_text=10, lam=LAMConfig(layers=layers, key="token", rank=4, hidden=16, backend="dense"))
    m = CaptionModel(cfg, VOCAB, 2, MAX_CAPTION, cross_lam).double().eval()
    with torch.no_grad():  # away from the identity init, so every mask and path matters
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    video, video_valid = torch.randn(B, 14, 16, generator=g, dtype=torch.float64), torch.ones(B, 14, dtype=torch.bool)
    audio, audio_valid = torch.randn(B, 6, 8, generator=g, dtype=torch.float64), torch.ones(B, 6, dtype=torch.bool)
    context, context_valid = torch.randint(4, VOCAB, (B, 5), generator=g), torch.ones(B, 5, dtype=torch.bool)
    video_valid[1, 9:], audio_valid[1, 4:], context_valid[0, 2:] = False, False, False
    return video, video_valid, audio, audio_valid, context, context_valid


def sequence_logprob(m, memory, valid, ids):
    """log p(ids | memory) by teacher forcing, over the tokens up to and including the first [EOS]."""
    tokens = torch.cat([torch.full((len(ids), 1), BOS), ids], 1)
    logp = torch.log_softmax(m.decoder(tokens[:, :-1], memory, valid), -1).gather(-1, ids[..., None])[..., 0]
    before_eos = torch.cumsum((ids == EOS).long(), 1) - (ids == EOS).long() == 0
    return (logp * before_eos).sum(1)


@pytest.mark.parametrize("cross_lam", [False, True])
def test_cached_steps_equal_the_whole_prefix_recomputed(cross_lam):
    m = model(cross_lam)
    memory, valid = m.encode(*inputs())
    tokens = torch.cat([torch.full((3, 1), BOS), torch.randint(4, VOCAB, (3, MAX_CAPTION - 1))], 1)
    full = m.decoder(tokens, memory, valid)  # teacher forcing: causal, every position at once
    caches = m.decoder.start(memory)
    for t in range(MAX_CAPTION):
        step = m.decoder.step(tokens[:, t:t + 1], valid, caches)
        assert torch.allclose(step, full[:, t], atol=1e-12, rtol=0), t
    assert torch.equal(greedy(m.decoder, memory, valid, MAX_CAPTION), greedy(m.decoder, memory, valid, MAX_CAPTION, cache=False))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_is_greedy_and_wider_beams_score_no_lower(seed):
    m = model(cross_lam=seed % 2 == 0, seed=seed)
    memory, valid = m.encode(*inputs(B=4, seed=seed))
    best = greedy(m.decoder, memory, valid, MAX_CAPTION)
    assert torch.equal(beam_search(m.decoder, memory, valid, MAX_CAPTION, beam=1), best)
    wide = beam_search(m.decoder, memory, valid, MAX_CAPTION, beam=5)
    width = max(best.shape[1], wide.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD)  # noqa: E731
    assert (sequence_logprob(m, memory, valid, pad(wide)) >= sequence_logprob(m, memory, valid, pad(best)) - 1e-9).all()


def test_generation_stops_at_eos_and_pads_after_it():
    m = model()
    with torch.no_grad():
        m.decoder.out.bias[EOS] = 50.0  # every caption ends at once
    out = m(*inputs(), torch.zeros(3, 0, dtype=torch.long))
    assert out.tolist() == [[EOS]] * 3
    with torch.no_grad():
        m.decoder.out.bias[EOS] = -50.0  # never: generation stops at max_caption (the [BOS] takes one place)
    assert m(*inputs(), torch.zeros(3, 0, dtype=torch.long)).shape == (3, MAX_CAPTION - 1)


def test_padding_never_leaks_into_the_loss_or_the_memory():
    m = model().train()
    m.decoder.drop.p = m.encoder.drop.p = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    video, video_valid, audio, audio_valid, context, context_valid = inputs()
    caption = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 7, 8, 9, 10, EOS], [BOS, 11, EOS, PAD, PAD, PAD]])
    caption_valid = caption != PAD
    caption_valid[:, 0] = True
    logits = m(video, video_valid, audio, audio_valid, context, context_valid, caption)
    loss = caption_loss(logits, caption, caption_valid, 0.0)
    # the same loss by hand: each real next token's −log p, averaged over the 3 + 5 + 2 of them
    logp = torch.log_softmax(logits, -1)
    by_hand = [-logp[b, t, caption[b, t + 1]] for b in range(3) for t in range(5) if caption_valid[b, t + 1]]
    assert len(by_hand) == 10 and torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-12)
    # whatever sits in padded places (caption, frames, audio, context), nothing real changes
    garbage = caption.clone()
    garbage[~caption_valid] = 30
    video2, audio2, context2 = video.clone(), audio.clone(), context.clone()
    video2[~video_valid], audio2[~audio_valid], context2[~context_valid] = 9.0, -9.0, 33
    logits2 = m(video2, video_valid, audio2, audio_valid, context2, context_valid, garbage)
    assert torch.allclose(caption_loss(logits2, garbage, caption_valid, 0.0), loss, atol=1e-12)
    real = caption_valid[:, :-1]
    assert torch.allclose(logits2[real], logits[real], atol=1e-12)


def test_a_sample_generates_the_same_alone_and_in_a_padded_batch():
    m = model()
    video, video_valid, audio, audio_valid, context, context_valid = inputs()
    together = m(video, video_valid, audio, audio_valid, context, context_valid, torch.zeros(3, 0, dtype=torch.long))
    n, a, c = int(video_valid[1].sum()), int(audio_valid[1].sum()), int(context_valid[1].sum())
    alone = m(video[1:2, :n], video_valid[1:2, :n], audio[1:2, :a], audio_valid[1:2, :a], context[1:2, :c],
              context_valid[1:2, :c], torch.zeros(1, 0, dtype=torch.long))
    assert torch.equal(alone[0], together[1, : alone.shape[1]]) and (together[1, alone.shape[1]:] == PAD).all()


def test_cross_attention_lam_at_its_init_is_plain_cross_attention():
    """A vanilla checkpoint loaded into a model with cross-LAM gives the same outputs: M ≡ 1 at init."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, layers=2, heads=4, ffn_mult=2, video_dim=16, audio_dim=8, max_clips=60, max_text=10,
                      lam=LAMConfig(layers="none", key="token", rank=4, hidden=16, backend="dense"))
    vanilla = CaptionModel(cfg, VOCAB, 2, MAX_CAPTION, cross_lam=False).double().eval()
    with_lam = CaptionModel(cfg, VOCAB, 2, MAX_CAPTION, cross_lam=True).double().eval()
    missing, unexpected = with_lam.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and missing and all(".mask_gen." in k for k in missing)
    tokens = torch.randint(4, VOCAB, (3, 7))
    a = with_lam.decoder(tokens, *with_lam.encode(*inputs()))
    b = vanilla.decoder(tokens, *vanilla.encode(*inputs()))
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.equal(with_lam(*inputs(), tokens), vanilla(*inputs(), tokens))
