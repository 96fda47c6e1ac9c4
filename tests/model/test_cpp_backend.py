"""The fused C++ CPU kernel (`cpp` backend): float32/bf16 accuracy, threads, memory, and auto selection.

float64 exactness against `dense` for every mode is in test_lam_attention.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lamscale.model import LowRankMask, attention
from lamscale.model.attention import select_backend


def _inputs(n: int, heads: int, hm: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, 16, generator=gen, dtype=dtype) for _ in range(3))
    h = torch.rand(2, hm, n, 4, generator=gen, dtype=dtype)
    g = torch.randn(1, hm, n, 4, generator=gen, dtype=dtype)
    c = 1 + 0.3 * torch.randn(1, hm, n, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, h, g, c)]


def _run(inputs, backend: str, combine: str, bound: str, valid: torch.Tensor, block: int = 64):
    q, k, v, h, g, c = inputs
    out = attention(q, k, v, LowRankMask(h, g, c, bound), valid, combine=combine, backend=backend, block=block)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    return [out, *torch.autograd.grad((out * weight).sum(), inputs)]


@pytest.mark.parametrize("combine,bound", [("mul", "none"), ("mul", "sigmoid"), ("add", "none")])
@pytest.mark.parametrize("hm", [1, 3], ids=["shared", "per_head"])
def test_float32_matches_dense(combine: str, bound: str, hm: int) -> None:
    """Stated tolerance: 1e-4 relative / 1e-5 absolute (fp32 accumulation, a ~2-ulp vectorised exp)."""
    n = 203  # not a multiple of the block
    inputs = _inputs(n, 3, hm)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 150:] = False
    want = _run(inputs, "dense", combine, bound, valid)
    got = _run(inputs, "cpp", combine, bound, valid)
    for name, a, b in zip(["out", *"qkvhgc"], want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_bfloat16_inputs_compute_in_float32() -> None:
    n = 64
    inputs32 = _inputs(n, 2, 1)
    inputs16 = [t.detach().bfloat16().requires_grad_() for t in inputs32]
    valid = torch.ones(2, n, dtype=torch.bool)
    got = _run(inputs16, "cpp", "mul", "none", valid)
    want = _run([t.detach().float().requires_grad_() for t in inputs16], "dense", "mul", "none", valid)
    assert got[0].dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in got[1:])
    for name, a, b in zip(["out", *"qkvhgc"], want, got):
        torch.testing.assert_close(b.float(), a, rtol=2e-2, atol=2e-2, msg=name)


def test_two_threads_equal_one_thread() -> None:
    """Row-summed gradients go through per-thread buffers: more threads must not change the result."""
    n = 300
    inputs = _inputs(n, 2, 1, dtype=torch.float64)
    valid = torch.ones(2, n, dtype=torch.bool)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = _run(inputs, "cpp", "mul", "sigmoid", valid, block=16)
    for a, b in zip(results[1], results[2]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "cpp"])
def test_no_n_squared_allocation_at_4096(backend: str) -> None:
    """The kernel allocates inside one op, so allocations are read from the profiler's memory events."""
    n = 4096
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    h, g = torch.rand(1, 1, n, 4, requires_grad=True), torch.randn(1, 1, n, 4, requires_grad=True)
    c = torch.randn(1, 1, n, requires_grad=True)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, -5:] = False
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = attention(q, k, v, LowRankMask(h, g, c), valid, combine="mul", backend=backend, block=128)
        out.sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) // 4  # float32 elements
    if backend == "dense":
        assert largest >= n * n
    else:
        assert largest < n * n // 16, largest


def test_auto_picks_cpp_on_cpu_for_long_mul() -> None:
    cpu = torch.device("cpu")
    assert select_backend(cpu, "mul", "none", 2048) == "cpp"
    assert select_backend(cpu, "mul", "sigmoid", 512) == "cpp"  # the fused kernel at any length


@pytest.mark.parametrize("combine,bound", [("mul", "none"), ("add", "sigmoid")])
def test_online_softmax_over_key_blocks_with_leading_padding(combine: str, bound: str) -> None:
    """block=8 gives key blocks of 32: with the first 40 keys padded, a row's running max starts at −inf."""
    n = 83
    inputs = _inputs(n, 2, 1, dtype=torch.float64, seed=1)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, :40] = False
    valid[1, 70:] = False
    want = _run(inputs, "dense", combine, bound, valid, block=8)
    got = _run(inputs, "cpp", combine, bound, valid, block=8)
    for name, a, b in zip(["out", *"qkvhgc"], want, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def test_strided_qkv_views_equal_contiguous_inputs() -> None:
    """The encoder hands q, k, v as views into one (B, N, 3, H, d) projection; no copy is made for them."""
    B, N, H, d = 2, 70, 3, 8
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, N, 3, H, d, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.rand(B, 1, N, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, 1, N, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.ones(B, 1, N, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 50:] = False
    results = []
    for prepare in (lambda t: t, lambda t: t.contiguous()):
        q, k, v = (prepare(t) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        out = attention(q, k, v, LowRankMask(h, g, c), valid, combine="mul", backend="cpp", block=16)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        results.append([out, *torch.autograd.grad((out * weight).sum(), (qkv, h, g, c))])
    assert not qkv.permute(2, 0, 3, 1, 4)[0].is_contiguous()
    for name, a, b in zip(["out", "qkv", "h", "g", "c"], *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # out is laid out (B, N, H, d), so the encoder's transpose(1, 2).reshape is a view, not a copy
    assert results[0][0].transpose(1, 2).is_contiguous()


def test_auto_falls_back_to_chunked_when_the_kernel_cannot_load(monkeypatch) -> None:
    from lamscale.model import cpu_lam

    def broken() -> None:
        raise RuntimeError("model.lam.backend=cpp: building the C++ kernel failed (no sgemm_)")

    monkeypatch.setattr(cpu_lam, "load_kernel", broken)
    cpu_lam.kernel_available.cache_clear()
    try:
        assert select_backend(torch.device("cpu"), "mul", "none", 2048) == "chunked"
    finally:
        cpu_lam.kernel_available.cache_clear()


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_load(tmp_path):
    """torch waits forever on its `lock` file; a worker killed inside load() leaves one behind. The next
    load (here a fresh process with the same extensions folder) must still finish."""
    import os
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from lamscale.model import cpu_lam

    build_dir = _get_build_directory(cpu_lam.build_name(cpu_lam.kernel_flags()), verbose=False)
    open(os.path.join(build_dir, "lock"), "w").close()  # what a SIGKILLed holder leaves
    probe = "from lamscale.model.cpu_lam import kernel_available; print(kernel_available())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    assert not os.path.exists(os.path.join(build_dir, "lock"))


def test_the_build_compiles_a_fixed_copy_so_other_checkouts_share_it():
    """A Ray job runs lamscale from its own working_dir copy: had the build compiled the checkout's file,
    its ninja command (which holds the source path) would differ and each side would rebuild the other's."""
    import os

    from torch.utils.cpp_extension import _get_build_directory

    from lamscale.model import cpu_lam

    assert cpu_lam.kernel_available()
    build_dir = _get_build_directory(cpu_lam.build_name(cpu_lam.kernel_flags()), verbose=False)
    ninja = open(os.path.join(build_dir, "build.ninja")).read()
    assert f"compile {build_dir}.cpp" in ninja and str(cpu_lam.SOURCE) not in ninja
    assert open(f"{build_dir}.cpp", "rb").read() == cpu_lam.SOURCE.read_bytes()
