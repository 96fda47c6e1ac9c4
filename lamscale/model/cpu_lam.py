"""The `cpp` backend: a fused C++ LAM kernel for CPU (cpu_lam_kernel.cpp), forward and backward.

The PyTorch `chunked` path runs about ten separate elementwise passes over each block×N tile, each
out of cache; this kernel walks q_block × kv_block tiles (FlashAttention's online softmax), builds
each score and mask tile with BLAS, and combines, pads and exponentiates it in one vectorised pass
while it is in cache, with tasks spread over ATen's threads. It is compiled once per machine on
first use (about half a minute, cached in TORCH_EXTENSIONS_DIR); without a C++ compiler
`backend: auto` falls back to `chunked`.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_lam_kernel.cpp")


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@functools.lru_cache(maxsize=None)
def load_kernel() -> None:
    """Build (first time on this machine) and load the kernel; its ops live in torch.ops.lamscale_cpu."""
    from torch.utils.cpp_extension import load

    flags = kernel_flags()
    name = build_name(flags)
    try:
        with _build_lock(name) as build_dir:
            # torch's own lock file (a FileBaton) is taken on every load and waited on forever; a process
            # killed while holding it (a preempted worker) would hang every later run. Under our flock no
            # other lamscale process is in load(), so a leftover torch lock is stale: remove it.
            Path(build_dir, "lock").unlink(missing_ok=True)
            # compiled from a copy at a fixed path: ninja rebuilds whenever the command changes, and the
            # source's path is in it (a Ray job runs lamscale from its own working_dir copy)
            source = Path(build_dir).with_suffix(".cpp")
            if not source.exists():
                partial = source.with_suffix(f".tmp{os.getpid()}")
                shutil.copyfile(SOURCE, partial)
                os.replace(partial, source)
            load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no headers, a broken toolchain…
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"model.lam.backend=cpp: building the C++ kernel failed ({first}); "
                           "use backend chunked, or auto") from e


def kernel_flags() -> list[str]:
    # no FP traps or errno: lets the compiler turn the row loops (exp, clamps, selects) into SIMD code
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("LAMSCALE_CPU_ARCH", "native") == "native":
        flags.append("-march=native")  # the JIT build runs on the machine that will use it
    return flags


def build_name(flags: list[str]) -> str:
    """One build folder per kernel source, flags and torch install, so that no two of them take turns
    rebuilding one shared folder (each rebuild costs every waiting process half a minute)."""
    key = SOURCE.read_bytes() + " ".join(flags).encode() + torch.__file__.encode()
    return f"lamscale_cpu_lam_{hashlib.sha256(key).hexdigest()[:12]}"


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[str]:
    """An OS file lock beside the kernel's build folder: released by the kernel when its holder dies."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = _get_build_directory(name, verbose=False)
    with open(os.path.join(os.path.dirname(build_dir), f"{name}.flock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield build_dir
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def kernel_available() -> bool:
    """Whether the kernel builds and loads here: it needs a C++ compiler and a torch whose BLAS exports
    sgemm_ (x86 wheels, MKL). `backend: auto` falls back to `chunked` when it does not."""
    if not compiler_available():
        return False
    try:
        load_kernel()
    except RuntimeError:
        return False
    return True


def _blocks(requested: int) -> tuple[int, int]:
    """(query rows, keys) per tile: at most 128 × 512 floats (256 KiB), which stays in a core's cache at
    any N; measured best at N = 2048 among 32..256 × 256..1024. A smaller lam.block shrinks both."""
    q_block = min(requested, 128)
    return q_block, 4 * q_block


def _rows(t: Tensor) -> Tensor:
    """The kernel takes any batch/head/row strides as long as each row (the last dim) is contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


class CppLAMAttention(torch.autograd.Function):
    """Inputs hx = [h, 1] and gx = [G, c]: the mask tile is one product hx·gxᵀ, and d(gx) carries dc."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, hx, gx, combine: str, bound: str, block: int):
        masked = hx is not None
        B = q.shape[0]
        ctx.gx_batch = gx.shape[0] if masked else 0
        if masked:  # the kernel wants factors per sample: expand a key=position table over the batch
            hx, gx = hx.expand(B, -1, -1, -1), gx.expand(B, -1, -1, -1)
        empty = q.new_empty(0)
        # detached: the kernel's inner BLAS calls must not see autograd (this Function owns the graph)
        pad = torch.zeros(key_valid.shape, dtype=q.dtype).masked_fill_(~key_valid, float("-inf"))  # 0 / −inf per key
        args = [_rows(t.detach()) if t is not None else empty for t in (q, k, v)]  # strided views are fine
        args += [t.detach().contiguous() if t is not None else empty for t in (pad, hx, gx)]
        ctx.flags = (masked, combine == "mul", bound == "sigmoid", *_blocks(block))
        out, lse = torch.ops.lamscale_cpu.lam_forward(*args, *ctx.flags)
        ctx.save_for_backward(*args, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pad, hx, gx, out, lse = ctx.saved_tensors
        delta = (grad_out * out).sum(-1)  # rowsum(dO ⊙ O), the softmax Jacobian's diagonal term
        grads = torch.ops.lamscale_cpu.lam_backward(q, k, v, pad, hx, gx, lse, delta, _rows(grad_out.detach()),
                                                    *ctx.flags)
        dq, dk, dv = grads[:3]
        dhx = dgx = None
        if ctx.flags[0]:
            dhx, dgx = grads[3:]
            if ctx.gx_batch == 1 and dgx.shape[0] != 1:  # a key=position table serves the whole batch
                dgx = dgx.sum(0, keepdim=True)
        return dq, dk, dv, None, dhx, dgx, None, None, None


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
    hx = gx = None
    if h is not None:  # c as an extra factor column: M = [h, 1]·[G, c]ᵀ
        hx = torch.cat([h, h.new_ones(h.shape[:-1] + (1,))], -1)
        gx = torch.cat([g, c.unsqueeze(-1)], -1)
    out = CppLAMAttention.apply(q, k, v, key_valid, hx, gx, combine, bound, block)
    return out.to(dtype)
