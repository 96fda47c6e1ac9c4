"""Padding variable-length sequences into batches with validity masks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamscale.data.reader import DataError
from lamscale.data.schema import MomentSample


@dataclass(frozen=True)
class LengthLimit:
    """The longest sample the model takes; a longer one is an error unless `truncate` (then cut and counted)."""

    max_clips: int = 1 << 30
    max_text: int = 1 << 30
    truncate: bool = False

    def fit(self, sample: MomentSample, where: str) -> tuple[MomentSample, bool]:
        """(`sample`, False) when it fits; (the sample cut to the limits, True) when truncation is asked
        for; otherwise a DataError naming `where` (the shard), the key and the lengths."""
        over = [f"{n} {what}, more than model.{key}={limit}"
                for n, what, key, limit in ((len(sample.video), "clips", "max_clips", self.max_clips),
                                            (len(sample.text), "text tokens", "max_text", self.max_text)) if n > limit]
        if not over:
            return sample, False
        if not self.truncate:
            raise DataError(f"{where}: sample {sample.key!r} has {' and '.join(over)}; raise the limit, or set "
                            f"data.truncate=true to cut such samples (counted in TensorBoard data/truncated)")
        return MomentSample(sample.key, sample.meta, sample.video[: self.max_clips], sample.text[: self.max_text]), True


def pad_stack(arrays: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, D) arrays into (B, length, D) float32 and a (B, length) valid mask. Nothing is cut here:
    samples longer than the model takes were refused or truncated (and counted) by `LengthLimit` upstream."""
    longest = max(len(a) for a in arrays)
    if longest > length:
        raise ValueError(f"pad_stack: a sequence of {longest} rows does not fit {length} (LengthLimit not applied?)")
    dim = arrays[0].shape[1]
    out = torch.zeros(len(arrays), length, dim)
    valid = torch.zeros(len(arrays), length, dtype=torch.bool)
    for i, a in enumerate(arrays):
        n = len(a)
        out[i, :n] = torch.from_numpy(np.asarray(a[:n], dtype=np.float32))
        valid[i, :n] = True
    return out, valid
