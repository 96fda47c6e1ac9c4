"""The sdpa backend (additive LAM folded into q/k) and `backend: auto`."""
import pytest
import torch

from lamscale.model import LowRankMask, attention
from lamscale.model.attention import select_backend
from conftest import NumelRecorder


def _inputs(n, hm, key_batch, dtype=torch.float64, B=2, H=3, d=8, r=4):
    torch.manual_seed(n + hm + key_batch)
    q, k, v = (torch.randn(B, H, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    h = torch.rand(B, hm, n, r, dtype=dtype, requires_grad=True)
    g = torch.randn(key_batch, hm, n, r, dtype=dtype, requires_grad=True)
    c = torch.randn(key_batch, hm, n, dtype=dtype, requires_grad=True)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, n - 7:] = False
    return q, k, v, h, g, c, valid


@pytest.mark.parametrize("hm", [1, 3], ids=["shared", "per_head"])
@pytest.mark.parametrize("key_batch", [1, 2], ids=["position", "token"])
@pytest.mark.parametrize("n", [37, 64])
def test_sdpa_equals_dense_values_and_grads(hm, key_batch, n):
    q, k, v, h, g, c, valid = _inputs(n, hm, key_batch)
    mask = LowRankMask(h, g, c, "none")
    results = []
    for backend in ("dense", "sdpa"):
        out = attention(q, k, v, mask, valid, combine="add", backend=backend)
        grads = torch.autograd.grad((out * out.cos()).sum(), [q, k, v, h, g, c])
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
    for name, a, b in zip("qkvhgc", got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"grad {name}")


def test_sdpa_vanilla_with_padding_equals_dense():
    q, k, v, *_, valid = _inputs(41, 1, 1)
    torch.testing.assert_close(attention(q, k, v, None, valid, backend="sdpa"),
                               attention(q, k, v, None, valid, backend="dense"), atol=1e-12, rtol=1e-10)


def test_sdpa_refuses_what_it_cannot_compute():
    q, k, v, h, g, c, valid = _inputs(16, 1, 1)
    with pytest.raises(ValueError, match="combine='add'"):
        attention(q, k, v, LowRankMask(h, g, c, "none"), valid, combine="mul", backend="sdpa")
    with pytest.raises(ValueError, match="bound='none'"):
        attention(q, k, v, LowRankMask(h, g, c, "sigmoid"), valid, combine="add", backend="sdpa")


def test_auto_picks_an_exact_backend():
    cpu = torch.device("cpu")
    assert select_backend(cpu, "add", "none", 4096) == "sdpa"
    assert select_backend(cpu, "mul", "none", 4096) == "cpp"  # this machine has a C++ compiler
    assert select_backend(cpu, "mul", "sigmoid", 128) == "cpp"  # the fused kernel at any length
    q, k, v, h, g, c, valid = _inputs(40, 1, 1)
    mask = LowRankMask(h, g, c, "sigmoid")
    torch.testing.assert_close(attention(q, k, v, mask, valid, combine="mul", backend="auto"),
                               attention(q, k, v, mask, valid, combine="mul", backend="dense"))


@pytest.mark.parametrize("triton_ok, expected", [(True, "triton"), (False, "chunked")])
def test_auto_on_cuda_picks_triton_for_mul(monkeypatch, triton_ok, expected):
    import lamscale.model.triton_lam as triton_lam

    monkeypatch.setattr(triton_lam, "triton_available", lambda: triton_ok)
    cuda = torch.device("cuda", 0)
    assert select_backend(cuda, "mul", "none", 32768) == expected
    assert select_backend(cuda, "add", "sigmoid", 4096) == expected  # a bound cannot ride in SDPA's q/k
    assert select_backend(cuda, "add", "none", 32768) == "sdpa"


@pytest.mark.parametrize("backend, combine", [("dense", "mul"), ("chunked", "mul"), ("chunked", "add"), ("sdpa", "add")])
def test_no_n_squared_tensor_at_4096(backend, combine):
    """At N = 4096 only `dense` ever holds an N×N tensor (forward, recomputation and backward)."""
    n = 4096
    q, k, v = (torch.randn(1, 1, n, 8, requires_grad=True) for _ in range(3))
    h = torch.rand(1, 1, n, 4, requires_grad=True)
    g = torch.randn(1, 1, n, 4, requires_grad=True)
    c = torch.randn(1, 1, n, requires_grad=True)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, -5:] = False
    recorder = NumelRecorder()
    with recorder:
        out = attention(q, k, v, LowRankMask(h, g, c, "none"), valid, combine=combine, backend=backend, block=256)
        out.sum().backward()
    if backend == "dense":
        assert recorder.max_numel >= n * n
    else:
        assert recorder.max_numel < n * n, recorder.max_numel
