"""LAM mask factors, the generator's identity init, and the dense/chunked/cpp attention backends."""
from __future__ import annotations

import itertools

import pytest
import torch

from lamscale.config import LAMConfig
from conftest import NumelRecorder
from lamscale.model import LowRankMask, MaskGenerator, attention
from lamscale.model.attention import Attention

B, H, D_HEAD, R = 2, 3, 4, 3


def _qkv(n: int, dtype=torch.float64, heads: int = H, batch: int = B) -> list[torch.Tensor]:
    return [torch.randn(batch, heads, n, D_HEAD, dtype=dtype, requires_grad=True) for _ in range(3)]


def _factors(n: int, hm: int, key_batch: int, dtype=torch.float64) -> list[torch.Tensor]:
    h = torch.randn(B, hm, n, R, dtype=dtype).abs()  # ReLU output in the model
    g = torch.randn(key_batch, hm, n, R, dtype=dtype)
    c = 1.0 + 0.5 * torch.randn(key_batch, hm, n, dtype=dtype)
    return [t.requires_grad_() for t in (h, g, c)]


def _key_valid(n: int) -> torch.Tensor:
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, n - 9 :] = False  # padded tail
    valid[0, 3] = False  # and a hole, to be sure padding is not assumed contiguous
    return valid


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("heads", ["shared", "per_head"])
@pytest.mark.parametrize("bound", ["none", "sigmoid"])
@pytest.mark.parametrize("key_batch", [1, B], ids=["position_like", "token_like"])
@pytest.mark.parametrize("backend", ["chunked", "cpp"])
def test_backend_equals_dense_values_and_grads(combine: str, heads: str, bound: str, key_batch: int, backend: str) -> None:
    torch.manual_seed(0)
    n, block = 37, 8  # n is not a multiple of block
    hm = 1 if heads == "shared" else H
    inputs = _qkv(n) + _factors(n, hm, key_batch)
    valid = _key_valid(n)
    weight = torch.randn(B, H, n, D_HEAD, dtype=torch.float64)

    results = {}
    for name in ("dense", backend):
        q, k, v, h, g, c = inputs
        out = attention(q, k, v, LowRankMask(h, g, c, bound), valid, combine=combine, backend=name, block=block)
        grads = torch.autograd.grad((out * weight).sum(), inputs)
        results[name] = (out, grads)

    out_d, grads_d = results["dense"]
    out_c, grads_c = results[backend]
    torch.testing.assert_close(out_c, out_d, rtol=1e-10, atol=1e-12)
    for name, gd, gc in zip("qkvhgc", grads_d, grads_c):
        assert gd.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(gc, gd, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", ["dense", "chunked", "cpp"])
def test_padded_keys_get_no_weight(backend: str) -> None:
    torch.manual_seed(1)
    n = 13
    q, k, v = _qkv(n)
    valid = _key_valid(n)
    mask = LowRankMask(*_factors(n, 1, B), bound="none")
    out = attention(q, k, v, mask, valid, combine="add", backend=backend, block=4)
    v2 = v.detach().clone()
    v2[~valid[:, None, :, None].expand_as(v2)] = 1e6  # changing padded values must change nothing
    out2 = attention(q, k, v2, mask, valid, combine="add", backend=backend, block=4)
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("backend", ["dense", "chunked", "cpp"])
def test_fully_padded_sample_stays_finite(backend: str) -> None:
    torch.manual_seed(2)
    n = 11
    q, k, v = _qkv(n)
    h, g, c = _factors(n, 1, 1)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0] = False  # a batch slot with no real token at all
    out = attention(q, k, v, LowRankMask(h, g, c), valid, combine="mul", backend=backend, block=4)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for t in (q, k, v, h, g, c):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    "combine,bound,heads,key",
    list(itertools.product(["mul", "add"], ["none", "sigmoid"], ["shared", "per_head"], ["position", "token"])),
)
def test_identity_init_is_bit_identical_to_vanilla(combine: str, bound: str, heads: str, key: str) -> None:
    torch.manual_seed(3)
    n, dim = 21, 12
    cfg = LAMConfig(combine=combine, bound=bound, heads=heads, key=key, rank=R, hidden=8, max_len=32)
    gen = MaskGenerator(dim, H, cfg)
    x = torch.randn(B, n, dim)
    mask = gen.mask(x)
    expected = 1.0 if (combine == "mul" or bound == "sigmoid") else 0.0
    assert torch.equal(mask.dense(), torch.full((B, mask.num_heads, n, n), expected))
    assert mask.h.abs().sum() > 0, "h must not be zero at init, or the generator never learns"

    q, k, v = _qkv(n, dtype=torch.float32)
    valid = _key_valid(n)
    for backend in ("dense", "chunked", "cpp"):
        lam = attention(q, k, v, mask, valid, combine=combine, backend=backend, block=8)
        vanilla = attention(q, k, v, None, valid, combine=combine, backend=backend, block=8)
        assert torch.equal(lam, vanilla), backend


