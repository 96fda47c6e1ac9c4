"""Shared test support: fixtures (repo root, sample shards, a real SeaweedFS server, one torch thread),
a recorder of tensor sizes, and the environment for `python -m lamscale` subprocesses.

Test modules import the helpers with `from conftest import …` (tests/ is on sys.path).
"""
from __future__ import annotations

import os
import re
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
    # Ray Train's controller notices a finished or failed worker group at its next poll (default every 2 s): every
    # run in the suite ends up to 2 s later than it has to; a missed poll is harmless (10 min before it counts)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", "LAMSCALE_RAY_DASHBOARD": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **(extra or {})}
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

    def __init__(self, env: dict | None = None, dashboard: bool = True) -> None:
        self.temp = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # short: Ray's socket paths live under it
        self.node_env = env or {}  # what every node's processes see (e.g. the object store's credentials)
        self.dashboard = dashboard  # the Jobs API; a head for `lamscale train --address` alone runs without it
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
               f"--dashboard-port={dash}", "--num-cpus=4", f"--include-dashboard={str(self.dashboard).lower()}",
               f"--temp-dir={self.temp}",
               f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--runtime-env-agent-port={rt}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
               f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
               "--object-store-memory=268435456", "--disable-usage-stats"]
        self.address, self.gcs_address = f"http://127.0.0.1:{dash}" if self.dashboard else "", f"127.0.0.1:{gcs}"
        for attempt in range(3):
            starter = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
            self.sid = starter.pid
            out, _ = starter.communicate(timeout=240)
            if starter.returncode == 0:
                break
            # `ray start` gives the raylet a fixed 30 s to register, which a 2-core machine busy with other jobs
            # can miss: clear away what it left and start again (same ports: they were free, and are again)
            assert "timed out during startup" in out and attempt < 2, out[-3000:]
            self.stop(keep_temp=True)
        deadline = time.time() + 120
        # `ray start` returns once the raylet is up; the Jobs API is ready once it answers an authenticated
        # query (Ray ≥ 2.52 may require a token)
        while self.dashboard:
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
        _, alive = psutil.wait_procs(procs, timeout=3)  # then as `ray stop --force`: agents take ~10 s to wind down
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


# --- one shared `ray start --head` for the runs that need no cluster of their own ------------------------
# A run on it skips starting (ray.init) and shutting down a private cluster (~10-15 s each on 2 cores).
# Runs that SIGKILL or signal their driver, inspect the driver's own Ray processes, or lose nodes keep a
# private cluster. The head stops right after the last test that uses it, not at the session's end.

_SHARED: dict = {}


@pytest.fixture(scope="session")
def ray_cluster() -> RayHead:
    """A `ray start --head` (4 CPUs: two 2-worker runs at once; the Jobs API on .address, the GCS on
    .gcs_address for `lamscale train --address`), shared by every test that asks for it."""
    if "head" not in _SHARED:
        head = RayHead()
        _SHARED["head"] = head
        head.start()
    yield _SHARED["head"]
    _stop_shared()


# The uninterrupted reference run of test_train_e2e.py (its killed and resumed runs must match it bit for bit),
# submitted as a `lamscale submit` job to the shared head: test_jobs.py follows it as its short job (a long
# job stopped beside it), so one run serves both.
REFERENCE_STEPS = ["train.max_steps=12", "train.ckpt_every=4", "train.eval_every=6", "train.log_every=1",
                   "train.keep_last=2", "train.precision=fp32", "data.batch_size=8"]


