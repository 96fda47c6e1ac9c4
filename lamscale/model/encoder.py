"""BERT-like multimodal encoder with Learnable Attention Masks in some or all layers (DESIGN.md §1–2).

    [video clips | text tokens] → per-modality LayerNorm+Linear → + modality type + time/position
    → dropout → L pre-LN blocks (x + Attn(LN x); x + FFN(LN x)) → LayerNorm → video token states

Video comes first, so clip i sits at sequence position i (and at key position i for key=position).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lamscale.config import LAMConfig, ModelConfig
from lamscale.model.attention import Attention
from lamscale.model.lam import MaskGenerator


def lam_layer_indices(spec: Union[str, Sequence[int]], num_layers: int) -> list[int]:
    """Which layers get a LAM: 'all' | 'first' (the paper's single layer) | 'none' | explicit indices."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "first":
        return [0] if num_layers > 0 else []
    if spec == "none":
        return []
    if isinstance(spec, (list, tuple)):
        bad = [i for i in spec if not (isinstance(i, int) and 0 <= i < num_layers)]
        if bad:
            raise ValueError(f"lam.layers: indices {bad} outside 0..{num_layers - 1}")
        return sorted(set(spec))
    raise ValueError(f"lam.layers: expected 'all', 'first', 'none' or a list of indices, got {spec!r}")


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LN Transformer layer; its attention has a MaskGenerator iff `use_lam`."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, lam: LAMConfig, use_lam: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, lam, use_lam)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout)

    def forward(self, x: Tensor, key_valid: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.ffn(self.norm2(x))


class Encoder(nn.Module):
    """Multimodal LAM encoder. forward(video, video_valid, text, text_valid) → video states (B, T, dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.max_clips = cfg.max_clips
        self.max_text = cfg.max_text
        self.checkpointing = cfg.checkpointing
        self.lam_layers = lam_layer_indices(cfg.lam.layers, cfg.layers)

        self.video_proj = nn.Sequential(nn.LayerNorm(cfg.video_dim), nn.Linear(cfg.video_dim, cfg.dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.dim))
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # 0 = video, 1 = text
        self.video_pos = nn.Parameter(torch.zeros(cfg.max_clips, cfg.dim))  # clip time index
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout, cfg.lam, use_lam=i in self.lam_layers)
            for i in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.type_embed, self.video_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The generators own their init (identity mask, default-scale query MLP): restore it.
        for gen in self.mask_generators():
            gen.reset_parameters()

    def mask_generators(self) -> list[MaskGenerator]:
        """One generator per LAM layer, in layer order."""
        return [blk.attn.mask_gen for blk in self.blocks if blk.attn.mask_gen is not None]

    def _embed(self, video: Tensor, video_valid: Tensor, text: Tensor, text_valid: Tensor) -> tuple[Tensor, Tensor]:
        T, L = video.shape[1], text.shape[1]
        if T > self.max_clips:
            raise ValueError(f"video has {T} clips, more than model.max_clips={self.max_clips}")
        if L > self.max_text:
            raise ValueError(f"text has {L} tokens, more than model.max_text={self.max_text}")
        dtype = self.video_pos.dtype  # features arrive as float16 from the shards
        v = self.video_proj(video.to(dtype)) + self.video_pos[:T] + self.type_embed[0]
        t = self.text_proj(text.to(dtype)) + self.text_pos[:L] + self.type_embed[1]
        x = self.drop(torch.cat([v, t], dim=1))
        valid = torch.cat([video_valid, text_valid], dim=1).bool()
        return x, valid

    def forward(self, video: Tensor, video_valid: Tensor, text: Tensor, text_valid: Tensor) -> Tensor:
        x, valid = self._embed(video, video_valid, text, text_valid)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, valid, use_reentrant=False) if recompute else blk(x, valid)
        return self.norm(x)[:, : video.shape[1]]

    @torch.no_grad()
    def mask_maps(
        self,
        video: Tensor,
        video_valid: Tensor,
        text: Tensor,
        text_valid: Tensor,
        sample: int = 0,
        max_tokens: Optional[int] = None,
    ) -> list[tuple[int, Tensor]]:
        """[(layer, M)] for each LAM layer: sample `sample`'s mask (Hm, n, n) over its n valid tokens.

        Valid video clips come first, then valid text tokens. Computed in eval mode without grad;
        returned as float32 on the CPU. `max_tokens` evenly subsamples longer sequences (movies),
        since the map is O(n²).
        """
        if not -video.shape[0] <= sample < video.shape[0]:
            raise IndexError(f"sample {sample} out of range for batch of {video.shape[0]}")
        sample %= video.shape[0]
        one = slice(sample, sample + 1)
        was_training = self.training
        self.eval()
        try:
            x, valid = self._embed(video[one], video_valid[one], text[one], text_valid[one])
            index = valid[0].nonzero().squeeze(1)
            if max_tokens is not None and index.numel() > max_tokens:
                pick = torch.linspace(0, index.numel() - 1, max_tokens, device=index.device).round().long()
                index = index[pick]
            maps = []
            for i, blk in enumerate(self.blocks[: max(self.lam_layers, default=-1) + 1]):
                if blk.attn.mask_gen is not None:
                    mask = blk.attn.mask_gen.mask(blk.norm1(x))  # the layer's own attention input
                    maps.append((i, mask.select(0, index).dense()[0].float().cpu()))
                x = blk(x, valid)
        finally:
            self.train(was_training)
        return maps