@pytest.mark.parametrize("heads,expected_hm", [("shared", 1), ("per_head", H)])
@pytest.mark.parametrize("key", ["position", "token"])
def test_generator_shapes(heads: str, expected_hm: int, key: str) -> None:
    n, dim = 9, 12
    gen = MaskGenerator(dim, H, LAMConfig(heads=heads, key=key, rank=R, hidden=8, max_len=16))
    mask = gen.mask(torch.randn(B, n, dim))
    key_batch = 1 if key == "position" else B
    assert mask.h.shape == (B, expected_hm, n, R)
    assert mask.g.shape == (key_batch, expected_hm, n, R)
    assert mask.c.shape == (key_batch, expected_hm, n)
    assert mask.dense().shape == (B, expected_hm, n, n)


def test_dense_mask_formula() -> None:
    h, g, c = torch.randn(1, 2, 5, R), torch.randn(1, 2, 5, R), torch.randn(1, 2, 5)
    want = torch.einsum("bhir,bhjr->bhij", h, g) + c[:, :, None, :]
    torch.testing.assert_close(LowRankMask(h, g, c, "none").dense(), want)
    torch.testing.assert_close(LowRankMask(h, g, c, "sigmoid").dense(), 2 * torch.sigmoid(want))


def test_position_key_longer_than_max_len_raises() -> None:
    gen = MaskGenerator(8, 2, LAMConfig(key="position", max_len=10, rank=R, hidden=4))
    gen(torch.randn(1, 10, 8))  # exactly max_len is fine
    with pytest.raises(ValueError, match="max_len"):
        gen(torch.randn(1, 11, 8))


def test_bad_switches_raise() -> None:
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="combine"):
        attention(q, k, v, combine="pow")


@pytest.mark.parametrize("hm", [1, 2], ids=["shared", "per_head"])
def test_chunked_never_allocates_n_by_n(hm: int) -> None:
    n, block = 512, 64
    peaks = {}
    for backend in ("dense", "chunked"):  # cpp's allocations happen inside one op: see test_cpp_backend.py
        torch.manual_seed(4)
        q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
        h = torch.rand(1, hm, n, 4, requires_grad=True)
        g = torch.randn(1, hm, n, 4, requires_grad=True)
        c = torch.randn(1, hm, n, requires_grad=True)
        valid = torch.ones(1, n, dtype=torch.bool)
        valid[0, -7:] = False
        with NumelRecorder() as rec:
            mask = LowRankMask(h, g, c, "sigmoid")
            out = attention(q, k, v, mask, valid, combine="mul", backend=backend, block=block)
            out.square().sum().backward()
        peaks[backend] = rec.max_numel
    assert peaks["chunked"] < n * n, peaks
    assert peaks["dense"] >= n * n, peaks


@pytest.mark.parametrize("backend", ["dense", "chunked", "cpp"])
def test_attention_module_identity_and_shapes(backend: str) -> None:
    torch.manual_seed(5)
    dim, n = 12, 10
    cfg = LAMConfig(backend=backend, block=4, rank=R, hidden=8, max_len=16)
    vanilla, lam = Attention(dim, H, 0.0, cfg, use_lam=False), Attention(dim, H, 0.0, cfg, use_lam=True)
    missing, unexpected = lam.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("mask_gen.") for key in missing)
    x, valid = torch.randn(B, n, dim), _key_valid(n)
    out = lam(x, valid)
    assert out.shape == (B, n, dim)
    assert torch.equal(out, vanilla(x, valid))
