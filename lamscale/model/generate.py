"""Caption generation from a decoder over fixed encoder states: greedy and beam search.

Both return the generated ids after [BOS] (B, ≤ max_len − 1), [PAD] after a caption's [EOS]. Greedy with
`cache=False` recomputes the whole prefix at every step: the reference the key/value cache must equal.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lamscale.data.captions import BOS, EOS, PAD
from lamscale.model.decoder import Decoder


def greedy(decoder: Decoder, memory: Tensor, valid: Tensor, max_len: int, cache: bool = True) -> Tensor:
    B = memory.shape[0]
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=memory.device)
    caches = decoder.start(memory)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_len - 1):  # position 0 is [BOS]
        logits = decoder.step(tokens[:, -1:], valid, caches) if cache else decoder.step(tokens, valid, decoder.start(memory))
        nxt = torch.where(done, PAD, logits.argmax(-1))
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == EOS
        if done.all():
            break
    return tokens[:, 1:]


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT's ((5 + |y|) / 6)^α (Wu et al. 2016): α = 0 ranks by total log-probability, larger α favours longer."""
    return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(decoder: Decoder, memory: Tensor, valid: Tensor, max_len: int, beam: int, alpha: float = 0.0) -> Tensor:
    """The best of `beam` hypotheses per input by log-probability / length_penalty. A finished hypothesis
    keeps its score and place among the beams (it continues with [PAD] at no cost)."""
    B, K = memory.shape[0], beam
    device = memory.device
    memory, valid = memory.repeat_interleave(K, 0), valid.repeat_interleave(K, 0)
    caches = decoder.start(memory)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # K copies of one start: only the first may expand, or every beam would be the same
    seqs = torch.full((B * K, 1), BOS, dtype=torch.long, device=device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    for _ in range(max_len - 1):
        logp = torch.log_softmax(decoder.step(seqs[:, -1:], valid, caches).double(), -1)  # (B·K, V)
        V = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, PAD] = 0.0
        top, index = (scores.reshape(-1, 1) + logp).view(B, K * V).topk(K, dim=-1)
        rows = (torch.arange(B, device=device)[:, None] * K + index // V).reshape(-1)
        tokens = (index % V).reshape(-1)
        Decoder.reorder(caches, rows)
        lengths = lengths[rows] + (~finished[rows]).double()
        finished = finished[rows] | (tokens == EOS)
        seqs = torch.cat([seqs[rows], tokens[:, None]], 1)
        scores = top
        if finished.all():
            break
    best = (scores / length_penalty(lengths.view(B, K), alpha)).argmax(-1)
    return seqs.view(B, K, -1)[torch.arange(B, device=device), best, 1:]
