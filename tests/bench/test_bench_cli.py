"""The benchmark commands run and write their JSON, table and plot (no timing is asserted here)."""
import json
import subprocess
import sys

import pytest

from conftest import lamscale_env

pytestmark = pytest.mark.slow


def test_bench_attention_and_encoder_write_reports(repo_root, tmp_path):
    # each case runs in a fresh process (seconds of imports): one LAM case for attention, and for the encoder a LAM
    # case beside the vanilla one its paired rounds compare against
    for what, cases in (("attention", "chunked-mul"), ("encoder", "vanilla-sdpa,lam-mul-deepspeed")):
        out = tmp_path / what
        paired = ["--paired-rounds", "2"] if what == "encoder" else []
        result = subprocess.run([sys.executable, "-m", "lamscale", "bench", what, "--device", "cpu", "--lengths", "96",
                                 "--cases", cases, "--repeats", "1", *paired, "--out", str(out)],
                                cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((tmp_path / f"{what}.json").read_text())
        assert [r["case"] for r in report["rows"]] == cases.split(",")
        assert all("error" not in r and r["ms"] > 0 for r in report["rows"]), report["rows"]
        assert report["env"]["torch"].startswith("2.") and (tmp_path / f"{what}.png").stat().st_size > 10_000
        assert "| N | case |" in (tmp_path / f"{what}.md").read_text()
        if what == "encoder":  # the LAM variants are also timed interleaved with vanilla in one process
            assert all(r["x_vanilla_paired"] > 0 for r in report["rows"][1:]), report["rows"]
            # the trainer's step: the engine lamscale.train.engine builds, bf16 and ZeRO-2 (checked in the case)
            assert report["settings"]["variants (lam.layers, lam.combine, backend, step)"]["lam-mul-deepspeed"][3] == "deepspeed-bf16"


def test_bench_encoder_names_an_unknown_variant(repo_root):
    result = subprocess.run([sys.executable, "-m", "lamscale", "bench", "encoder", "--device", "cpu", "--lengths", "96",
                             "--cases", "vanilla-sdpa,lam-mul-zero9"], cwd=repo_root, env=lamscale_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "lamscale: error: bench encoder --cases: unknown variant lam-mul-zero9; expected some of "
        "vanilla-sdpa,vanilla-chunked,lam-mul-chunked,lam-mul-cpp,lam-add-sdpa,lam-mul-triton,lam-mul-deepspeed"], result.stderr


def test_gpu_check_plan_loads_and_refuses_without_a_gpu(repo_root, tmp_path):
    """`make gpu-check` (launch/gpu_check.sh): --dry-run validates every override of its runs against today's
    config schema; without a CUDA GPU the real mode checks nothing and says so, with a failing status."""
    import torch

    env = lamscale_env({"OUT": str(tmp_path / "gpu-check"), "PYTHON": sys.executable})
    dry = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run"], cwd=repo_root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    plan = dry.stdout
    assert "DRY RUN: the configs load" in plan and "nothing was checked on a GPU" in plan
    for needle in ("cluster.use_gpu=true", "model.lam.backend=triton", "train.precision=bf16", "train.zero_stage=3",
                   "LAMSCALE_FAULT=after_step@170", "bench attention --device cuda", "lam-mul-deepspeed"):
        assert needle in plan, (needle, plan)
    if torch.cuda.is_available():
        return  # the real mode would run the whole check here
    real = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert real.returncode == 2 and "torch sees no CUDA GPU" in real.stdout and "nothing was checked" in real.stdout
