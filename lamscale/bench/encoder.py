"""`lamscale bench encoder`: a training step (fwd+bwd+AdamW) of the LAM encoder vs the vanilla one.

Most variants time a plain PyTorch step under autocast, so that backends compare on equal terms. The
`deepspeed` variant times the step the trainer actually takes: the model inside DeepSpeed's engine
(`lamscale.train.engine.build_engine`: bf16 weights with fp32 master copies, ZeRO-2, gradient clipping,
AdamW + warmup-cosine) in a one-process world, with `backend: auto` as the trainer resolves it.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from lamscale.bench.common import (Case, baseline_at, environment, markdown_table, measure_paired, run_cases,
                                   single_process_group)
from lamscale.config import Config, DataConfig, LAMConfig, ModelConfig, TrainConfig

TEXT_TOKENS = 32
# name → (lam.layers, lam.combine, backend, step): step "autocast" is a plain PyTorch step under
# torch.autocast(dtype); "deepspeed-bf16" is the trainer's DeepSpeed bf16 engine step (dtype ignored)
VARIANTS = {
    "vanilla-sdpa": ("none", "mul", "sdpa", "autocast"),
    "vanilla-chunked": ("none", "mul", "chunked", "autocast"),
    "lam-mul-chunked": ("all", "mul", "chunked", "autocast"),
    "lam-mul-cpp": ("all", "mul", "cpp", "autocast"),
    "lam-add-sdpa": ("all", "add", "sdpa", "autocast"),
    "lam-mul-triton": ("all", "mul", "triton", "autocast"),
    "lam-mul-deepspeed": ("all", "mul", "auto", "deepspeed-bf16"),
}
ZERO_STAGE = 2  # what configs/tiny.yaml and configs/qvhighlights.yaml train with


def model_config(variant: str, n: int, dim: int, layers: int, heads: int, block: int) -> ModelConfig:
    lam_layers, combine, backend, _ = VARIANTS[variant]
    lam = LAMConfig(layers=lam_layers, combine=combine, key="token", backend=backend, block=block, rank=16)
    return ModelConfig(dim=dim, layers=layers, heads=heads, video_dim=64, text_dim=32, dropout=0.0,
                       max_clips=n - TEXT_TOKENS, max_text=TEXT_TOKENS, checkpointing=True, lam=lam)


def _inputs(n: int, device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    video = torch.randn(1, n - TEXT_TOKENS, 64, device=device).to(dtype)
    text = torch.randn(1, TEXT_TOKENS, 32, device=device).to(dtype)
    vv = torch.ones(1, n - TEXT_TOKENS, dtype=torch.bool, device=device)
    tv = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    return video, vv, text, tv


def _deepspeed_step(model: torch.nn.Module, model_cfg: ModelConfig, n: int, device: str) -> Callable[[], None]:
    """The trainer's step: DeepSpeed bf16 engine built by build_engine, bf16 inputs as Trainer.fit feeds it."""
    from lamscale.train.engine import build_engine

    single_process_group(device)
    cfg = Config(model=model_cfg, data=DataConfig(batch_size=1),
                 train=TrainConfig(precision="bf16", zero_stage=ZERO_STAGE, warmup_steps=1, max_steps=10**6))
    engine = build_engine(model, cfg, world_size=1, use_gpu=device == "cuda")
    if not engine.bfloat16_enabled() or engine.zero_optimization_stage() != ZERO_STAGE:  # or the row lies
        raise RuntimeError(f"DeepSpeed built bf16={engine.bfloat16_enabled()}, ZeRO-{engine.zero_optimization_stage()}")
    inputs = [x.to(engine.device) for x in _inputs(n, device, torch.bfloat16)]

    def step() -> None:
        loss = engine(*inputs).float().pow(2).mean()
        engine.backward(loss)
        engine.step()  # optimizer, LR schedule, zero_grad: all inside the engine

    return step


def encoder_case(variant: str, n: int, dim: int, layers: int, heads: int, block: int, dtype: str,
                 device: str) -> Callable[[], None]:
    from lamscale.model.encoder import Encoder

    torch.manual_seed(0)
    cfg = model_config(variant, n, dim, layers, heads, block)
    if VARIANTS[variant][3] == "deepspeed-bf16":
        return _deepspeed_step(Encoder(cfg), cfg, n, device)
    model = Encoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    video, vv, text, tv = _inputs(n, device)
    dt = getattr(torch, dtype)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dt, enabled=dt != torch.float32):
            loss = model(video, vv, text, tv).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _add_paired_ratios(rows: list[dict], build: Callable[[int, str], Case], device: str, rounds: int) -> None:
    """x_vanilla_paired: tokens/s against vanilla-sdpa from steps interleaved in one process."""
    from tqdm import tqdm

    todo = [r for r in rows if r["case"] != "vanilla-sdpa" and "ms" in r and baseline_at(rows, r["N"], "vanilla-sdpa")]
    for row in tqdm(todo, desc="bench encoder (paired with vanilla-sdpa)", unit="case"):
        result = measure_paired([build(row["N"], "vanilla-sdpa"), build(row["N"], row["case"])], device, rounds=rounds)
        if "ms" in result:
            vanilla_ms, case_ms = result["ms"]
            row["x_vanilla_paired"] = vanilla_ms / case_ms
            row["paired_ms"] = {"vanilla-sdpa": vanilla_ms, row["case"]: case_ms, "rounds": rounds}


def bench_encoder(lengths: list[int], variants: list[str], device: str, dim: int, layers: int, heads: int,
                  block: int, dtype: str, repeats: int, paired_rounds: int = 8) -> dict:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"bench encoder --cases: unknown variant {','.join(unknown)}; expected some of {','.join(VARIANTS)}")

    def build(n: int, variant: str) -> Case:
        return functools.partial(encoder_case, variant, n, dim, layers, heads, block, dtype, device)

    rows = run_cases(lengths, variants, build, device, repeats, "bench encoder")
    for row in rows:
        if "ms" in row:
            row["tokens_per_s"] = row["N"] / (row["ms"] / 1000)
    for row in rows:
        base = baseline_at(rows, row["N"], "vanilla-sdpa")
        if base and "ms" in row:
            row["x_vanilla_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
    if paired_rounds > 0:
        _add_paired_ratios(rows, build, device, paired_rounds)
    settings = {"dim": dim, "layers": layers, "heads": heads, "block": block, "dtype": dtype, "batch": 1,
                "checkpointing": True, "lam": {"rank": 16, "key": "token", "heads": "shared", "bound": "none"},
                "variants (lam.layers, lam.combine, backend, step)": {v: VARIANTS[v] for v in variants},
                "deepspeed": {"precision": "bf16", "zero_stage": ZERO_STAGE, "world_size": 1}}
    return {"kind": "encoder", "env": environment(device), "settings": settings, "rows": rows,
            "table": markdown_table(rows, ["N", "case", "ms", "tokens_per_s", "x_vanilla_tokens_per_s", "x_vanilla_paired", "peak_mib", "error"])}
