"""The fused Triton LAM kernel (forward and backward) against the dense reference, under Triton's CPU interpreter.

Tolerances (float32, interpreter): values atol 1e-5 / rtol 1e-4, gradients atol 3e-5 / rtol 3e-4.
The kernel's online softmax and tile-wise sums only reorder fp32 arithmetic: the observed errors
are ~10% of the value tolerance and ~30% of the gradient one (max |Δgrad| ≈ 1e-5).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on the CPU

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lamscale.model.attention import attention  # noqa: E402
from lamscale.model.lam import LowRankMask  # noqa: E402
from lamscale.model.triton_lam import KernelConfig, TileConfig, triton_attention, triton_available  # noqa: E402

B, H, D_HEAD, R = 2, 2, 16, 4
SMALL = KernelConfig.uniform(16)  # many tiles at small N: exercises the online softmax and edges
TALL = KernelConfig(*[TileConfig(block_m=32, block_n=16)] * 3)  # 32 queries × 16 keys: fewer tiles, same edges
VALUE_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=3e-5, rtol=3e-4)


def _qkv(n: int, d: int = D_HEAD, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(B, H, n, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _factors(n: int, hm: int, key_batch: int, r: int = R) -> list[torch.Tensor]:
    h = torch.randn(B, hm, n, r).abs()  # ReLU output in the model
    g = 0.5 * torch.randn(key_batch, hm, n, r)
    c = 1.0 + 0.5 * torch.randn(key_batch, hm, n)
    return [t.requires_grad_() for t in (h, g, c)]


def _key_valid(n: int) -> torch.Tensor:
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, n - 19 :] = False  # a padded tail longer than one 16-key block: a fully padded tile
    valid[0, 3] = False  # and a hole
    return valid


def _run(fn, inputs: list[torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(*inputs)
    # As Attention.forward does: merge heads, so the incoming gradient is a (B, H, N, d) view of a
    # (B, N, H·d) tensor — not contiguous in the (B, H, N, d) order.
    loss = (out.transpose(1, 2).reshape(weight.shape) * weight).sum()
    grads = torch.autograd.grad(loss, inputs)
    return out.detach(), list(grads)


def _compare(inputs, valid, combine, bound, n, d=D_HEAD, config=SMALL, names=("q", "k", "v", "h", "g", "c")):
    weight = torch.randn(B, n, H * d)

    def ref(q, k, v, *mask):
        lam = LowRankMask(*mask, bound=bound) if mask else None
        return attention(q, k, v, lam, valid, combine=combine, backend="dense")

    def fused(q, k, v, *mask):
        lam = LowRankMask(*mask, bound=bound) if mask else None
        return triton_attention(q, k, v, valid, lam, combine, config=config)

    out_ref, grads_ref = _run(ref, inputs, weight)
    out, grads = _run(fused, inputs, weight)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, **VALUE_TOL)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, g_ref, **GRAD_TOL, msg=lambda m, name=name: f"grad {name}: {m}")


def test_available_under_interpreter() -> None:
    assert triton_available()


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("heads", ["shared", "per_head"])
@pytest.mark.parametrize("bound", ["none", "sigmoid"])
@pytest.mark.parametrize("key_batch", [1, B], ids=["key_position", "key_token"])
def test_triton_equals_dense_values_and_grads(combine: str, heads: str, bound: str, key_batch: int) -> None:
    torch.manual_seed(0)
    n = 37  # not a multiple of the 16-row/column blocks; sample 1's keys 18..36 padded (one whole tile)
    hm = 1 if heads == "shared" else H
    inputs = _qkv(n) + _factors(n, hm, key_batch)
    _compare(inputs, _key_valid(n), combine, bound, n, config=TALL)


@pytest.mark.parametrize("n, block", [(40, 16), (70, 32)])
def test_triton_vanilla_equals_dense(n: int, block: int) -> None:
    torch.manual_seed(1)
    inputs = _qkv(n)
    _compare(inputs, _key_valid(n), "mul", "none", n, config=KernelConfig.uniform(block), names=("q", "k", "v"))


def test_odd_head_dim_and_rank_no_padding_and_rectangular_tiles() -> None:
    """d = 24 and r = 5 are padded to 32 and 16 in registers only; key_valid None; 16×32 tiles."""
    torch.manual_seed(2)
    n, d = 45, 24
    inputs = _qkv(n, d) + _factors(n, H, B, r=5)
    config = KernelConfig(*[TileConfig(block_m=16, block_n=32)] * 3)
    _compare(inputs, None, "mul", "sigmoid", n, d=d, config=config)


def test_lam_at_identity_init_is_exactly_vanilla() -> None:
    """mul: g = 0, c = 1 → M ≡ 1; add+sigmoid: z = 0 → M − 1 ≡ 0: outputs bit-identical to no mask."""
    torch.manual_seed(3)
    n = 37
    q, k, v = (t.detach() for t in _qkv(n))
    valid = _key_valid(n)
    plain = triton_attention(q, k, v, valid, None, "mul", config=SMALL)
    h = torch.rand(B, 1, n, R)
    for combine, bound, c0 in [("mul", "none", 1.0), ("add", "sigmoid", 0.0), ("mul", "sigmoid", 0.0)]:
        mask = LowRankMask(h, torch.zeros(1, 1, n, R), torch.full((1, 1, n), c0), bound)
        assert torch.equal(triton_attention(q, k, v, valid, mask, combine, config=SMALL), plain), (combine, bound)


def test_fp16_inputs_run_close_to_fp32() -> None:
    """fp16 q/k/v and mask factors: fp32 accumulation; close to the fp32 dense reference.

    (fp16, not bf16: the interpreter stores bf16 as uint16 and its tl.dot multiplies those bits.)"""
    torch.manual_seed(4)
    n = 33
    q, k, v = (t.detach() for t in _qkv(n))
    h, g, c = (t.detach() for t in _factors(n, H, 1))
    valid = _key_valid(n)
    ref = attention(q, k, v, LowRankMask(h, g, c), valid, combine="mul", backend="dense")
    args = [t.half().requires_grad_() for t in (q, k, v, h, g, c)]
    out = triton_attention(*args[:3], valid, LowRankMask(*args[3:]), "mul", config=SMALL)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    for t in args:
        assert t.grad is not None and t.grad.dtype == torch.float16 and torch.isfinite(t.grad.float()).all()


def test_all_padded_sample_stays_finite() -> None:
    torch.manual_seed(5)
    n = 20
    inputs = _qkv(n) + _factors(n, 1, 1)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1] = False  # attention() lets such a sample attend everywhere
    _compare(inputs, valid, "add", "none", n)


class _AllocationRecorder(TorchDispatchMode):
    """Records the element count of every torch tensor an op allocates (views and in-place ops excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.numels.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out


def test_never_allocates_an_n_by_n_tensor() -> None:
    """At N = 2048 (one head, 256-wide tiles: 8 × 8 of them, so the interpreter stays quick) nothing N×N is
    allocated: the largest buffer is O(N·d), 32× smaller than N×N."""
    torch.manual_seed(6)
    n, heads, d, r = 2048, 1, 16, 4
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    h = torch.rand(1, 1, n, r, requires_grad=True)
    g = torch.randn(1, 1, n, r, requires_grad=True)
    c = torch.randn(1, 1, n, requires_grad=True)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, -5:] = False
    recorder = _AllocationRecorder()
    with recorder:
        out = triton_attention(q, k, v, valid, LowRankMask(h, g, c, "sigmoid"), "mul", config=KernelConfig.uniform(256))
        out.sum().backward()
    assert recorder.numels, "the recorder saw no allocation at all"
    biggest = max(recorder.numels, key=lambda x: x[1])
    assert biggest[1] < n * n, biggest
    assert biggest[1] <= 4 * heads * n * d, biggest  # O(N·d)
    assert all(t.grad is not None for t in (q, k, v, h, g, c))


@pytest.mark.parametrize("key", ["position", "token"])
def test_encoder_outputs_do_not_depend_on_padding(key):
    """test_encoder's padding test for the triton backend (float32: the interpreter's precision)."""
    from test_encoder import _cfg, _generators, _padded
    from lamscale.model import Encoder

    torch.manual_seed(3)
    model = Encoder(_cfg(backend="triton", combine="mul", key=key, heads="per_head")).eval()
    for gen in _generators(model):
        for p in gen.parameters():
            p.data.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(5, 6, generator=g), torch.randn(2, 5, generator=g)
    with torch.no_grad():
        alone = model(*_padded(video, text, 5, 2))[0]
        pair = [_padded(video, text, 8, 4), _padded(torch.randn(8, 6, generator=g), torch.randn(4, 5, generator=g), 8, 4)]
        batched = model(*[torch.cat(parts) for parts in zip(*pair)])[0, :5]
    torch.testing.assert_close(batched, alone, **VALUE_TOL)
