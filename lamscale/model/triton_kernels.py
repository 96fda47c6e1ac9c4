"""Triton kernels of the fused LAM attention (forward, backward dK/dV/dG/dc, backward dQ/dH).

The host side, the autograd Function and the launch shapes are in triton_lam.py. The kernels are
plain functions here: under `from __future__ import annotations` their `tl.constexpr` annotations
stay unevaluated strings, so defining them needs no triton. `_kernels()` jits them on first use and
binds the module global `tl`.
"""
from __future__ import annotations

import functools
import os
import types

tl = None  # triton.language, bound by _kernels()


# Helpers shared by the three kernels (jitted with them; kernels call them like any Triton function).
def _mask_tile(hq, g_base, c_base, offs_n, col_ok, offs_r, r_ok, stride_gn, stride_cn, MPREC: tl.constexpr):
    """Pre-bound mask Z = h_blk·G_blkᵀ + c_blk for a (query block, key block) tile; also returns G_blk."""
    g = tl.load(g_base + offs_n[:, None] * stride_gn + offs_r[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
    cc = tl.load(c_base + offs_n * stride_cn, mask=col_ok, other=0.0).to(tl.float32)
    return tl.dot(hq, tl.trans(g), input_precision=MPREC) + cc[None, :], g


def _combine(s, z, MUL: tl.constexpr, SIGMOID: tl.constexpr):
    """Bound Z into M and combine it with the scores S: returns (logits, M)."""
    if SIGMOID:
        mk = 2.0 * tl.sigmoid(z)
    else:
        mk = z
    if MUL:
        t = s * mk
    elif SIGMOID:
        t = s + (mk - 1.0)  # the constant 1 is softmax-invariant; S stays exact at init
    else:
        t = s + mk
    return t, mk


def _combine_grads(dt, s, mk, MUL: tl.constexpr, SIGMOID: tl.constexpr):
    """From dL/d(logits) to (dL/dS, dL/dZ)."""
    if MUL:
        ds = dt * mk
        dm = dt * s
    else:
        ds = dt
        dm = dt
    if SIGMOID:
        dz = dm * (mk * (1.0 - 0.5 * mk))  # d(2σ(z))/dz = M (1 − M/2)
    else:
        dz = dm
    return ds, dz


def _lam_fwd_kernel(
    Q, K, V, Hq, Gk, Ck, KV, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_hb, stride_hh, stride_hn,
    stride_gb, stride_gh, stride_gn,
    stride_cb, stride_ch, stride_cn,
    stride_kvb,
    stride_ob, stride_oh, stride_on,
    n_heads, N, sm_scale,
    HEAD_DIM: tl.constexpr, RANK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MUL: tl.constexpr, SIGMOID: tl.constexpr,
    PREC: tl.constexpr, MPREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    kv_base = KV + off_b * stride_kvb
    if HAS_MASK:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < RANK
        hq = tl.load(
            Hq + off_b * stride_hb + off_h * stride_hh + offs_m[:, None] * stride_hn + offs_r[None, :],
            mask=row_ok[:, None] & r_ok[None, :], other=0.0,
        )
        g_base = Gk + off_b * stride_gb + off_h * stride_gh
        c_base = Ck + off_b * stride_cb + off_h * stride_ch

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_MASK:
            z, g = _mask_tile(hq, g_base, c_base, offs_n, col_ok, offs_r, r_ok, stride_gn, stride_cn, MPREC)
            t, mk = _combine(s, z, MUL, SIGMOID)
        else:
            t = s
        keep = tl.load(kv_base + offs_n, mask=col_ok, other=0) != 0
        t = tl.where(keep[None, :], t * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet
        p = tl.exp2(t - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = m_i + tl.log2(l_safe)
    tl.store(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


def _lam_bwd_dkdv_kernel(
    Q, K, V, Hq, Gk, Ck, KV, DO, LSE, DELTA, DK, DV, DG, DC,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_hb, stride_hh, stride_hn,
    stride_gb, stride_gh, stride_gn,
    stride_cb, stride_ch, stride_cn,
    stride_kvb,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_heads, N, sm_scale,
    HEAD_DIM: tl.constexpr, RANK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MUL: tl.constexpr, SIGMOID: tl.constexpr,
    PREC: tl.constexpr, MPREC: tl.constexpr,
):
    """One resident key block; loops over query blocks in the transposed (key-major) orientation."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    off_bh = pid_bh.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    kd_mask = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kd_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kd_mask, other=0.0)
    keep = tl.load(KV + off_b * stride_kvb + offs_n, mask=col_ok, other=0) != 0
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    if HAS_MASK:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < RANK
        g = tl.load(Gk + off_b * stride_gb + off_h * stride_gh + offs_n[:, None] * stride_gn + offs_r[None, :],
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        cc = tl.load(Ck + off_b * stride_cb + off_h * stride_ch + offs_n * stride_cn,
                     mask=col_ok, other=0.0).to(tl.float32)
        h_base = Hq + off_b * stride_hb + off_h * stride_hh
        dg = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        dc = tl.zeros([BLOCK_N], tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None],
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # (D, M)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
        # +inf for rows past N: their P is exactly 0, so they add nothing to any column sum.
        lse = tl.load(LSE + off_bh * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + off_bh * N + offs_m, mask=row_ok, other=0.0)

        sT = tl.dot(k, qT, input_precision=PREC) * sm_scale  # (N, M)
        if HAS_MASK:
            hT = tl.load(h_base + offs_m[None, :] * stride_hn + offs_r[:, None],
                         mask=row_ok[None, :] & r_ok[:, None], other=0.0)  # (R, M)
            tT, mT = _combine(sT, tl.dot(g, hT, input_precision=MPREC) + cc[:, None], MUL, SIGMOID)
        else:
            tT = sT
        tT = tl.where(keep[:, None], tT * 1.4426950408889634, float("-inf"))
        pT = tl.exp2(tT - lse[None, :])
        dv += tl.dot(pT.to(DO.dtype.element_ty), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dtT = pT * (dpT - delta[None, :])  # dL/dT, T the combined logits
        if HAS_MASK:
            dsT, dzT = _combine_grads(dtT, sT, mT, MUL, SIGMOID)
            dg += tl.dot(dzT.to(Hq.dtype.element_ty), tl.trans(hT), input_precision=MPREC)
            dc += tl.sum(dzT, 1)
        else:
            dsT = dtT
        dk += tl.dot(dsT.to(Q.dtype.element_ty), tl.trans(qT), input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)
    if HAS_MASK:
        # fp32 per-(batch, head) buffers, contiguous (B, H, N, RANK) and (B, H, N)
        tl.store(DG + off_bh * N * RANK + offs_n[:, None] * RANK + offs_r[None, :], dg,
                 mask=col_ok[:, None] & r_ok[None, :])
        tl.store(DC + off_bh * N + offs_n, dc, mask=col_ok)


def _lam_bwd_dq_kernel(
    Q, K, V, Hq, Gk, Ck, KV, DO, LSE, DELTA, DQ, DH,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_hb, stride_hh, stride_hn,
    stride_gb, stride_gh, stride_gn,
    stride_cb, stride_ch, stride_cn,
    stride_kvb,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    n_heads, N, sm_scale,
    HEAD_DIM: tl.constexpr, RANK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MUL: tl.constexpr, SIGMOID: tl.constexpr,
    PREC: tl.constexpr, MPREC: tl.constexpr,
):
    """One resident query block; loops over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    off_bh = pid_bh.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    qd_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse = tl.load(LSE + off_bh * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + off_bh * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    kv_base = KV + off_b * stride_kvb
    if HAS_MASK:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < RANK
        hq = tl.load(Hq + off_b * stride_hb + off_h * stride_hh + offs_m[:, None] * stride_hn + offs_r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        g_base = Gk + off_b * stride_gb + off_h * stride_gh
        c_base = Ck + off_b * stride_cb + off_h * stride_ch
        dh = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_MASK:
            z, g = _mask_tile(hq, g_base, c_base, offs_n, col_ok, offs_r, r_ok, stride_gn, stride_cn, MPREC)
            t, mk = _combine(s, z, MUL, SIGMOID)
        else:
            t = s
        keep = tl.load(kv_base + offs_n, mask=col_ok, other=0) != 0
        t = tl.where(keep[None, :], t * 1.4426950408889634, float("-inf"))
        p = tl.exp2(t - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PREC)
        dt = p * (dp - delta[:, None])
        if HAS_MASK:
            ds, dz = _combine_grads(dt, s, mk, MUL, SIGMOID)
            dh += tl.dot(dz.to(Gk.dtype.element_ty), g, input_precision=MPREC)
        else:
            ds = dt
        dq += tl.dot(ds.to(K.dtype.element_ty), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)
    if HAS_MASK:
        tl.store(DH + off_bh * N * RANK + offs_m[:, None] * RANK + offs_r[None, :], dh,
                 mask=row_ok[:, None] & r_ok[None, :])


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """Jit the kernels, once per mode (TRITON_INTERPRET is read by triton.jit).

    Each mode gets its own copy of the kernel functions over a namespace holding that mode's jitted
    helpers, so interpreted (CPU tensors) and compiled (GPU) kernels can live in one process.
    """
    global tl
    import triton
    import triton.language

    tl = triton.language
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        namespace = dict(globals())

        def jit(fn):
            return triton.jit(types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__))

        for helper in (_mask_tile, _combine, _combine_grads):
            namespace[helper.__name__] = jit(helper)
        return jit(_lam_fwd_kernel), jit(_lam_bwd_dkdv_kernel), jit(_lam_bwd_dq_kernel)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
