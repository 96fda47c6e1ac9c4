"""SIGTERM, then Ctrl-C, to the driver: every rank stops at the same step boundary and saves; the driver exits
0 after SIGTERM and 130 after Ctrl-C (scripts must not read an interrupted run as success); each re-run resumes."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import lamscale_env, training_workers
from lamscale.cluster.runs import summarize

pytestmark = pytest.mark.slow
# ZeRO-1 with bf16: the preempted save and the resume also cover that DeepSpeed setting (no run of its own)
SHORT = ["train.max_steps=40", "train.ckpt_every=100", "train.eval_every=100", "train.log_every=2",
         "data.batch_size=8", "run.name=preempt", "train.zero_stage=1", "train.precision=bf16"]


def _committed(run) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir() if (p / "commit.json").exists())


def _listening(pid: int) -> set[str]:
    """The addresses the driver's Ray processes listen on. torch's rendezvous store in the rank-0 worker binds
    every interface whatever MASTER_ADDR says (not Ray's doing, and not settable), so it is left out."""
    found = set()
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            worker = "RayTrainWorker" in " ".join(proc.cmdline())
            found |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                      and not (worker and c.laddr.ip in ("::", "0.0.0.0"))}
        except psutil.Error:
            continue
    return found


def _lease_records_the_writers(run, driver: int) -> bool:
    """The run lease lists the driver's training workers and raylet (a re-run after a SIGKILL waits for
    those), not Ray's agents, which outlive a killed driver; True once a heartbeat has recorded them."""
    workers = {w.pid for w in training_workers(driver)}
    agents = {c.pid for c in psutil.Process(driver).children(recursive=True) if "Agent" in " ".join(c.cmdline())}
    deadline = time.time() + 15  # the heartbeat refreshes the list every 5 s
    while time.time() < deadline:
        recorded = {pid for pid, _ in json.loads((run / "LEASE.json").read_text())["procs"]}
        if workers and workers <= recorded:
            return not agents & recorded
        time.sleep(0.5)
    return False


def test_sigterm_and_ctrl_c_save_exit_and_resume(repo_root, sample_shards, tmp_path, ray_cluster):
    cmd = [sys.executable, "-m", "lamscale", "train", "configs/tiny.yaml", f"run.storage={tmp_path}", *SHORT]
    # SIGTERM: the run goes to conftest's shared head (no cluster of its own to start); the Ctrl-C re-run
    # starts Ray in-process, as `lamscale train` does by default, and its Ray processes are looked at
    proc = subprocess.Popen([*cmd, "--address", ray_cluster.gcs_address], cwd=repo_root, env=lamscale_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 4/40" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    out = "".join(lines)
    assert proc.wait(300) == 0, out[-3000:]
    assert "stopped at step" in out and "preempted: checkpoint step" in out, out[-3000:]
    assert "2 workers, ZeRO-1, bf16" in out, out[-3000:]
    run = tmp_path / "preempt"
    stopped = _committed(run)[-1]
    assert 4 <= stopped < 40
    assert not (run / "STOP_REQUESTED").exists() and not (run / "LEASE.json").exists()

    # the same command resumes; Ctrl-C in a terminal sends SIGINT to the whole process group
    proc = subprocess.Popen(cmd, cwd=repo_root, env=lamscale_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, addresses, state, recorded = [], set(), "", False
    try:
        for line in proc.stdout:
            lines.append(line)
            step = re.search(r"step (\d+)/40 \(\d+%\)", line)  # a progress line
            if step and int(step.group(1)) >= stopped + 2:  # logged every 2 steps; `stopped` may be odd
                addresses, state = _listening(proc.pid), summarize(str(run)).state
                recorded = _lease_records_the_writers(run, proc.pid)
                os.killpg(proc.pid, signal.SIGINT)
                break
        lines += proc.stdout.readlines()
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert f"resumed at step {stopped}/40" in out, out[-3000:]
    assert code == 130, out[-3000:]
    assert "Ctrl-C: saving at the next step boundary" in out and "preempted: checkpoint step" in out, out[-3000:]
    assert _committed(run)[-1] >= stopped + 2, out[-3000:]
    assert not (run / "STOP_REQUESTED").exists() and not (run / "LEASE.json").exists()
    assert state == "running" and recorded  # `lamscale runs` while the driver held the run
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses  # Ray on 127.0.0.1 only
