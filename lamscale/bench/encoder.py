"""`lamscale bench encoder`: a training step (fwd+bwd+AdamW) of the LAM encoder vs the vanilla one."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from lamscale.bench.common import Case, baseline_at, environment, markdown_table, measure_paired, run_cases
from lamscale.config import LAMConfig, ModelConfig

TEXT_TOKENS = 32
# name → (lam.layers, lam.combine, backend)
VARIANTS = {
    "vanilla-sdpa": ("none", "mul", "sdpa"),
    "vanilla-chunked": ("none", "mul", "chunked"),
    "lam-mul-chunked": ("all", "mul", "chunked"),
    "lam-mul-cpp": ("all", "mul", "cpp"),
    "lam-add-sdpa": ("all", "add", "sdpa"),
    "lam-mul-triton": ("all", "mul", "triton"),
}


def model_config(variant: str, n: int, dim: int, layers: int, heads: int, block: int) -> ModelConfig:
    lam_layers, combine, backend = VARIANTS[variant]
    lam = LAMConfig(layers=lam_layers, combine=combine, key="token", backend=backend, block=block, rank=16)
    return ModelConfig(dim=dim, layers=layers, heads=heads, video_dim=64, text_dim=32, dropout=0.0,
                       max_clips=n - TEXT_TOKENS, max_text=TEXT_TOKENS, checkpointing=True, lam=lam)


def encoder_case(variant: str, n: int, dim: int, layers: int, heads: int, block: int, dtype: str,
                 device: str) -> Callable[[], None]:
    from lamscale.model.encoder import Encoder

    torch.manual_seed(0)
    cfg = model_config(variant, n, dim, layers, heads, block)
    model = Encoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    video = torch.randn(1, n - TEXT_TOKENS, 64, device=device)
    text = torch.randn(1, TEXT_TOKENS, 32, device=device)
    vv = torch.ones(1, n - TEXT_TOKENS, dtype=torch.bool, device=device)
    tv = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
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
                "variants (lam.layers, lam.combine, backend)": {v: VARIANTS[v] for v in variants}}
    return {"kind": "encoder", "env": environment(device), "settings": settings, "rows": rows,
            "table": markdown_table(rows, ["N", "case", "ms", "tokens_per_s", "x_vanilla_tokens_per_s", "x_vanilla_paired", "peak_mib", "error"])}
