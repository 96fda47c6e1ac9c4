"""DeepSpeed engine from the run config: ZeRO stage, precision, clipping, accumulation, AdamW, warmup-cosine."""
from __future__ import annotations

import importlib
import math
import os

import torch

from lamscale.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    t = cfg.train
    micro = cfg.data.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # we print our own progress line
        "wall_clock_breakdown": False,
        # our AdamW is a plain torch optimizer: allow it under ZeRO
        "zero_allow_untested_optimizer": True,
    }


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _quiet_cpu_deepspeed() -> None:
    # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at its first start (~75 s); gloo
    # collectives are all we need for CPU workers, so skip that build.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # importlib, not `import deepspeed.comm.torch as m`: that form resolves the attribute
    # deepspeed.comm.torch, which is the torch package itself (deepspeed.comm imports torch).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def build_engine(model: torch.nn.Module, cfg: Config, world_size: int, use_gpu: bool):
    if not use_gpu:
        _quiet_cpu_deepspeed()
    import deepspeed

    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine
