"""The wheel a user installs carries the C++ kernel: build it, pip-install it into a fresh venv and run a
`cpp` forward from the installed package (not this checkout), against a dense softmax computed here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "lamscale/model/cpu_lam_kernel.cpp"

# Runs in the fresh venv: one forward through the installed kernel; prints where everything came from.
CHILD = r"""
import json, sys
import torch
import lamscale
from lamscale.model import cpu_lam
args = torch.load(sys.argv[1])
out = cpu_lam.cpp_attention(*args, combine="mul", bound="none", block=16)
torch.save(out, sys.argv[2])
print(json.dumps({"lamscale": lamscale.__file__, "source": str(cpu_lam.SOURCE.resolve())}))
"""


def _dense(q, k, v, valid, h, g, c):
    """S = QKᵀ/√d ⊙ (h·gᵀ + c), padded keys −inf, softmax, ·V: the mul/none definition, written out."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s * (h @ g.transpose(-1, -2) + c[..., None, :])
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.slow
def test_installed_wheel_runs_the_cpp_kernel(tmp_path: Path) -> None:
    # build from a copy, so the build/ and egg-info folders never race other work in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "lamscale", src / "lamscale", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lamscale-*.whl"))
    assert KERNEL in zipfile.ZipFile(wheel).namelist()

    # a fresh venv with only lamscale installed; its dependencies come from this venv through a .pth line
    # (a plain path, so this venv's editable-install hook, which maps lamscale to the checkout, never runs)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True, cwd=tmp_path)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = purelib / KERNEL
    assert installed.is_file()

    gen = torch.Generator().manual_seed(0)
    n, d = 37, 8
    q, k, v = (torch.randn(2, 2, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    h, g = torch.rand(2, 1, n, 3, generator=gen, dtype=torch.float64), torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64)
    c = 1 + 0.3 * torch.randn(1, 1, n, generator=gen, dtype=torch.float64)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 30:] = False
    torch.save((q, k, v, valid, h, g, c), tmp_path / "in.pt")

    # an empty extensions dir: the kernel must compile from the installed source, not a cached build
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    run = subprocess.run([str(python), "-c", CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    where = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(where["lamscale"]).resolve().is_relative_to(purelib.resolve()), where
    assert Path(where["source"]) == installed.resolve()
    built = list((tmp_path / "torch_extensions").rglob("*.so"))
    assert built, "the kernel was not built into the fresh TORCH_EXTENSIONS_DIR"
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out, _dense(q, k, v, valid, h, g, c), rtol=1e-10, atol=1e-10)
