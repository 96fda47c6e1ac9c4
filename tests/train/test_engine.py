"""DeepSpeed on CPU workers: its shared-memory all-reduce op must not be JIT-built (gloo is enough), and its
Muon optimizer (whose @torch.compile loads TorchInductor) must not be loaded: we train with AdamW."""
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


# every ZeRO stage and precision a run can ask for: each stage's set-up and gradient path asks about Muon
ENGINE_PROBE = """
import sys, torch
from lamscale.config import Config
from lamscale.train.engine import build_engine
for stage, precision in ((0, "bf16"), (1, "fp32"), (2, "fp32"), (2, "bf16"), (3, "fp32")):
    cfg = Config()
    cfg.train.zero_stage, cfg.train.precision, cfg.data.batch_size = stage, precision, 2
    cfg.train.lr, cfg.train.warmup_steps = 0.05, 1
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    engine = build_engine(model, cfg, world_size=1, use_gpu=False)
    x = torch.randn(2, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    losses = []
    for _ in range(3):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (stage, precision, losses)
assert "torch._inductor.compile_fx" not in sys.modules, "DeepSpeed's Muon loaded TorchInductor"
print("ok")
"""


def test_engines_train_without_loading_muon_or_inductor(repo_root):
    env = lamscale_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    result = subprocess.run([sys.executable, "-c", ENGINE_PROBE], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


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
