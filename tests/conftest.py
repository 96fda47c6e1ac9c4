"""Shared test support: fixtures (repo root, sample shards, a real SeaweedFS server, one torch thread),
a recorder of tensor sizes, and the environment for `python -m lamscale` subprocesses.

Test modules import the helpers with `from conftest import …` (tests/ is on sys.path).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import sys
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lamscale.bench.seaweedfs import SeaweedFS  # lives in lamscale/bench: `lamscale bench data` starts one too

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
def mad_shards() -> Path:
    """The embedded MAD-like sample's movie shards (generated on first use, like `lamscale train` does)."""
    from lamscale.cluster.launch import _ensure_sample
    from lamscale.config import load_config

    _ensure_sample(load_config(ROOT / "configs" / "mad_sample.yaml"))
    return ROOT / "shards" / "mad_sample"


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
    # no Ray dashboard in private test clusters: a few CPU-seconds per run, and no test reads it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", "LAMSCALE_RAY_DASHBOARD": "0", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


def training_workers(driver_pid: int) -> list[psutil.Process]:
    """The live Ray Train workers a driver started (descendants through its in-process raylet)."""
    try:
        children = psutil.Process(driver_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """True once every process in `procs` has exited."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def reap_process_group(pgid: int) -> None:
    """Ray's idle per-node agents outlive a SIGKILLed driver; reap them so tests stay independent."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- a real Ray cluster: `ray start --head` in its own session, temp dir and ports ----------------------

def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _session_processes(sid: int) -> list[psutil.Process]:
    """Processes of session `sid` plus all their descendants (job drivers start their own sessions)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except (ProcessLookupError, psutil.Error):
            continue
    return list(found.values())


class RayHead:
    """`ray start --head` with the dashboard (Jobs API). stop() ends exactly this cluster, like `ray stop`
    would, without touching other Ray instances on the machine (`ray stop` kills them all)."""

    def __init__(self, env: dict | None = None) -> None:
        self.temp = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # short: Ray's socket paths live under it
        self.node_env = env or {}  # what every node's processes see (e.g. the object store's credentials)
        self.sid = 0
        self.address = self.gcs_address = ""

    def start(self) -> None:
        gcs, dash, nm, om, rt, agent_grpc, agent_http, metrics, client = free_ports(9)
        venv_bin = str(Path(sys.executable).parent)
        # On 127.0.0.1 only: Ray turns --node-ip-address=127.0.0.1 into the host's outside IP and listens on
        # every interface unless it believes multi-node clusters are off (worker nodes that join this head
        # need the default setting: `ray start --address` refuses to run with it).
        env = lamscale_env({"PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **self.node_env})
        cmd = [os.path.join(venv_bin, "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={self.temp}",
               f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--runtime-env-agent-port={rt}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
               f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
               "--object-store-memory=268435456", "--disable-usage-stats"]
        starter = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        self.sid = starter.pid
        self.address, self.gcs_address = f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
        out, _ = starter.communicate(timeout=240)
        assert starter.returncode == 0, out[-3000:]
        deadline = time.time() + 120
        while True:  # ready once the Jobs API answers an authenticated query (Ray ≥ 2.52 may require a token)
            probe = subprocess.run([sys.executable, "-m", "lamscale", "status", "lamscale_probe", "--address", self.address],
                                   cwd=ROOT, env=lamscale_env(), capture_output=True, text=True, timeout=60)
            if "does not exist" in probe.stderr:
                return
            assert time.time() < deadline, f"Jobs API did not answer on {self.address}: {probe.stderr}"
            time.sleep(1)

    def stop(self, keep_temp: bool = False) -> None:
        procs = _session_processes(self.sid) if self.sid else []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        if keep_temp:
            return
        for _ in range(5):  # a process that was still exiting may recreate a log file once
            shutil.rmtree(self.temp, ignore_errors=True)
            if not os.path.exists(self.temp):
                break
            time.sleep(1)
