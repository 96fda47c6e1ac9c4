"""The `chunked` backend: LAM attention over query blocks with a hand-written backward.

Forward keeps, per query block, only the output and the row log-sum-exp; backward recomputes each
block's scores and mask tile from (q, k, h, g, c) and applies the FlashAttention-2 gradient
equations, extended by the mask's chain rule. Memory is O(block·N) in both passes, and unlike
checkpointing every block, the forward runs once and autograd records no per-block graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lamscale.model.lam import apply_bound


def _scores(q_blk: Tensor, k: Tensor, h_blk: Optional[Tensor], g: Optional[Tensor], c: Optional[Tensor],
            valid: Tensor, combine: str, bound: str, scale: float):
    """(raw scaled scores, mask tile or None, combined + padded scores in fp32 or fp64)."""
    acc = torch.float64 if q_blk.dtype == torch.float64 else torch.float32
    raw = torch.matmul(q_blk, k.transpose(-1, -2)).to(acc) * scale  # (B, H, n, N)
    m = None
    if h_blk is not None:
        z = torch.matmul(h_blk, g.transpose(-1, -2)).to(acc) + c.unsqueeze(-2).to(acc)  # (B, Hm, n, N)
        m = apply_bound(z, bound)
        if combine == "mul":
            s = raw * m
        else:  # with a sigmoid bound, M − 1 keeps S exact at init (the constant is softmax-invariant)
            s = raw + (m - 1.0 if bound == "sigmoid" else m)
    else:
        s = raw.clone()
    return raw, m, s.masked_fill_(~valid[:, None, None, :], float("-inf"))


class ChunkedLAMAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, h, g, c, combine: str, bound: str, block: int):
        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
        for start in range(0, q.shape[2], block):
            rows = slice(start, start + block)
            _, _, s = _scores(q[:, :, rows], k, None if h is None else h[:, :, rows], g, c, key_valid, combine, bound, scale)
            lse[:, :, rows] = torch.logsumexp(s, dim=-1)
            p = s.sub_(lse[:, :, rows, None]).exp_()
            out[:, :, rows] = torch.matmul(p.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, key_valid, h, g, c, out, lse)
        ctx.args = (combine, bound, block, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_valid, h, g, c, out, lse = ctx.saved_tensors
        combine, bound, block, scale = ctx.args
        acc = lse.dtype
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO ⊙ O): the softmax Jacobian's diagonal term
        dq, dk, dv = torch.zeros_like(q, dtype=acc), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        masked = h is not None
        if masked:
            dh = torch.zeros_like(h, dtype=acc)
            dg = torch.zeros(h.shape[0], *g.shape[1:], dtype=acc, device=g.device)  # per sample, reduced below
            dc = torch.zeros(h.shape[0], *c.shape[1:], dtype=acc, device=c.device)
        for start in range(0, q.shape[2], block):
            rows = slice(start, start + block)
            q_blk, do = q[:, :, rows], grad_out[:, :, rows].to(acc)
            h_blk = h[:, :, rows] if masked else None
            raw, m, s = _scores(q_blk, k, h_blk, g, c, key_valid, combine, bound, scale)
            p = s.sub_(lse[:, :, rows, None]).exp_()
            dv += torch.matmul(p.transpose(-1, -2), do)
            # d loss / d s = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), built in place over the dO Vᵀ buffer
            ds = torch.matmul(do, v.to(acc).transpose(-1, -2)).sub_(delta[:, :, rows, None]).mul_(p)
            d_raw = ds
            if masked:
                d_raw = ds * m if combine == "mul" else ds
                dm = raw.mul_(ds) if combine == "mul" else ds
                if m.shape[1] == 1:  # a shared mask serves every head
                    dm = dm.sum(1, keepdim=True)
                dz = dm * (m * (1 - m / 2)) if bound == "sigmoid" else dm  # d(2σ(z))/dz = M(1 − M/2)
                dh[:, :, rows] = torch.matmul(dz, g.to(acc))
                dg += torch.matmul(dz.transpose(-1, -2), h_blk.to(acc))
                dc += dz.sum(-2)
            dq[:, :, rows] = torch.matmul(d_raw, k.to(acc)) * scale
            dk += torch.matmul(d_raw.transpose(-1, -2), q_blk.to(acc)) * scale
        grads = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None]
        if masked:
            if g.shape[0] == 1:  # a key=position table is shared by the batch
                dg, dc = dg.sum(0, keepdim=True), dc.sum(0, keepdim=True)
            grads += [dh.to(h.dtype), dg.to(g.dtype), dc.to(c.dtype)]
        else:
            grads += [None, None, None]
        return (*grads, None, None, None)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, h: Optional[Tensor], g: Optional[Tensor],
                      c: Optional[Tensor], combine: str, bound: str, block: int) -> Tensor:
    return ChunkedLAMAttention.apply(q, k, v, key_valid, h, g, c, combine, bound, block)
