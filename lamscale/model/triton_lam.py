"""A fused Triton kernel for LAM attention, forward and backward (FlashAttention-2 style).

DESIGN.md §1, §6. For each (query block, key block) tile the kernel computes, side by side,

    S   = Q_blk K_blkᵀ · scale
    z   = H_blk G_blkᵀ + c_blk            (the low-rank mask tile; never an N×N tensor in memory)
    M   = z (bound 'none') or 2σ(z) (bound 'sigmoid')
    T   = S ⊙ M (mul) | S + M (add; S + (M − 1) with sigmoid, as the reference backends do)
    T   = −inf where the key is padded (after combining, so no mask can un-pad a key)

with an online softmax over key blocks. Only O and the row logsumexp are stored; the backward
recomputes S, M and P tile by tile in two deterministic passes (no atomics):

- a key-block pass that accumulates dK, dV, dG and dc over every query block;
- a query-block pass that accumulates dQ and dH over every key block.

Broadcast mask factors (g/c with batch dim 1 — key=position —, and Hm = 1 — shared over heads —)
enter the kernels through zero strides; their gradients are produced per (batch, head) in fp32
and summed over the broadcast dims in PyTorch, which costs O(B·H·N·r) memory, never O(N²).

Inputs may be float32, float16 or bfloat16 (q, k, v one dtype; the mask factors their own),
accumulation is float32. The head dim d and the rank r are padded (in registers only, through
masked loads) to a power of two ≥ 16 — no padded copy of any tensor is made. On CUDA d ≤ 256
and r ≤ 128. N need not be a multiple of the block sizes.

triton is imported lazily, and the kernels are jitted on first use: `TRITON_INTERPRET=1`
(Triton's CPU interpreter, for tests) need only be set before the first call.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lamscale.model.lam import BOUNDS, LowRankMask
from lamscale.model.triton_kernels import _kernels

__all__ = ["KernelConfig", "TileConfig", "triton_attention", "triton_available"]

COMBINES = ("mul", "add")
MAX_HEAD_DIM_CUDA = 256
MAX_RANK_CUDA = 128

tl = None  # triton.language, bound by _kernels() on first use (the kernels below refer to it)


# ---------------------------------------------------------------------------------------------
# Availability and configuration
# ---------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when triton imports and there is a CUDA device, or Triton's interpreter is on."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: as good as none
        return False
    return _interpreting() or torch.cuda.is_available()


def _pow2(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class TileConfig:
    """One kernel's launch shape: tile rows (queries) × tile columns (keys), warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if not (_pow2(self.block_m) and _pow2(self.block_n)):
            raise ValueError(f"triton LAM block sizes must be powers of two ≥ 16, got {self.block_m}×{self.block_n}")


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes of the three kernels: forward, backward key pass (dK dV dG dc), query pass (dQ dH).

    In the key pass block_n is the resident key block and block_m the query block it loops over.
    """

    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig

    @classmethod
    def uniform(cls, block: int, num_warps: int = 4, num_stages: int = 2) -> "KernelConfig":
        tile = TileConfig(block, block, num_warps, num_stages)
        return cls(tile, tile, tile)


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Heuristic launch shapes (not autotuned: N varies from sample to sample in training).

    16-bit, d ≤ 128 (Hopper): forward 128×64 with 8 warps (two warp groups of 64 query rows); the
    backward key pass keeps a 128-key block resident and streams 32-query blocks, the query pass
    keeps 128 queries and streams 32 keys — the shapes of Triton's fused-attention tutorial, with
    8 warps for the extra mask tiles and the dG/dH accumulators. Every shape here was compiled
    for sm_90a (ptxas -v) with r = 16 and r = 64 without register spills, except d = 128 fp32
    (16 bytes). fp32 (no tensor cores: full-precision FMA dots) uses small tiles. Under the
    interpreter large tiles just mean fewer Python-level iterations.
    """
    if device.type != "cuda":
        return KernelConfig.uniform(64)
    T = TileConfig
    if dtype == torch.float32:
        if head_dim <= 64:
            return KernelConfig(fwd=T(64, 32, 8, 2), dkdv=T(16, 64, 8, 2), dq=T(64, 32, 8, 2))
        if head_dim <= 128:
            return KernelConfig(fwd=T(32, 32, 8, 2), dkdv=T(16, 32, 8, 2), dq=T(32, 32, 8, 2))
        return KernelConfig(fwd=T(32, 32, 8, 2), dkdv=T(16, 16, 8, 2), dq=T(16, 32, 4, 2))
    if head_dim <= 64:
        return KernelConfig(fwd=T(128, 64, 8, 3), dkdv=T(32, 128, 8, 3), dq=T(128, 32, 8, 3))
    if head_dim <= 128:
        return KernelConfig(fwd=T(128, 64, 8, 2), dkdv=T(32, 128, 8, 2), dq=T(128, 32, 8, 2))
    return KernelConfig(fwd=T(64, 32, 8, 2), dkdv=T(16, 32, 8, 2), dq=T(64, 32, 4, 2))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _block(n: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _unit_last(t: Tensor) -> Tensor:
    """Kernels address the last dim with stride 1."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: full-precision dots like torch.matmul's default (no TF32); 16-bit: tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _LAMAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, h, g, c, combine, bound, config):
        B, H, N, D = q.shape
        has_mask = h is not None
        interpret = q.device.type != "cuda"
        fwd_kernel, _, _ = _kernels(interpret)
        if has_mask:
            r = h.shape[-1]
            hx = h.expand(B, H, N, r)
            gx = g.expand(B, H, N, r)
            cx = c.expand(B, H, N)
        else:
            r = 1
            hx = gx = q  # unused placeholders (HAS_MASK is a constexpr)
            cx = q[..., 0]
        # Output in (B, N, H, d) memory, returned as a (B, H, N, d) view: the caller's
        # out.transpose(1, 2).reshape(B, N, H·d) is then free.
        o = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
        meta = dict(
            HEAD_DIM=D, RANK=r, BLOCK_D=_block(D), BLOCK_R=_block(r),
            HAS_MASK=has_mask, MUL=combine == "mul", SIGMOID=bound == "sigmoid",
            # the mask dot in full fp32 only when the whole call is fp32; beside 16-bit q/k, tf32 is
            # still more precise than the attention scores themselves
            PREC=_precision(q.dtype), MPREC=_precision(hx.dtype) if q.dtype == torch.float32 else "tf32",
        )
        tile = config.fwd
        with _on_device(q):
            fwd_kernel[(_cdiv(N, tile.block_m), B * H)](
                q, k, v, hx, gx, cx, key_valid, o, lse,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(hx), *_strides3(gx), *_strides3(cx),
                key_valid.stride(0), *_strides3(o),
                H, N, D ** -0.5,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages,
                **meta,
            )
        ctx.save_for_backward(q, k, v, key_valid, h, g, c, o, lse)
        ctx.meta = meta
        ctx.config = config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_valid, h, g, c, o, lse = ctx.saved_tensors
        meta, config = ctx.meta, ctx.config
        B, H, N, D = q.shape
        has_mask = meta["HAS_MASK"]
        need = ctx.needs_input_grad  # q, k, v, key_valid, h, g, c, ...
        _, dkdv_kernel, dq_kernel = _kernels(q.device.type != "cuda")
        do = _unit_last(do.to(q.dtype))
        # δ_i = Σ_d dO_id O_id = Σ_j P_ij dP_ij (O(N·d), in PyTorch)
        delta = (do.float() * o.float()).sum(-1).contiguous()  # kernels index it as (B, H, N)
        if has_mask:
            r = meta["RANK"]
            hx, gx, cx = h.expand(B, H, N, r), g.expand(B, H, N, r), c.expand(B, H, N)
        else:
            r = 1
            hx = gx = q
            cx = q[..., 0]
        common = (
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(hx), *_strides3(gx), *_strides3(cx),
            key_valid.stride(0), *_strides3(do),
        )
        dq = dk = dv = dh = dg = dc = None
        with _on_device(q):
            if any(need[i] for i in (1, 2, 5, 6)):
                dk = torch.empty(B, H, N, D, dtype=k.dtype, device=k.device)
                dv = torch.empty(B, H, N, D, dtype=v.dtype, device=v.device)
                dg_full = torch.empty(B, H, N, r, dtype=torch.float32, device=q.device) if has_mask else dk
                dc_full = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if has_mask else dk
                tile = config.dkdv
                dkdv_kernel[(_cdiv(N, tile.block_n), B * H)](
                    q, k, v, hx, gx, cx, key_valid, do, lse, delta, dk, dv, dg_full, dc_full,
                    *common, *_strides3(dk), *_strides3(dv),
                    H, N, D ** -0.5,
                    BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
                    num_stages=tile.num_stages, **meta,
                )
                if has_mask:
                    dg = _reduce_to(dg_full, g).to(g.dtype)
                    dc = _reduce_to(dc_full, c).to(c.dtype)
            if need[0] or need[4]:
                dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
                dh_full = torch.empty(B, H, N, r, dtype=torch.float32, device=q.device) if has_mask else dq
                tile = config.dq
                dq_kernel[(_cdiv(N, tile.block_m), B * H)](
                    q, k, v, hx, gx, cx, key_valid, do, lse, delta, dq, dh_full,
                    *common, *_strides3(dq),
                    H, N, D ** -0.5,
                    BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
                    num_stages=tile.num_stages, **meta,
                )
                if has_mask:
                    dh = _reduce_to(dh_full, h).to(h.dtype)
        return dq, dk, dv, None, dh, dg, dc, None, None, None


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a per-(batch, head) fp32 gradient over the dims along which `like` was broadcast."""
    dims = [i for i in range(like.dim()) if like.shape[i] == 1 and grad.shape[i] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Optional[Tensor],
    mask: Optional[LowRankMask],
    combine: str,
    *,
    config: Optional[KernelConfig] = None,
) -> Tensor:
    """Fused (LAM) attention; the same contract as attention.py's backends.

    q, k, v: (B, H, N, d), one dtype (fp32/fp16/bf16); key_valid: (B, N) bool, True = real token
    (None = all real); mask: LowRankMask with h (B, Hm, N, r), g (B|1, Hm, N, r), c (B|1, Hm, N),
    Hm ∈ {1, H}, or None for vanilla attention; combine: 'mul' | 'add'. Returns (B, H, N, d)
    (memory laid out as (B, N, H, d)). Differentiable in q, k, v, h, g, c.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. `config` overrides the
    launch shapes (block sizes powers of two ≥ 16).
    """
    if combine not in COMBINES:
        raise ValueError(f"unknown LAM combine {combine!r}; expected one of {COMBINES}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not triton_available():
        raise RuntimeError("the triton attention backend needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("triton attention on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)")
    B, H, N, D = q.shape
    if q.device.type == "cuda" and D > MAX_HEAD_DIM_CUDA:
        raise ValueError(f"triton attention supports head dims ≤ {MAX_HEAD_DIM_CUDA} on CUDA, got {D}")

    if key_valid is None:
        key_valid = torch.ones(B, N, dtype=torch.bool, device=q.device)
    if key_valid.shape != (B, N):
        raise ValueError(f"key_valid must be (B, N) = {(B, N)}, got {tuple(key_valid.shape)}")
    key_valid = key_valid.to(device=q.device, dtype=torch.bool)
    # As in attention(): a sample with no real key attends everywhere (finite, unused outputs).
    key_valid = key_valid | ~key_valid.any(dim=-1, keepdim=True)
    key_valid = key_valid.contiguous().view(torch.uint8)

    h = g = c = None
    bound = "none"
    if mask is not None:
        h, g, c, bound = mask.h, mask.g, mask.c, mask.bound
        if bound not in BOUNDS:
            raise ValueError(f"unknown LAM bound {bound!r}; expected one of {BOUNDS}")
        hm, r = h.shape[1], h.shape[-1]
        if h.dim() != 4 or h.shape[0] != B or h.shape[2] != N or hm not in (1, H):
            raise ValueError(f"mask h must be (B, 1|H, N, r) = ({B}, 1|{H}, {N}, r), got {tuple(h.shape)}")
        if g.dim() != 4 or g.shape[0] not in (1, B) or tuple(g.shape[1:]) != (hm, N, r):
            raise ValueError(f"mask g must be (1|B, {hm}, {N}, {r}), got {tuple(g.shape)}")
        if c.dim() != 3 or c.shape[0] not in (1, B) or tuple(c.shape[1:]) != (hm, N):
            raise ValueError(f"mask c must be (1|B, {hm}, {N}), got {tuple(c.shape)}")
        if q.device.type == "cuda" and r > MAX_RANK_CUDA:
            raise ValueError(f"triton attention supports mask ranks ≤ {MAX_RANK_CUDA} on CUDA, got {r}")
        # tl.dot needs one operand dtype: H Gᵀ in the wider of the two, at most fp32 (autograd
        # casts the gradients back to the callers' dtypes).
        dt = torch.promote_types(h.dtype, g.dtype)
        if dt not in (torch.float32, torch.float16, torch.bfloat16):
            dt = torch.float32
        h, g = _unit_last(h.to(dt)), _unit_last(g.to(dt))

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if config is None:
        config = default_config(D, q.device, q.dtype)
    return _LAMAttentionFn.apply(q, k, v, key_valid, h, g, c, combine, bound, config)
