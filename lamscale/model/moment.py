"""Moment retrieval and grounding models: the multimodal LAM encoder with a per-frame head."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lamscale.config import ModelConfig
from lamscale.model.encoder import Encoder
from lamscale.model.heads import GroundingHead, MomentHead


class FrameModel(nn.Module):
    """Encoder over [frames | text] → the head on each frame's state. The head is built after the encoder
    (`make_head(dim)`), so the seeded initial weights are the same as when each model built its own."""

    def __init__(self, cfg: ModelConfig, make_head: Callable[[int], nn.Module]):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.head = make_head(cfg.dim)

    def forward(self, video: torch.Tensor, video_valid: torch.Tensor, text: torch.Tensor,
                text_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.encoder(video, video_valid, text, text_valid))


class MomentModel(FrameModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, MomentHead)


class GroundingModel(FrameModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, GroundingHead)
