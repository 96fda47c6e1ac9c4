"""Every collective the trainer runs goes through `Collectives`, on the engine's device (NCCL refuses
CPU tensors, so a CPU control tensor would fail the first GPU step). A real Trainer (DeepSpeed ZeRO-2,
gloo, one rank) logs, evaluates, checks the stop flag and saves while torch.distributed is recorded."""
import json
import subprocess
import sys

import pytest

from conftest import free_ports, lamscale_env

pytestmark = pytest.mark.slow

PROBE = """
import inspect, json, os, sys, torch
import torch.distributed as dist
from lamscale.config import load_config
from lamscale.train.engine import _quiet_cpu_deepspeed
_quiet_cpu_deepspeed()
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
calls = []

def recording(name, fn):
    def wrapper(*args, **kwargs):
        caller = inspect.stack()[1].filename
        if "/lamscale/" in caller:
            devices = sorted({str(a.device) for a in args if isinstance(a, torch.Tensor)})
            calls.append({"op": name, "caller": caller.split("/lamscale/")[-1], "devices": devices})
        return fn(*args, **kwargs)
    return wrapper

for name in ("all_reduce", "all_gather_object", "barrier", "broadcast", "all_gather", "reduce", "gather_object"):
    setattr(dist, name, recording(name, getattr(dist, name)))

from lamscale.train.loop import Trainer
cfg = load_config("configs/tiny.yaml", ["train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2",
                                        "train.log_every=1", "data.batch_size=8", "cluster.num_workers=1"])
cfg.data.train, cfg.data.val = [f"{sys.argv[2]}/{p.rsplit('/', 1)[1]}" for p in (cfg.data.train, cfg.data.val)]
trainer = Trainer(cfg, sys.argv[1], 0, 1, use_gpu=False)
trainer.fit()
print(json.dumps({"engine_device": str(trainer.engine.device), "calls": calls}), flush=True)
dist.destroy_process_group()
# what is checked is printed: skip interpreter teardown, where a C++ thread (gloo's, the loader's) still
# joinable at static destruction can abort the process (std::terminate) on a loaded machine
os._exit(0)
"""


def test_trainer_collectives_use_the_helper_on_the_engine_device(repo_root, sample_shards, tmp_path):
    env = lamscale_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run"), str(sample_shards)], cwd=repo_root,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    calls = report["calls"]
    assert {c["caller"] for c in calls} == {"train/collectives.py"}, calls
    assert {"all_reduce", "all_gather_object", "barrier"} <= {c["op"] for c in calls}
    assert all(c["devices"] == [report["engine_device"]] for c in calls if c["op"] == "all_reduce"), calls
    # log (losses, data counts), stop flag at each step, eval batches, the checkpoint's gather + barrier
    assert sum(c["op"] == "all_reduce" for c in calls) >= 2 * 2 + 400 // 8