@pytest.fixture(scope="session")
def reference_job(ray_cluster, sample_shards, tmp_path_factory) -> dict:
    """The submitted job's id and its run folder (storage/reference); it may still be running."""
    storage = tmp_path_factory.mktemp("runs")
    done = subprocess.run([sys.executable, "-m", "lamscale", "submit", "configs/tiny.yaml", f"run.storage={storage}",
                           "run.name=reference", *REFERENCE_STEPS, "--address", ray_cluster.address], cwd=ROOT,
                          env=lamscale_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id and " " not in job_id, done.stdout
    return {"job": job_id, "storage": storage, "run": storage / "reference", "address": ray_cluster.address}


def _stop_shared() -> None:
    head = _SHARED.pop("head", None)
    if head is not None:
        head.stop()


def pytest_collection_modifyitems(session, config, items):
    # the modules that use the shared head run one after another (at the first one's place, whole modules, in
    # their order), so the head stops after them instead of idling through the private-cluster tests between
    users = [item for item in items if "ray_cluster" in getattr(item, "fixturenames", ())]
    shared = {item.path for item in users}
    if shared:
        first = next(i for i, item in enumerate(items) if item.path in shared)
        rest = [item for item in items[first:] if item.path not in shared]
        items[first:] = [item for item in items[first:] if item.path in shared] + rest
    _SHARED["last_user"] = max(users, key=items.index).nodeid if users else None


HEAD_LOG_LEVEL = re.compile(r"^\[\S+ \S+ ([EWI]) ")  # Ray's C++ log lines: [date time LEVEL pid tid]
ACTOR_END = re.compile(r"destroy|cancel|dead|died|out of scope|TrainController", re.I)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the shared head gets the head's own warnings and errors (GCS, raylet) in its report:
    the head's temp dir is gone once it stops, and a CI log is all there is to read afterwards."""
    outcome = yield
    report = outcome.get_result()
    head = _SHARED.get("head")
    if report.failed and head is not None and "ray_cluster" in getattr(item, "fixturenames", ()):
        logs = Path(head.temp) / "session_latest" / "logs"
        for name in ("gcs_server.out", "raylet.out"):
            try:
                lines = (logs / name).read_text(errors="replace").splitlines()
            except OSError:
                continue
            levels = [(HEAD_LOG_LEVEL.match(line), line) for line in lines]
            noted = [line for level, line in levels if level and (level[1] != "I" or ACTOR_END.search(line))]
            report.sections.append((f"shared Ray head: {name} (warnings, errors, actor ends; last 40)",
                                    "\n".join(noted[-40:])))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.nodeid == _SHARED.get("last_user"):
        _stop_shared()  # idle Ray daemons would take CPU from every test after the cluster tests


# --- a run and its resumed copy side by side on the shared head ---------------------------------------

def start_train(repo_root: Path, config: str, storage: Path, address: str, name: str, args: list[str]):
    """Start `lamscale train` on `address`; its output goes to a file (two runs at once: neither may block on
    an unread pipe). Returns (process, log path)."""
    log = storage / f"{name}.out"
    cmd = [sys.executable, "-m", "lamscale", "train", config, f"run.storage={storage}", *args, f"run.name={name}",
           "--address", address]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=f, stderr=subprocess.STDOUT, text=True), log


def wait_for(run, needle: str, timeout: float = 600) -> bool:
    """True once `needle` is in the run's output; False if the run ends first."""
    proc, log = run
    deadline = time.time() + timeout
    while time.time() < deadline:
        ended = proc.poll() is not None
        if needle in log.read_text():
            return True
        if ended:
            return False
        time.sleep(0.5)
    return False


def finish(run) -> str:
    proc, log = run
    proc.wait(600)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def reference_and_resumed(repo_root: Path, config: str, storage: Path, address: str, args: list[str],
                          step: int = 4) -> tuple[str, str]:
    """Runs `reference`; once it has committed `step`, a run `resumed` holding only its config and that
    checkpoint (a run stopped there) resumes beside it. Returns both outputs once both have finished."""
    first, second = start_train(repo_root, config, storage, address, "reference", args), None
    try:
        assert wait_for(first, f"checkpoint step {step} committed"), first[1].read_text()[-3000:]
        resumed, checkpoint = storage / "resumed", f"step_{step:08d}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(storage / "reference" / "config.yaml", resumed / "config.yaml")
        shutil.copytree(storage / "reference" / "checkpoints" / checkpoint, resumed / "checkpoints" / checkpoint)
        second = start_train(repo_root, config, storage, address, "resumed", args)
        return finish(first), finish(second)
    finally:
        for proc, _ in filter(None, (first, second)):
            if proc.poll() is None:
                proc.kill()
