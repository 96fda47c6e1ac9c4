"""Padding variable-length sequences into batches with validity masks."""
from __future__ import annotations

import numpy as np
import torch


def pad_stack(arrays: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, D) arrays into (B, length, D) float32 (cut at `length`) and a (B, length) valid mask."""
    dim = arrays[0].shape[1]
    out = torch.zeros(len(arrays), length, dim)
    valid = torch.zeros(len(arrays), length, dtype=torch.bool)
    for i, a in enumerate(arrays):
        n = min(len(a), length)
        out[i, :n] = torch.from_numpy(np.asarray(a[:n], dtype=np.float32))
        valid[i, :n] = True
    return out, valid
