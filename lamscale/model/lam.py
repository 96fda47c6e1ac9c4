"""The Learnable Attention Mask: a low-rank mask M = H Gᵀ + 1 cᵀ and the module that generates it.

DESIGN.md §1. Per layer, a small per-token MLP gives the query factor h_i (rank r); the key side
(g_j, c_j) comes either from a learned table indexed by position (the paper's last
Linear(r→N_max)) or from a second per-token MLP (length-free). The mask is kept factored so the
attention backends can build it tile by tile and never hold an N×N tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lamscale.config import LAMConfig

BOUNDS = ("none", "sigmoid")


def apply_bound(z: Tensor, bound: str) -> Tensor:
    """Map the pre-bound mask z to M. sigmoid: M = 2σ(z) ∈ (0, 2), equal to 1 at z = 0."""
    if bound == "none":
        return z
    if bound == "sigmoid":
        return 2.0 * torch.sigmoid(z)
    raise ValueError(f"unknown LAM bound {bound!r}; expected one of {BOUNDS}")


def mask_tile(h: Tensor, g: Tensor, c: Tensor, bound: str) -> Tensor:
    """M for the query rows in `h` against every key: (B, Hm, n, r), (B|1, Hm, N, r), (B|1, Hm, N) → (B, Hm, n, N)."""
    z = torch.matmul(h, g.transpose(-1, -2)) + c.unsqueeze(-2)
    return apply_bound(z, bound)


@dataclass
class LowRankMask:
    """The factors of one layer's mask: M_ij = bound(h_i · g_j + c_j).

    h: (B, Hm, N, r) query factors; g: (B or 1, Hm, N, r) key factors; c: (B or 1, Hm, N) key
    offsets. Hm is 1 (one mask shared by all heads) or the number of heads (per_head).
    """

    h: Tensor
    g: Tensor
    c: Tensor
    bound: str = "none"

    @property
    def num_heads(self) -> int:
        return self.h.shape[1]

    def dense(self) -> Tensor:
        """The whole mask (B, Hm, N, N). O(N²) memory: for tests, references and heatmaps only."""
        return mask_tile(self.h, self.g, self.c, self.bound)

    def select(self, batch: int, index: Tensor) -> "LowRankMask":
        """One sample's factors restricted to the tokens in `index` (keeps a batch dim of 1)."""
        gb = batch if self.g.shape[0] > 1 else 0
        cb = batch if self.c.shape[0] > 1 else 0
        return LowRankMask(
            h=self.h[batch : batch + 1, :, index],
            g=self.g[gb : gb + 1, :, index],
            c=self.c[cb : cb + 1, :, index],
            bound=self.bound,
        )


def identity_value(combine: str, bound: str) -> float:
    """Pre-bound z at init such that LAM is plain attention (mul: M ≡ 1, add: M ≡ 0 or constant)."""
    # mul + none needs z = 1; with sigmoid z = 0 already gives M = 2σ(0) = 1 (a constant for add too).
    return 1.0 if (combine == "mul" and bound == "none") else 0.0


def check_key_positions(last: int, max_len: int) -> None:
    """Key positions 0..last-1 must fit the key=position table (checked with Python ints: no GPU sync)."""
    if last > max_len:
        raise ValueError(f"LAM key=position: key position {last - 1} is outside lam.max_len={max_len}; "
                         "raise model.lam.max_len or use model.lam.key=token")


