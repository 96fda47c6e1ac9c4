"""Cluster jobs through Ray's Job Submission API: submit `lamscale train`, then query, follow or stop it.

The project folder is uploaded as the job's working_dir, so the cluster runs this checkout's code and
configs; the config is validated here first, so a typo fails in one line instead of on the cluster.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lamscale
from lamscale import storage
from lamscale.config import load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, outputs, generated shards (regenerated on the cluster), VCS data.
UPLOAD_EXCLUDES = ["/.git/", "/.venv/", "/runs/", "/shards/tiny/", "/build/", "/.pytest_cache/",
                   "__pycache__/", "*.egg-info/", "*.pyc"]
# `lamscale stop` sends SIGTERM; the driver then saves at the next step boundary, which needs more
# than Ray's default 3 s before SIGKILL.
STOP_GRACE_S = 120
CONNECT_TIMEOUT_S = 10
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(ValueError):
    """A cluster or job problem, as one line (a ValueError, so `lamscale` prints it without a traceback)."""


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict
    run_url: str
    metadata: dict[str, str]


def resolve_address(address: str = "") -> str:
    """Explicit address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local dashboard."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    # JobSubmissionClient lets RAY_ADDRESS override its `address` argument; ours must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def use_local_auth_token() -> None:
    """Send the local Ray auth token (~/.ray/auth_token, $RAY_AUTH_TOKEN) when there is one.

    Ray ≥ 2.52 clusters started where a token exists require it, but JobSubmissionClient and
    ray.init(address=…) only send it when RAY_AUTH_MODE=token; an explicit RAY_AUTH_MODE is left alone.
    """
    import logging

    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is not for this client
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def connect(address: str = ""):
    """A JobSubmissionClient for `address`, or JobError naming it when the cluster does not answer."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    use_local_auth_token()
    try:
        if address.startswith(("http://", "https://")):
            import requests

            # fail in seconds, not after the OS connect timeout, when the host does not answer
            requests.get(f"{address.rstrip('/')}/api/version", timeout=CONNECT_TIMEOUT_S)
        with _without_address_env():
            return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, a refused/timed-out socket, a non-Ray server…
        raise JobError(f"cannot reach the Ray cluster at {address}: {_first_line(e)}") from None


def project_root() -> Path:
    """The source checkout lamscale runs from (uploaded as working_dir), else the current folder."""
    checkout = Path(lamscale.__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd().resolve()


def build_submission(config: str, overrides: list[str], python: str = "python") -> Submission:
    """Validate `config` + `overrides` locally and describe the job that trains it on the cluster."""
    cfg = load_config(config, overrides)
    root = project_root()
    try:
        config_in_root = Path(config).resolve().relative_to(root)
    except ValueError:
        raise JobError(f"{config}: the config must be inside {root} (that folder is uploaded as the job's "
                       f"working_dir)") from None
    args = list(overrides)
    if storage.is_local(cfg.run.storage) and not cfg.run.storage.startswith("file://"):
        # a relative folder would land in the job's throw-away working_dir copy; outputs must outlive it
        cfg.run.storage = storage.normalize(cfg.run.storage)
        args.append(f"run.storage={cfg.run.storage}")
    run_url = storage.join(storage.normalize(cfg.run.storage), cfg.run.name)
    command = [python, "-m", "lamscale", "train", str(config_in_root), *args, "--address", "auto"]
    runtime_env = {
        "working_dir": str(root),
        "excludes": UPLOAD_EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)},
    }
    metadata = {"lamscale_run": run_url, "lamscale_config": str(config_in_root)}
    return Submission(shlex.join(command), runtime_env, run_url, metadata)


class ClusterJobs:
    """The Jobs API of one cluster: submit, status, logs, follow, wait, stop."""

    def __init__(self, address: str = ""):
        self.address = resolve_address(address)
        self.client = connect(self.address)

    def submit(self, sub: Submission) -> str:
        """Submit the job `build_submission` described; returns its id."""
        return _call(lambda: self.client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                                    metadata=sub.metadata), f"submit to {self.address}")

    def status(self, job_id: str) -> tuple[str, str]:
        """(status, Ray's message), e.g. ("SUCCEEDED", "Job finished successfully.")."""
        info = _call(lambda: self.client.get_job_info(job_id), job_id)
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def logs(self, job_id: str) -> str:
        return _call(lambda: self.client.get_job_logs(job_id), job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs to `write` until it ends; returns its final status."""

        async def _tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        _call(lambda: asyncio.run(_tail()), job_id)
        return self.wait(job_id, timeout_s=60)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
        deadline = time.time() + timeout_s
        while True:
            state, _ = self.status(job_id)
            if state in TERMINAL:
                return state
            if time.time() > deadline:
                raise JobError(f"{job_id}: still {state} after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def stop(self, job_id: str, timeout_s: float = STOP_GRACE_S + 30) -> str:
        """Ask the job to stop (the trainer saves a checkpoint first); waits and returns its final status."""
        _call(lambda: self.client.stop_job(job_id), job_id)
        return self.wait(job_id, timeout_s)


def _call(fn: Callable, what: str):
    try:
        return fn()
    except Exception as e:  # the SDK raises RuntimeError("Request failed with status code 404: …") etc.
        raise JobError(f"{what}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:500]
