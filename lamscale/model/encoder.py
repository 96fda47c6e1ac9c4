"""BERT-like multimodal encoder with Learnable Attention Masks in some or all layers (DESIGN.md §1–2).

    [video clips | audio frames | text tokens] → per-modality LayerNorm+Linear → + modality type + time/position
    → dropout → L pre-LN blocks (x + Attn(LN x); x + FFN(LN x)) → LayerNorm → video token states
    (`encode`: every token's state, for a decoder to attend to)

Video comes first, so clip i sits at sequence position i; with key=position the LAM key table is indexed
per modality (clip t → t, text token j → max_clips + j, audio frame a → max_clips + max_text + a), so
padding never moves a key. Audio (model.audio_dim > 0) shares the frames' time embedding.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lamscale.config import LAMConfig, ModelConfig
from lamscale.model.attention import Attention
from lamscale.model.lam import LowRankMask, MaskGenerator, check_key_positions


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


def init_weights(model: nn.Module, tables: Sequence[Optional[nn.Parameter]], generators: Sequence[MaskGenerator]) -> None:
    """ViT-style init: tables and Linear weights truncated normal (std 0.02), biases zero; then each LAM
    generator restores its own init (identity mask, default-scale query MLP). The order fixes seeded weights."""
    for p in tables:
        if p is not None:
            nn.init.trunc_normal_(p, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for gen in generators:
        gen.reset_parameters()


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LN Transformer layer; its attention has a MaskGenerator iff `use_lam`. `extra_hidden` > 0 adds a
    per-token MLP branch beside attention, fed the same input a LAM generator is (model.extra_mlp: the
    parameter-matched vanilla control of the ablation)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, lam: LAMConfig, use_lam: bool,
                 extra_hidden: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, lam, use_lam)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout)
        self.extra = nn.Sequential(nn.Linear(dim, extra_hidden), nn.ReLU(), nn.Linear(extra_hidden, dim)) if extra_hidden else None

    def forward(self, x: Tensor, key_valid: Tensor, positions: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, key_valid, positions) + (self.extra(h) if self.extra is not None else 0)
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
        self.lam_key, self.lam_max_len = cfg.lam.key, cfg.lam.max_len

        self.video_proj = nn.Sequential(nn.LayerNorm(cfg.video_dim), nn.Linear(cfg.video_dim, cfg.dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.dim))
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # 0 = video, 1 = text
        if cfg.time_embedding == "table":
            self.video_pos = nn.Parameter(torch.zeros(cfg.max_clips, cfg.dim))  # clip time index
            self.video_time = None
        else:  # depthwise, residual: each frame sees its time_kernel neighbours, whatever the length
            self.video_pos = None
            self.video_time = nn.Conv1d(cfg.dim, cfg.dim, cfg.time_kernel, padding=cfg.time_kernel // 2, groups=cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout, cfg.lam, use_lam=i in self.lam_layers, extra_hidden=cfg.extra_mlp)
            for i in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.audio_proj, self.audio_type = None, None
        if cfg.audio_dim:  # registered last, so configs without audio keep their seeded initial weights
            self.audio_proj = nn.Sequential(nn.LayerNorm(cfg.audio_dim), nn.Linear(cfg.audio_dim, cfg.dim))
            self.audio_type = nn.Parameter(torch.zeros(cfg.dim))
        self._capture: _MaskCapture | None = None  # set inside capture_masks()
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, (self.type_embed, self.video_pos, self.text_pos, self.audio_type), self.mask_generators())

    def no_weight_decay(self) -> set[str]:
        return {"type_embed", "video_pos", "text_pos", "audio_type"}

    def mask_generators(self) -> list[MaskGenerator]:
        """One generator per LAM layer, in layer order."""
        return [blk.attn.mask_gen for blk in self.blocks if blk.attn.mask_gen is not None]

    def _embed(self, video: Tensor, video_valid: Tensor, text: Tensor, text_valid: Tensor, audio: Tensor | None = None,
               audio_valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens, valid, key positions) of [video | audio | text]. A token's position depends only on its
        place in its own modality, never on how the batch was padded."""
        T, L = video.shape[1], text.shape[1]
        A = 0 if audio is None else audio.shape[1]
        if A and self.audio_proj is None:
            raise ValueError("audio features given, but model.audio_dim is 0")
        for n, what, key in ((T, "video has", "clips"), (A, "audio has", "clips")):
            if n > self.max_clips:
                raise ValueError(f"{what} {n} frames, more than model.max_{key}={self.max_clips}")
        if L > self.max_text:
            raise ValueError(f"text has {L} tokens, more than model.max_text={self.max_text}")
        if self.lam_layers and self.lam_key == "position":
            check_key_positions(self.max_clips + self.max_text + A if A else (self.max_clips + L if L else T), self.lam_max_len)
        dtype = self.type_embed.dtype  # features arrive as float16 from the shards
        parts = [self._frames(self.video_proj(video.to(dtype)), video_valid) + self.type_embed[0]]
        if A:
            parts.append(self._frames(self.audio_proj(audio.to(dtype)), audio_valid) + self.audio_type)
        parts.append(self.text_proj(text.to(dtype)) + self.text_pos[:L] + self.type_embed[1])
        x = self.drop(torch.cat(parts, dim=1))
        valid = torch.cat([video_valid, *([audio_valid] if A else []), text_valid], dim=1).bool()
        audio_at = self.max_clips + self.max_text
        positions = torch.cat([torch.arange(T), audio_at + torch.arange(A), self.max_clips + torch.arange(L)]).to(x.device)
        return x, valid, positions

    def _frames(self, v: Tensor, valid: Tensor) -> Tensor:
        """+ time: the position table, or the depthwise conv over zeroed padding (it never leaks into a real frame)."""
        if self.video_time is None:
            return v + self.video_pos[: v.shape[1]]
        v = v * valid[..., None].to(v.dtype)
        return v + self.video_time(v.transpose(1, 2)).transpose(1, 2)

    def forward(self, video: Tensor, video_valid: Tensor, text: Tensor, text_valid: Tensor, audio: Tensor | None = None,
                audio_valid: Tensor | None = None, every_token: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The video frames' states (B, T, dim); `every_token`: every token's state (B, T + A + L, dim), video
        then audio then text, and which are real (a decoder attends to all of them). One entry point, so
        ZeRO-3's forward hook gathers this module's own parameters for either."""
        x, valid, positions = self._embed(video, video_valid, text, text_valid, audio, audio_valid)
        if self._capture is not None:
            self._capture.select(valid)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, valid, positions, use_reentrant=False) if recompute else blk(x, valid, positions)
        x = self.norm(x)
        return (x, valid) if every_token else x[:, : video.shape[1]]

    def capture_masks(self, sample: int = 0, max_tokens: int = 512):
        """Inside the block, forwards record [(layer, M)]: sample `sample`'s mask (Hm, n, n) over its
        valid tokens (clips first, then text), evenly subsampled to at most `max_tokens` (a movie's
        36k×36k map would not fit). The masks come from the model's own forward, so they are right
        under ZeRO-3, whose parameters exist only inside the engine's forward. float32, on the CPU."""
        return capture_masks(self, sample, max_tokens)

    @torch.no_grad()
    def mask_maps(self, video: Tensor, video_valid: Tensor, text: Tensor, text_valid: Tensor, sample: int = 0,
                  max_tokens: int = 512) -> list[tuple[int, Tensor]]:
        """`capture_masks` over one eval-mode forward of the batch (training mode is restored)."""
        if not -video.shape[0] <= sample < video.shape[0]:
            raise IndexError(f"sample {sample} out of range for batch of {video.shape[0]}")
        was_training = self.training
        self.eval()
        try:
            with self.capture_masks(sample % video.shape[0], max_tokens) as maps:
                self(video, video_valid, text, text_valid)
        finally:
            self.train(was_training)
        return maps


@contextmanager
def capture_masks(model: nn.Module, sample: int, max_tokens: int) -> Iterator[list[tuple[int, Tensor]]]:
    """Hooks on the mask generators of `model.blocks`; `model.forward` calls `model._capture.select(valid)`."""
    maps: list[tuple[int, Tensor]] = []
    model._capture = _MaskCapture(sample, max_tokens)
    hooks = [blk.attn.mask_gen.register_forward_hook(partial(model._capture.keep, maps, i))
             for i, blk in enumerate(model.blocks) if blk.attn.mask_gen is not None]
    try:
        yield maps
    finally:
        model._capture = None
        for hook in hooks:
            hook.remove()


class _MaskCapture:
    """The token subset one mask image shows, and the forward hook that draws it."""

    def __init__(self, sample: int, max_tokens: int):
        self.sample, self.max_tokens, self.index = sample, max_tokens, None

    def select(self, valid: Tensor) -> None:
        index = valid[self.sample].nonzero().squeeze(1)
        if index.numel() > self.max_tokens:
            index = index[torch.linspace(0, index.numel() - 1, self.max_tokens, device=index.device).round().long()]
        self.index = index

    def keep(self, maps: list, layer: int, module: MaskGenerator, inputs: tuple, factors: tuple) -> None:
        if self.index is None or any(layer == kept for kept, _ in maps):  # the first forward only
            return
        h, g, c = factors
        mask = LowRankMask(h.detach(), g.detach(), c.detach(), module.bound).select(self.sample, self.index)
        maps.append((layer, mask.dense()[0].float().cpu()))
