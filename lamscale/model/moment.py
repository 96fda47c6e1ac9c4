"""The moment-retrieval model: the multimodal LAM encoder with per-clip heads."""
from __future__ import annotations

import torch
from torch import nn

from lamscale.config import ModelConfig
from lamscale.model.encoder import Encoder
from lamscale.model.heads import MomentHead


class MomentModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.head = MomentHead(cfg.dim)

    def forward(self, video: torch.Tensor, video_valid: torch.Tensor, text: torch.Tensor,
                text_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.encoder(video, video_valid, text, text_valid))
