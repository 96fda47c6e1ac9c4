"""DeepSpeed on CPU workers: its shared-memory all-reduce op must not be JIT-built (gloo is enough)."""
import subprocess
import sys

from conftest import free_ports, lamscale_env

PROBE = """
import sys, torch
from lamscale.train.engine import _quiet_cpu_deepspeed
_quiet_cpu_deepspeed()
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
assert not hasattr(torch, "build_shm_op"), "patched the torch package instead of deepspeed.comm.torch"
assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None
print("ok")
"""


def test_cpu_deepspeed_skips_the_shm_op_build(repo_root, tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = lamscale_env({"TORCH_EXTENSIONS_DIR": str(extensions), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_ports(1)[0]), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    assert not extensions.exists() or not any(extensions.iterdir()), "a DeepSpeed op was JIT-built"


def test_weight_decay_leaves_an_identity_mask_identity():
    """Zero gradients + AdamW decay for 20 steps: the LAM key tables (mask ≡ 1) and the position and
    type tables stay exactly as initialised, while ordinary matrices do shrink."""
    import torch

    from lamscale.config import ModelConfig
    from lamscale.model.moment import MomentModel
    from lamscale.train.engine import param_groups

    torch.manual_seed(0)
    model = MomentModel(ModelConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.5), lr=0.1)
    for _ in range(20):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    gen = model.encoder.blocks[0].attn.mask_gen
    assert torch.equal(gen.key_bias, torch.ones_like(gen.key_bias)) and torch.equal(gen.key_weight, torch.zeros_like(gen.key_weight))
    for name in ("encoder.video_pos", "encoder.text_pos", "encoder.type_embed"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name
    qkv = model.encoder.blocks[0].attn.qkv.weight
    assert qkv.norm() < 0.5 * before["encoder.blocks.0.attn.qkv.weight"].norm()  # (1 - 0.05)^20 ≈ 0.36
