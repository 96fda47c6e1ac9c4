"""Losing a training worker, then a whole node, as a crash and a spot preemption do: a Ray cluster of
processes on this machine (a head with no CPUs and two worker nodes with one CPU each, so the two training
workers land on different nodes), run storage on a real S3 server (SeaweedFS). After the first commit one
training worker is SIGKILLed (FailureConfig restarts the group from the commit); after that restart every
process of one worker node (its raylet, agents and training worker) is SIGKILLed at once and a replacement
node joins. The run must finish under `cluster.max_failures=2`, restored from the last commit each time,
replaying the same losses."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import _session_processes, free_ports, lamscale_env

pytestmark = pytest.mark.slow
RUN = "lamscale-test/nodeloss/run"
ARGS = ["train.max_steps=20", "train.ckpt_every=8", "train.log_every=2", "train.eval_every=100",
        "train.mask_images=false", "data.batch_size=8", "cluster.max_failures=2", "cluster.num_workers=2"]
# the head notices a dead raylet after 3 missed 1 s health checks (default: 5 × 3 s)
HEALTH = '{"health_check_period_ms":1000,"health_check_timeout_ms":1000,"health_check_failure_threshold":3}'
# `ray start --head` turns token auth on when ~/.ray/auth_token exists, `ray start --address` does not send
# it (Ray 2.60): one explicit mode for every node and the driver, whatever this machine holds
AUTH = {"RAY_AUTH_MODE": "disabled"}


class RayNode:
    """One `ray start` (head, or worker node joining `head_port`) in its own session and temp dir: the
    node's processes (raylet, agents, the workers it forks) are exactly that session's."""

    def __init__(self, env: dict, resources: str = "", head_port: int = 0) -> None:
        self.temp = tempfile.mkdtemp(prefix="lsnode-", dir="/tmp")  # short: Ray's socket paths live under it
        self.node_env, self.resources, self.head_port = env, resources, head_port  # env: what its processes see
        self.head = not head_port
        self.sid, self.gcs_address, self.starter = 0, "", None

    def launch(self) -> None:
        """Run `ray start`; wait() for it, so that several nodes can come up at once."""
        nm, om, rt, agent_grpc, agent_http, metrics, gcs, dash = free_ports(8)
        venv_bin = str(Path(sys.executable).parent)
        env = lamscale_env({"PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                            **AUTH, **self.node_env})
        # every port explicit: Ray's fixed defaults (8076, 52365, 8265) clash with other clusters on this machine
        cmd = [os.path.join(venv_bin, "ray"), "start", f"--temp-dir={self.temp}", f"--node-manager-port={nm}",
               f"--object-manager-port={om}", f"--runtime-env-agent-port={rt}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
               f"--metrics-export-port={metrics}", "--object-store-memory=100000000", "--disable-usage-stats"]
        if not self.head:
            cmd += [f"--address=127.0.0.1:{self.head_port}", "--num-cpus=1", f"--resources={self.resources}"]
        else:  # no CPUs on the head: every training worker needs a worker node's CPU
            cmd += ["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false", f"--dashboard-port={dash}",
                    f"--system-config={HEALTH}"]
            self.head_port = gcs
        self.gcs_address = f"127.0.0.1:{self.head_port}"
        self.starter = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.sid = self.starter.pid

    def wait(self, attempts: int = 3) -> None:
        """Until `ray start` succeeds. It gives the raylet a fixed 30 s to register, which a 2-core machine
        busy with other jobs can miss: then clear away what it left and start the node again."""
        for attempt in range(attempts):
            out, _ = self.starter.communicate(timeout=240)
            if self.starter.returncode == 0:
                return
            assert "timed out during startup" in out and attempt + 1 < attempts, out[-3000:]
            self.kill()
            self.launch()

    def start(self) -> None:
        self.launch()
        self.wait()

    def processes(self) -> list[psutil.Process]:
        return _session_processes(self.sid)

    def training_workers(self) -> list[psutil.Process]:
        found = []
        for p in self.processes():
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def kill(self) -> list[str]:
        """The node goes away: SIGKILL to every one of its processes at once. Returns their names."""
        procs, names = self.processes(), []
        for p in procs:
            try:
                names.append(p.name())
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        return names


def _losses(lines: list[str]) -> dict[int, str]:
    found = {}
    for line in lines:
        m = re.search(r"\] step (\d+)/\d+ .*\| loss (\S+) \|", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def _committed(fs) -> list[int]:
    fs.invalidate_cache()
    if not fs.exists(f"{RUN}/checkpoints"):
        return []
    return sorted(int(p.rsplit("_", 1)[1]) for p in fs.ls(f"{RUN}/checkpoints") if fs.exists(f"{p}/commit.json"))


def _stop_all(nodes: list[RayNode]) -> None:
    """`ray stop --force` for these nodes only (other Ray clusters may run on this machine): SIGKILL, as
    for node A (SIGTERM costs ~10 s of agents shutting down); the nodes' temp dirs go too."""
    for node in nodes:
        if node.sid:
            node.kill()
        shutil.rmtree(node.temp, ignore_errors=True)


