"""Per-token prediction heads on top of the encoder."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MomentHead(nn.Module):
    """Per clip: foreground logit, (start, end) distances to the moment's bounds, saliency score.

    Distances are in units of the padded video length, so they lie in [0, 1] whatever the duration.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.foreground = nn.Linear(dim, 1)
        self.offsets = nn.Linear(dim, 2)
        self.saliency = nn.Linear(dim, 1)

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(states)
        return {
            "fg_logits": self.foreground(h).squeeze(-1),
            "offsets": F.softplus(self.offsets(h)),
            "saliency": self.saliency(h).squeeze(-1),
        }


class GroundingHead(nn.Module):
    """Per frame: foreground logit and (start, end) distances to the moment's bounds (no saliency: MAD
    has none), in units of the training window's span, so a whole movie decodes in the same units."""

    def __init__(self, dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.foreground = nn.Linear(dim, 1)
        self.offsets = nn.Linear(dim, 2)

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(states)
        return {"fg_logits": self.foreground(h).squeeze(-1), "offsets": F.softplus(self.offsets(h))}
