"""The caption decoder: pre-LN blocks of causal self-attention, cross-attention to the encoder's states and
an FFN; token and position embeddings in, a vocabulary projection out.

Cross-attention may carry a LAM (`cross_lam`): a mask of Lq × Lk whose query factors come from the decoder's
tokens and whose key factors come from the encoder's states (key=token), combined as in self-attention.
Generation caches each layer's self-attention keys/values and, once per caption, the cross-attention
keys/values and mask key factors (`start`, `step`). Every parameter lives in a submodule, so methods other
than `forward` (`start`, `step`) are safe under ZeRO-3, whose hooks gather a module's own parameters.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lamscale.config import LAMConfig
from lamscale.model.attention import attention
from lamscale.model.encoder import FeedForward
from lamscale.model.lam import LowRankMask, MaskGenerator

LayerCache = dict[str, Tensor]  # k, v: self-attention so far (B, H, t, d); mk, mv (+ g, c): cross, fixed


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, cross_lam: LAMConfig | None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.qkv, self.self_out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.q, self.kv, self.cross_out = (nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * dim),
                                                       nn.Linear(dim, dim))
        self.norm3, self.ffn = nn.LayerNorm(dim), FeedForward(dim, ffn_mult, dropout)
        self.drop = nn.Dropout(dropout)
        self.mask_gen = None if cross_lam is None else MaskGenerator(dim, heads, dataclasses.replace(cross_lam, key="token"))
        self.combine = cross_lam.combine if cross_lam is not None else "mul"

    def _split(self, x: Tensor, parts: int) -> list[Tensor]:
        B, n, _ = x.shape
        return list(x.view(B, n, parts, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0))  # each (B, H, n, d)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def memory(self, memory: Tensor) -> LayerCache:
        """The cross-attention keys/values (and LAM key factors) of the encoder's states, once per caption."""
        mk, mv = self._split(self.kv(memory), 2)
        cache = {"mk": mk, "mv": mv}
        if self.mask_gen is not None:
            cache["g"], cache["c"] = self.mask_gen.key_factors(memory)
        return cache

    def forward(self, x: Tensor, memory_valid: Tensor, cache: LayerCache) -> Tensor:
        """x (B, n, D): the whole caption (training: causal) or, when `cache` holds self keys, the next token."""
        q, k, v = self._split(self.qkv(self.norm1(x)), 3)
        if "k" in cache:  # generation: this token attends to every earlier one, kept in the cache
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            a = F.scaled_dot_product_attention(q, k, v)
        else:  # right padding: a real token only ever sees earlier (real) tokens
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cache["k"], cache["v"] = k, v
        x = x + self.drop(self.self_out(self._merge(a)))
        y = self.norm2(x)
        (q,) = self._split(self.q(y), 1)
        mask = None
        if self.mask_gen is not None:
            mask = LowRankMask(self.mask_gen.query_factors(y), cache["g"], cache["c"], self.mask_gen.bound)
        a = attention(q, cache["mk"], cache["mv"], mask, memory_valid, combine=self.combine, backend="dense")
        x = x + self.drop(self.cross_out(self._merge(a)))  # Lq × Lk: linear in the encoder's length
        return x + self.ffn(self.norm3(x))


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn_mult: int, dropout: float, max_len: int,
                 cross_lam: LAMConfig | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, ffn_mult, dropout, cross_lam) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            if blk.mask_gen is not None:
                blk.mask_gen.reset_parameters()  # identity mask: cross-LAM starts as plain cross-attention

    def start(self, memory: Tensor) -> list[LayerCache]:
        return [blk.memory(memory) for blk in self.blocks]

    def _run(self, tokens: Tensor, first: int, memory_valid: Tensor, caches: list[LayerCache]) -> Tensor:
        if first + tokens.shape[1] > self.max_len:
            raise ValueError(f"caption of {first + tokens.shape[1]} tokens, more than task.max_caption={self.max_len}")
        positions = torch.arange(first, first + tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(positions))
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, memory_valid, cache)
        return self.out(self.norm(x))

    def forward(self, tokens: Tensor, memory: Tensor, memory_valid: Tensor) -> Tensor:
        """Teacher forcing: logits (B, L, vocab) of the next token at each of `tokens` (B, L)."""
        return self._run(tokens, 0, memory_valid, self.start(memory))

    def step(self, tokens: Tensor, memory_valid: Tensor, caches: list[LayerCache]) -> Tensor:
        """Logits (B, vocab) after `tokens` (B, n): the new tokens go through with the cache (n = 1 per
        step), or a whole prefix with a fresh `start` cache (no reuse: the reference the cache must equal)."""
        first = caches[0]["k"].shape[2] if "k" in caches[0] else 0
        return self._run(tokens, first, memory_valid, caches)[:, -1]

    @staticmethod
    def reorder(caches: list[LayerCache], index: Tensor) -> None:
        """Beam search: row i of every cache becomes row index[i]."""
        for cache in caches:
            for name, t in cache.items():
                cache[name] = t.index_select(0, index)
