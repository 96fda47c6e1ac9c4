"""Every collective the trainer itself runs, on the device the engine computes on.

With `cluster.use_gpu` Ray Train's process group is NCCL, which refuses CPU tensors; gloo (CPU workers)
takes them. Building the control values (stop flag, logged losses, skip counts, eval batch counts) on
the engine's device lets one code path serve both, and keeping every call here keeps it that way.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


class Collectives:
    """all-reduce / all-gather / barrier for the trainer's small control values, on `device`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # NCCL's object collectives stage pickles on the *current* CUDA device
            torch.cuda.set_device(self.device)

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp) -> list[float]:
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu().tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum of `values` over ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Elementwise maximum of `values` over ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank iff `flag` is true on some rank."""
        return self.max([1.0 if flag else 0.0])[0] > 0

    def gather(self, obj: Any, world: int) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index if self.device.index is not None else torch.cuda.current_device()])
        else:
            dist.barrier()
