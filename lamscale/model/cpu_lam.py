"""The `cpp` backend: a fused C++ LAM kernel for CPU (cpu_lam_kernel.cpp), forward and backward.

The PyTorch `chunked` path runs about ten separate elementwise passes over each block×N tile, each
out of cache; this kernel builds the same tiles per (sample, query block, head) with BLAS, combines,
pads and softmaxes them in one vectorised pass while they are in cache, and spreads tasks over
ATen's threads. The kernel is compiled once per machine on first use (about a minute, cached in
TORCH_EXTENSIONS_DIR); without a C++ compiler `backend: auto` falls back to `chunked`.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_lam_kernel.cpp")
_EMPTY = torch.empty(0)


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@functools.lru_cache(maxsize=None)
def load_kernel() -> None:
    """Build (first time on this machine) and load the kernel; its ops live in torch.ops.lamscale_cpu."""
    from torch.utils.cpp_extension import load

    # no FP traps or errno: lets the compiler turn the row loops (exp, clamps, selects) into SIMD code
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("LAMSCALE_CPU_ARCH", "native") == "native":
        flags.append("-march=native")  # the JIT build runs on the machine that will use it
    try:
        load(name="lamscale_cpu_lam", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no headers, a broken toolchain…
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"model.lam.backend=cpp: building the C++ kernel failed ({first}); "
                           "use backend chunked, or auto") from e


def _block(n: int, requested: int) -> int:
    # A block×N float tile of about 1 MiB: few enough BLAS calls, still cache-resident (measured 2^16..2^20).
    return max(8, min(requested, (1 << 18) // max(n, 1)))


class CppLAMAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, h, g, c, combine: str, bound: str, block: int):
        masked = h is not None
        B, H, N, _ = q.shape
        ctx.g_batch = g.shape[0] if masked else 0
        if masked:  # the kernel wants every factor per sample: expand the key=position table
            hm = h.shape[1]
            h, g, c = h.expand(B, hm, N, -1), g.expand(B, hm, N, -1), c.expand(B, hm, N)
        # detached: the kernel's inner BLAS calls must not see autograd (this Function owns the graph)
        pad = torch.zeros(key_valid.shape, dtype=q.dtype).masked_fill_(~key_valid, float("-inf"))  # 0 / −inf per key
        args = [t.detach().contiguous() if t is not None else _EMPTY for t in (q, k, v, pad, h, g, c)]
        out, lse = torch.ops.lamscale_cpu.lam_forward(*args, masked, combine == "mul", bound == "sigmoid", block)
        ctx.save_for_backward(*args, out, lse)
        ctx.args = (masked, combine == "mul", bound == "sigmoid", block)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pad, h, g, c, out, lse = ctx.saved_tensors
        masked, mul, sigmoid, block = ctx.args
        delta = (grad_out * out).sum(-1)  # rowsum(dO ⊙ O), the softmax Jacobian's diagonal term
        grads = torch.ops.lamscale_cpu.lam_backward(q, k, v, pad, h, g, c, lse, delta, grad_out.detach().contiguous(),
                                                    masked, mul, sigmoid, block)
        dq, dk, dv = grads[:3]
        dh = dg = dc = None
        if masked:
            dh, dg, dc = grads[3:]
            if ctx.g_batch == 1 and dg.shape[0] != 1:  # a key=position table serves the whole batch
                dg, dc = dg.sum(0, keepdim=True), dc.sum(0, keepdim=True)
        return dq, dk, dv, None, dh, dg, dc, None, None, None


def cpp_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, h: Optional[Tensor], g: Optional[Tensor],
                  c: Optional[Tensor], combine: str, bound: str, block: int) -> Tensor:
    if q.device.type != "cpu":
        raise ValueError(f"the cpp backend runs on CPU; got tensors on {q.device} (use triton or chunked)")
    load_kernel()
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # bf16/fp16 compute in fp32, like the other CPU paths
        q, k, v = q.float(), k.float(), v.float()
        if h is not None:
            h, g, c = h.float(), g.float(), c.float()
    out = CppLAMAttention.apply(q, k, v, key_valid, h, g, c, combine, bound, _block(q.shape[2], block))
    return out.to(dtype)
