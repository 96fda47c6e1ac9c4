"""A Vision Transformer whose attention layers carry Learnable Attention Masks (DESIGN.md §2, classification).

    image (B, C, H, W) → patches (Conv p×p, stride p) → [CLS | patches] + learned 2-D positions
    → L pre-LN blocks (LAM attention over every token, FFN) → LayerNorm → CLS → linear head

N = 1 + (H/p)·(W/p) is fixed by the image size, so `key: position` indexes the key table by token
index directly. The blocks are the multimodal encoder's, so every LAM switch and backend applies.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lamscale.config import ModelConfig
from lamscale.model.encoder import Block, _MaskCapture, capture_masks, init_weights, lam_layer_indices
from lamscale.model.lam import check_key_positions


class ViT(nn.Module):
    """forward(images) → class logits (B, num_classes)."""

    def __init__(self, cfg: ModelConfig, image_size: int, patch_size: int, channels: int, num_classes: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid = image_size // patch_size
        self.tokens = 1 + self.grid * self.grid
        self.image_size, self.channels, self.checkpointing = image_size, channels, cfg.checkpointing
        self.lam_layers = lam_layer_indices(cfg.lam.layers, cfg.layers)
        if self.lam_layers and cfg.lam.key == "position":
            check_key_positions(self.tokens, cfg.lam.max_len)
        self.patch_embed = nn.Conv2d(channels, cfg.dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        # learned 2-D positions: a row and a column table, summed per patch (the CLS token has its own)
        self.pos_row = nn.Parameter(torch.zeros(self.grid, cfg.dim))
        self.pos_col = nn.Parameter(torch.zeros(self.grid, cfg.dim))
        self.pos_cls = nn.Parameter(torch.zeros(1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout, cfg.lam, use_lam=i in self.lam_layers, extra_hidden=cfg.extra_mlp)
            for i in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        self._capture: _MaskCapture | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, (self.cls_token, self.pos_row, self.pos_col, self.pos_cls),
                     [blk.attn.mask_gen for blk in self.blocks if blk.attn.mask_gen is not None])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_row", "pos_col", "pos_cls"}

    def forward(self, images: Tensor) -> Tensor:
        B, C, H, W = images.shape
        if (C, H, W) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"images are {C}×{H}×{W}, the model takes {self.channels}×{self.image_size}×{self.image_size}")
        patches = self.patch_embed(images.to(self.pos_row.dtype)).flatten(2).transpose(1, 2)  # (B, g·g, D)
        pos = (self.pos_row[:, None] + self.pos_col[None]).flatten(0, 1)
        x = torch.cat([(self.cls_token + self.pos_cls).expand(B, -1, -1), patches + pos], dim=1)
        x = self.drop(x)
        valid = torch.ones(B, self.tokens, dtype=torch.bool, device=x.device)
        if self._capture is not None:
            self._capture.select(valid)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, valid, use_reentrant=False) if recompute else blk(x, valid)
        return self.head(self.norm(x[:, 0]))

    def capture_masks(self, sample: int = 0, max_tokens: int = 512):
        """Forwards inside the block record [(layer, M)] of sample `sample` (CLS first, then patches)."""
        return capture_masks(self, sample, max_tokens)
