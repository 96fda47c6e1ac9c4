"""Helpers shared by tests (importable: tests/ is on sys.path via tests/conftest.py)."""
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class NumelRecorder(TorchDispatchMode):
    """Records the largest tensor any op produces (forward, recomputation and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def lamscale_env(extra: dict | None = None) -> dict:
    """Environment for a `python -m lamscale` subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env
