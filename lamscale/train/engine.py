"""DeepSpeed engine from the run config: ZeRO stage, precision, clipping, accumulation, AdamW, warmup-cosine."""
from __future__ import annotations

import importlib
import math
import os
import sys
import types
import warnings

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
        "zero_optimization": {"stage": t.zero_stage, "stage3_param_persistence_threshold": t.zero3_param_persistence},
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


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def _muon_is_never_used(*args, **kwargs):
    raise RuntimeError("lamscale trains with AdamW: DeepSpeed's Muon optimizer is not loaded in its workers")


def _without_muon_compile() -> None:
    # ZeRO's set-up and gradient path import DeepSpeed's Muon modules only to ask isinstance(optimizer,
    # MuonWithAuxAdam) (and, for Muon's parameters alone, call muon_update), and their @torch.compile loads
    # TorchInductor: ~2.5 s of every worker's start. Our optimizer is AdamW, never Muon, so stand-ins
    # (a class nothing is an instance of, an update that is never called) give DeepSpeed the same answers.
    for name in MUON_MODULES:
        if name not in sys.modules:
            stand_in = types.ModuleType(name)
            stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (torch.optim.Optimizer,), {})
            stand_in.muon_update = _muon_is_never_used
            sys.modules[name] = stand_in


def partitioned(engine) -> tuple[int, int]:
    """(parameters ZeRO-3 holds only a shard of on this rank, all parameters)."""
    params = list(engine.module.parameters())
    return sum(hasattr(p, "ds_numel") and not getattr(p, "ds_persist", False) for p in params), len(params)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms and every parameter a module lists in its
    `no_weight_decay()` (embedding and position tables, the LAM key tables, as timm does) do not —
    decay would pull an identity-initialised mask (M ≡ 1) away from identity with no gradient at all."""
    exempt = {f"{prefix}.{name}" if prefix else name
              for prefix, module in model.named_modules() if hasattr(module, "no_weight_decay")
              for name in module.no_weight_decay()}
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and n not in exempt]
    rest = [p for n, p in named if not (p.ndim >= 2 and n not in exempt)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config, world_size: int, use_gpu: bool):
    # DeepSpeed 0.19 gathers with torch's deprecated all_gather_into_tensor: a FutureWarning from every
    # rank that no user can act on (DeepSpeed's to fix), so it is silenced for that one message only.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if not use_gpu:
        _quiet_cpu_deepspeed()
    _without_muon_compile()
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine
