"""Self-attention with an optional Learnable Attention Mask, dispatched to a backend by name.

    S = Q Kᵀ/√d;  mul: S ⊙ M,  add: S + M;  padded keys → −inf;  softmax;  · V

Each backend computes the vanilla case (no mask) through its own masked code path, so a LAM at its
identity init gives bit-identical outputs to vanilla attention on that backend.
- dense:   materialises S and M (the reference, for tests and small N).
- chunked: query blocks of `block` rows with the mask tile h_blk Gᵀ + c built per block and a
           hand-written backward (chunked.py): O(block·N) memory in both passes, never N×N.
- cpp:     the chunked algorithm as one fused C++ kernel for CPU (cpu_lam.py), built on first use.
- sdpa:    additive LAM folded into q/k as r+1 extra head dims: one fused SDPA call, O(N).
- triton:  one fused kernel computing the mask tile beside S = QKᵀ, forward and backward.
- auto:    the fastest exact backend for the device, mode and N.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lamscale.config import LAMConfig
from lamscale.model.chunked import chunked_attention
from lamscale.model.lam import LowRankMask, MaskGenerator, mask_tile

COMBINES = ("mul", "add")


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor,
    h: Optional[Tensor],
    g: Optional[Tensor],
    c: Optional[Tensor],
    combine: str,
    bound: str,
) -> Tensor:
    """Attention of the queries in q (B, H, n, d) over all keys; h holds the same n query rows."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, n, N)
    if h is not None:
        m = mask_tile(h, g, c, bound).to(s.dtype)  # (B, Hm, n, N), broadcasts over heads if Hm = 1
        if combine == "mul":
            s = s * m
        elif bound == "sigmoid":
            # add with M = 2σ(z): the constant 1 is softmax-invariant, so S + (M − 1) is the same
            # attention, and it is exactly S at init (S + 1 would round S and break identity).
            s = s + (m - 1.0)
        else:
            s = s + m
    # Pad after combining, so no mask value can ever un-pad a key.
    s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    low_precision = s.dtype in (torch.float16, torch.bfloat16)
    p = torch.softmax(s, dim=-1, dtype=torch.float32 if low_precision else None).to(v.dtype)
    return torch.matmul(p, v)


def _dense(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, mask: Optional[LowRankMask], combine: str, block: int
) -> Tensor:
    h, g, c, bound = _factors(mask)
    return _attend(q, k, v, key_valid, h, g, c, combine, bound)


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, mask: Optional[LowRankMask], combine: str, block: int
) -> Tensor:
    h, g, c, bound = _factors(mask)
    return chunked_attention(q, k, v, key_valid, h, g, c, combine, bound, block)


def _cpp(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, mask: Optional[LowRankMask], combine: str, block: int) -> Tensor:
    from lamscale.model.cpu_lam import cpp_attention  # compiled on first use

    h, g, c, bound = _factors(mask)
    return cpp_attention(q, k, v, key_valid, h, g, c, combine, bound, block)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, mask: Optional[LowRankMask], combine: str, block: int) -> Tensor:
    """Additive LAM as plain SDPA: with scale 1/√d, [q, √d·h, √d]·[k, g, c] /√d = q·k/√d + h·g + c.

    M rides along as r+1 extra head dims, so one fused SDPA call (flash on GPU) is exact and O(N).
    Padded keys get a large negative offset on the c column instead of a boolean mask, which would
    force SDPA off its fused kernels.
    """
    B, H, N, d = q.shape
    pad_bias = (~key_valid)[:, None, :].to(q.dtype) * torch.finfo(q.dtype).min / 4  # (B, 1, N), exp → 0
    if mask is None:
        q2, k2, e = q, k, d
        if not key_valid.all():
            q2 = torch.cat([q, q.new_full((B, H, N, 1), d**0.5)], -1)
            k2 = torch.cat([k, pad_bias[:, :, :, None].expand(B, H, N, 1) / d**0.5], -1)
    else:
        if combine != "add" or mask.bound != "none":
            raise ValueError("the sdpa backend computes combine='add' with bound='none'; use chunked or triton")
        root = d**0.5
        h = mask.h.expand(B, H, N, -1)
        g = mask.g.expand(B, H, N, -1)
        c = (mask.c.expand(B, H, N) + pad_bias / root).unsqueeze(-1)
        q2 = torch.cat([q, h * root, q.new_full((B, H, N, 1), root)], -1)
        k2 = torch.cat([k, g.to(k.dtype), c.to(k.dtype)], -1)
    e = q2.shape[-1]
    v2 = v if e == d else torch.nn.functional.pad(v, (0, e - d))  # fused kernels want equal head dims
    out = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, scale=d**-0.5)
    return out[..., :d]


def select_backend(device: torch.device, combine: str, bound: str, n: int) -> str:
    """The fused exact backend for this device and LAM mode (`backend: auto`): additive LAM without a
    bound is plain SDPA (flash on GPU); otherwise the Triton kernel on CUDA and the C++ kernel on CPU,
    falling back to `chunked` where those cannot run. `n` is kept for length-dependent choices."""
    if combine == "add" and bound == "none":
        return "sdpa"  # one fused call on any device
    if device.type == "cuda":
        from lamscale.model.triton_lam import triton_available

        return "triton" if triton_available() else "chunked"
    from lamscale.model.cpu_lam import kernel_available

    return "cpp" if device.type == "cpu" and kernel_available() else "chunked"


def _factors(mask: Optional[LowRankMask]) -> tuple:
    if mask is None:
        return None, None, None, "none"
    return mask.h, mask.g, mask.c, mask.bound


def _triton(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, mask: Optional[LowRankMask], combine: str, block: int) -> Tensor:
    from lamscale.model.triton_lam import triton_attention  # triton is optional: import on use

    return triton_attention(q, k, v, key_valid, mask, combine)


BACKENDS: dict[str, Callable[..., Tensor]] = {"dense": _dense, "chunked": _chunked, "cpp": _cpp, "sdpa": _sdpa,
                                              "triton": _triton}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[LowRankMask] = None,
    key_valid: Optional[Tensor] = None,
    combine: str = "mul",
    backend: str = "chunked",
    block: int = 128,
) -> Tensor:
    """(Masked) softmax attention. q, k, v: (B, H, N, d); key_valid: (B, N) bool, True = real token.

    mask=None is vanilla attention through the same code path. Returns (B, H, N, d).
    """
    if backend == "auto":
        backend = select_backend(q.device, combine, mask.bound if mask is not None else "none", q.shape[2])
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)}")
    if combine not in COMBINES:
        raise ValueError(f"unknown LAM combine {combine!r}; expected one of {COMBINES}")
    if block <= 0:
        raise ValueError(f"attention block must be positive, got {block}")
    B, _, N, _ = q.shape
    if key_valid is None:
        key_valid = torch.ones(B, N, dtype=torch.bool, device=q.device)
    key_valid = key_valid.bool()
    # A sample with no real key at all would give 0/0 in softmax; let it attend everywhere instead
    # (its outputs are never used, but they, and their gradients, stay finite).
    key_valid = key_valid | ~key_valid.any(dim=-1, keepdim=True)
    return BACKENDS[backend](q, k, v, key_valid, mask, combine, block)


class Attention(nn.Module):
    """Multi-head self-attention; with `use_lam`, its own MaskGenerator fed this layer's input."""

    def __init__(self, dim: int, num_heads: int, dropout: float, lam: LAMConfig, use_lam: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.combine = lam.combine
        self.backend = lam.backend
        self.block = lam.block
        # A None attribute is not a registered module: vanilla state dicts have no generator keys.
        self.mask_gen = MaskGenerator(dim, num_heads, lam) if use_lam else None

    def forward(self, x: Tensor, key_valid: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.mask_gen.mask(x, positions) if self.mask_gen is not None else None
        out = attention(q, k, v, mask, key_valid, combine=self.combine, backend=self.backend, block=self.block)
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))

    def extra_repr(self) -> str:
        lam = f", combine={self.combine}" if self.mask_gen is not None else ""
        return f"heads={self.num_heads}, backend={self.backend}, block={self.block}{lam}"
