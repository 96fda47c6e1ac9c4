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