class MaskGenerator(nn.Module):
    """Generates one layer's LowRankMask from that layer's input x (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, cfg: LAMConfig) -> None:
        super().__init__()
        if cfg.heads not in ("shared", "per_head"):
            raise ValueError(f"unknown LAM heads {cfg.heads!r}; expected 'shared' or 'per_head'")
        if cfg.key not in ("position", "token"):
            raise ValueError(f"unknown LAM key {cfg.key!r}; expected 'position' or 'token'")
        if cfg.bound not in BOUNDS:
            raise ValueError(f"unknown LAM bound {cfg.bound!r}; expected one of {BOUNDS}")
        self.mask_heads = 1 if cfg.heads == "shared" else num_heads
        self.rank = cfg.rank
        self.key = cfg.key
        self.bound = cfg.bound
        self.max_len = cfg.max_len
        self.init_value = identity_value(cfg.combine, cfg.bound)
        hm, r = self.mask_heads, cfg.rank

        # Query side, the paper's MLP: Linear-ReLU-Linear-ReLU, r per mask head.
        self.query_mlp = nn.Sequential(
            nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, r * hm), nn.ReLU()
        )
        if cfg.key == "position":
            # The paper's last Linear(r → N_max), stored per mask head: output j has weight g_j, bias c_j.
            self.key_weight = nn.Parameter(torch.empty(hm, cfg.max_len, r))
            self.key_bias = nn.Parameter(torch.empty(hm, cfg.max_len))
        else:
            # Length-free: g_j (r per head) and c_j (1 per head) from x_j; no ReLU, g may be signed.
            # In add mode without a bound, a bias on g or c only adds a per-row constant to the scores,
            # which softmax ignores: it could never learn, so it is left out.
            bias = not (cfg.combine == "add" and cfg.bound == "none")
            self.key_mlp = nn.Sequential(
                nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, hm * (r + 1), bias=bias)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity init: g ≡ 0 and c ≡ init_value, so M is constant and LAM starts as plain attention.

        The query MLP keeps PyTorch's default init: h must be nonzero so that the key side gets a
        gradient at the first step (dM/dg = h), after which the query side gets one too (dM/dh = g).
        """
        for layer in self.query_mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.key == "position":
            nn.init.zeros_(self.key_weight)
            nn.init.constant_(self.key_bias, self.init_value)
        else:
            self.key_mlp[0].reset_parameters()
            last = self.key_mlp[-1]
            nn.init.zeros_(last.weight)
            if last.bias is None:  # add + none: init_value is 0, nothing to set
                return
            with torch.no_grad():
                bias = last.bias.view(self.mask_heads, self.rank + 1)
                bias[:, : self.rank] = 0.0
                bias[:, self.rank] = self.init_value

    def forward(self, x: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The factors (h, g, c) as plain tensors: ZeRO-3's hooks only see tensors in a module's output,
        and they must see these to gather the key table again before its backward.

        `positions` (N,) index the key table for key=position (default 0..N-1): the encoder gives each
        modality its own range, so a token's key does not depend on the batch's padding."""
        B, N, _ = x.shape
        hm, r = self.mask_heads, self.rank
        h = self.query_mlp(x).view(B, N, hm, r).transpose(1, 2)  # (B, Hm, N, r)
        if self.key == "position":
            if positions is None:
                check_key_positions(N, self.max_len)
                g, c = self.key_weight[:, :N], self.key_bias[:, :N]
            else:
                g, c = self.key_weight[:, positions], self.key_bias[:, positions]
            g, c = g.unsqueeze(0), c.unsqueeze(0)  # (1, Hm, N, r), (1, Hm, N)
        else:
            gc = self.key_mlp(x).view(B, N, hm, r + 1).transpose(1, 2)  # (B, Hm, N, r+1)
            g, c = gc[..., :r], gc[..., r]
        return h, g, c

    def query_factors(self, x: Tensor) -> Tensor:
        """h (B, Hm, n, r) of the query rows x (B, n, D): for a cross-attention mask of Lq × Lk."""
        return self.query_mlp(x).view(x.shape[0], x.shape[1], self.mask_heads, self.rank).transpose(1, 2)

    def key_factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(g, c) of the key rows x (B, N, D), key=token: a cross-attention mask takes them from the
        encoder's states, computed once per generation."""
        if self.key != "token":
            raise ValueError("a cross-attention LAM takes its keys from the encoder's states: it needs key=token")
        gc = self.key_mlp(x).view(x.shape[0], x.shape[1], self.mask_heads, self.rank + 1).transpose(1, 2)
        return gc[..., : self.rank], gc[..., self.rank]

    def no_weight_decay(self) -> set[str]:
        """The key table is the mask itself (M = h·g + c): decay would pull c from its identity value."""
        return {"key_weight", "key_bias"} if self.key == "position" else set()

    def mask(self, x: Tensor, positions: Optional[Tensor] = None) -> LowRankMask:
        h, g, c = self(x, positions)
        return LowRankMask(h=h, g=g, c=c, bound=self.bound)

    def extra_repr(self) -> str:
        return f"mask_heads={self.mask_heads}, rank={self.rank}, key={self.key}, bound={self.bound}"