@pytest.fixture
def cluster(seaweedfs):
    """Head + worker nodes A and B; the nodes hold the store's credentials, like an instance role."""
    nodes = [RayNode(seaweedfs.env())]
    try:
        nodes[0].start()
        nodes += [RayNode(seaweedfs.env(), f'{{"node_{name}": 1}}', nodes[0].head_port) for name in ("a", "b")]
        for node in nodes[1:]:
            node.launch()
        for node in nodes[1:]:
            node.wait()
        yield nodes
    finally:
        _stop_all(nodes)


def test_losing_a_worker_node_resumes_from_the_last_commit(repo_root, sample_shards, seaweedfs, cluster):
    head, node_a, node_b = cluster
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", "run.storage=s3://lamscale-test/nodeloss",
           "run.name=run", f"cluster.address={head.gcs_address}", *ARGS]
    driver = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env({**seaweedfs.env(), **AUTH}), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        # one training worker dies two steps after the commit at 8: the group restarts from that commit
        assert _read_past(driver, seen, "checkpoint step 8 committed", "] step 10/20"), "".join(seen[-40:])
        victim = node_b.training_workers()
        assert len(victim) == 1 and len(node_a.training_workers()) == 1, "".join(seen[-40:])
        victim[0].send_signal(signal.SIGKILL)
        # after the restart, two steps past the commit again, node A goes: one rank, its raylet and agents
        assert _read_past(driver, seen, "resumed at step 8/20", "] step 12/20"), "".join(seen[-40:])
        assert len(node_a.training_workers()) == 1 and len(node_b.training_workers()) == 1, "".join(seen[-40:])
        killed = node_a.kill()
        assert "raylet" in killed and node_a.processes() == [], killed
        before_restore = _committed(seaweedfs.fs())
        cluster.append(RayNode(seaweedfs.env(), '{"node_a": 1}', node_a.head_port))
        cluster[-1].start()
        rest, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = "".join(seen) + rest
    assert driver.returncode == 0, out[-4000:]
    assert before_restore == [8], (before_restore, out[-4000:])
    resumed = [line for line in out.splitlines() if "resumed at step" in line]
    assert len(resumed) == 2 and all("resumed at step 8/20" in line for line in resumed), out[-4000:]
    assert "checkpoint step 20 committed" in rest and "lamscale: error" not in out

    # the steps replayed after each restore saw the same data, RNG and weights as the first time
    # (the progress line's loss has 4 decimals; a different batch or weight state moves it by far more)
    first_part, after_kill = out.split(resumed[0], 1)
    retry, replay = (_losses(part.splitlines()) for part in after_kill.split(resumed[1], 1))
    first = _losses(first_part.splitlines())
    assert sorted(first) == [2, 4, 6, 8, 10] and sorted(replay) == list(range(10, 21, 2)), out[-4000:]
    assert retry[10] == first[10] and replay[10] == first[10] and replay[12] == retry[12], (first, retry, replay)
    assert _committed(seaweedfs.fs())[-1] == 20


def _read_past(driver: subprocess.Popen, seen: list[str], first: str, then: str) -> bool:
    """Read the driver's lines until `then` appears after `first`."""
    found = False
    for line in driver.stdout:
        seen.append(line)
        found = found or first in line
        if found and then in line:
            return True
    return False
