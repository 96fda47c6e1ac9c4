"""One writer per run: the run lease on real files (and a real S3 server), real processes as holders, and
two real `lamscale train` drivers started at once on the same run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import lamscale_env
from lamscale.cluster.lease import LEASE_FILE, LeaseHeld, RunLease, lease_state, read_lease
from lamscale.cluster.runs import summarize


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _key(proc: subprocess.Popen) -> list:
    return [proc.pid, round(psutil.Process(proc.pid).create_time(), 2)]


def _write_lease(run, **fields) -> None:
    record = {"token": "other", "host": socket.gethostname(), "pid": 1, "process": [1, 0.0], "started": time.time(),
              "heartbeat": time.time(), "local_ray": True, "procs": [], **fields}
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_text(json.dumps(record))


def test_held_lease_refuses_a_second_driver_then_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMSCALE_LEASE_EXPIRY_S", "1.2")  # heartbeat every 0.5 s
    run = str(tmp_path / "run")
    first = RunLease(run)
    first.acquire()
    try:
        assert read_lease(run)["pid"] == os.getpid() and lease_state(run) == "running"
        beat = read_lease(run)["heartbeat"]
        time.sleep(2.0)  # longer than the expiry: only the heartbeat keeps it fresh
        assert read_lease(run)["heartbeat"] > beat
        with pytest.raises(LeaseHeld) as held:
            RunLease(run).acquire()
        message = str(held.value)
        assert "\n" not in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "wait for it to finish" in message and f"kill {os.getpid()}" in message
    finally:
        first.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists() and lease_state(run) is None
    second = RunLease(run)
    second.acquire()  # free again
    second.release()


def test_stale_lease_is_taken_over_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMSCALE_LEASE_EXPIRY_S", "30")
    _write_lease(tmp_path / "run", host="elsewhere", pid=4242, heartbeat=time.time() - 31)
    said = []
    lease = RunLease(str(tmp_path / "run"), say=said.append)
    lease.acquire()
    try:
        assert len(said) == 1 and "taking over the run lease of pid 4242 on elsewhere" in said[0], said
        assert "no heartbeat for 31s" in said[0]
        assert read_lease(str(tmp_path / "run"))["token"] == lease.record["token"]
    finally:
        lease.release()


def test_fresh_lease_of_another_host_is_refused(tmp_path):
    _write_lease(tmp_path / "run", host="node-7", pid=4242, heartbeat=time.time() - 3)
    with pytest.raises(LeaseHeld, match=r"is being trained by pid 4242 on node-7 .*heartbeat 3s ago"):
        RunLease(str(tmp_path / "run")).acquire()


def test_killed_driver_here_waits_for_its_ray_processes(tmp_path, monkeypatch):
    """The driver died (SIGKILL) but a worker it recorded still runs: wait (one line) until it is gone."""
    monkeypatch.setenv("LAMSCALE_LEASE_EXPIRY_S", "60")
    driver, worker = _sleeper(), _sleeper()
    try:
        driver_key, worker_key = _key(driver), _key(worker)
        driver.kill()
        driver.wait()
        _write_lease(tmp_path / "run", pid=driver_key[0], process=driver_key, procs=[worker_key])
        killer = threading.Timer(2.0, worker.kill)
        killer.start()
        said = []
        began = time.monotonic()
        lease = RunLease(str(tmp_path / "run"), say=said.append)
        lease.acquire()
        waited = time.monotonic() - began
        lease.release()
    finally:
        for proc in (driver, worker):
            proc.kill()
            proc.wait()
    assert 2.0 <= waited < 20, waited  # until the worker was gone, far less than the 60 s expiry
    assert len(said) == 2 and "waiting for the processes of the killed driver" in said[0], said
    assert "its Ray processes are gone" in said[1]


def test_live_driver_on_a_cluster_is_not_taken_over_early(tmp_path):
    """On a cluster the workers run elsewhere: a dead driver's lease is honoured until it expires."""
    driver = _sleeper()
    key = _key(driver)
    driver.kill()
    driver.wait()
    _write_lease(tmp_path / "run", pid=key[0], process=key, local_ray=False, heartbeat=time.time() - 1)
    lease = RunLease(str(tmp_path / "run"), say=lambda line: None)
    lease.expiry = 3.0
    began = time.monotonic()
    lease.acquire()
    lease.release()
    assert time.monotonic() - began >= 1.5


def test_lease_on_s3_write_then_confirm(seaweedfs, monkeypatch):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    run = "s3://lamscale-test/lease-test/run"
    first = RunLease(run)
    first.acquire()
    try:
        assert read_lease(run)["token"] == first.record["token"]
        with pytest.raises(LeaseHeld, match="is being trained by"):
            RunLease(run).acquire()
    finally:
        first.release()
    assert read_lease(run) is None


def test_two_drivers_on_one_run_only_one_trains(repo_root, sample_shards, tmp_path):
    """Two `lamscale train` with the same run.name at once: one goes on (and is stopped once the other has
    answered), the other exits 2 with one line naming the holder, before starting Ray."""
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={tmp_path}", "run.name=conc",
           "train.max_steps=4", "data.batch_size=8"]
    procs = [subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = procs[1 - procs.index(loser)]
        assert winner.poll() is None  # still going: it holds the run
        lease = read_lease(str(tmp_path / "conc"))
        assert lease["pid"] == winner.pid
        while not (tmp_path / "conc" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)  # the winner writes it right after taking the lease
        assert summarize(str(tmp_path / "conc")).state == "running"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out, err = loser.communicate()
    assert loser.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"is being trained by pid {winner.pid} on {socket.gethostname()}" in lines[0], err
    assert "new run" not in out and "Ray" not in out + err, out + err
    winner_out = winner.communicate()[0]
    assert "new run" in winner_out, winner_out


def test_runs_lists_failed_and_running(tmp_path):
    from lamscale.cluster.runs import clear_failed, mark_failed

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  max_steps: 10\n")
    assert summarize(str(run)).state == "new"
    mark_failed(str(run), "training failed on rank 0: ValueError: boom")
    assert summarize(str(run)).state == "failed"
    assert json.loads((run / "FAILED.json").read_text())["error"].endswith("boom")
    lease = RunLease(str(run))
    lease.acquire()
    try:
        assert summarize(str(run)).state == "running"  # a live driver is at it again
    finally:
        lease.release()
    clear_failed(str(run))
    assert summarize(str(run)).state == "new"
