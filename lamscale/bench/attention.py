"""`lamscale bench attention`: fwd+bwd time and peak memory per backend × N.

Baselines: SDPA without any mask (flash on GPU) and the paper-style dense multiplicative mask.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from lamscale.bench.common import Case, baseline_at, environment, markdown_table, run_cases

# name → (backend, combine); "sdpa-nomask" is no LAM at all, "flex-dense" FlexAttention reading a dense mask
CASES = {
    "sdpa-nomask": (None, None),
    "dense-mul": ("dense", "mul"),
    "chunked-mul": ("chunked", "mul"),
    "chunked-add": ("chunked", "add"),
    "sdpa-add": ("sdpa", "add"),
    "cpp-mul": ("cpp", "mul"),
    "cpp-add": ("cpp", "add"),
    "triton-mul": ("triton", "mul"),
    "triton-add": ("triton", "add"),
    "flex-dense": ("flex", "mul"),
}


def attention_case(name: str, n: int, heads: int, head_dim: int, rank: int, dtype: str, device: str,
                   block: int) -> Callable[[], None]:
    from torch.nn import functional as F

    from lamscale.model.attention import attention
    from lamscale.model.lam import LowRankMask

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    h = torch.rand(1, 1, n, rank, device=device, dtype=dt, requires_grad=True)
    g = (0.1 * torch.randn(1, 1, n, rank, device=device, dtype=dt)).requires_grad_()
    c = torch.ones(1, 1, n, device=device, dtype=dt, requires_grad=True)
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    backend, combine = CASES[name]

    if backend is None:
        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)
    elif backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        dense = LowRankMask(h, g, c).dense().detach()[0, 0]  # the mask materialised, as FlexAttention needs it
        flex = torch.compile(flex_attention)

        def run() -> torch.Tensor:
            return flex(q, k, v, score_mod=lambda s, b, hh, i, j: s * dense[i, j])
    else:
        mask = LowRankMask(h, g, c)

        def run() -> torch.Tensor:
            return attention(q, k, v, mask, valid, combine=combine, backend=backend, block=block)

    def step() -> None:
        out = run()
        out.backward(torch.ones_like(out))
        for t in (q, k, v, h, g, c):
            t.grad = None

    return step


def bench_attention(lengths: list[int], cases: list[str], device: str, heads: int, head_dim: int, rank: int,
                    dtype: str, block: int, repeats: int) -> dict:
    def build(n: int, name: str) -> Case:
        return functools.partial(attention_case, name, n, heads, head_dim, rank, dtype, device, block)

    rows = run_cases(lengths, cases, build, device, repeats, "bench attention")
    for row in rows:  # relative to the maskless SDPA baseline at the same N
        base = baseline_at(rows, row["N"], "sdpa-nomask")
        if base and "ms" in row:
            row["x_sdpa_time"] = row["ms"] / base["ms"]
            row["x_sdpa_mem"] = row["peak_mib"] / max(base["peak_mib"], 1e-3)
    settings = {"heads": heads, "head_dim": head_dim, "rank": rank, "dtype": dtype, "block": block, "batch": 1}
    return {"kind": "attention", "env": environment(device), "settings": settings, "rows": rows,
            "table": markdown_table(rows, ["N", "case", "ms", "peak_mib", "x_sdpa_time", "x_sdpa_mem", "error"])}
