"""The driver: check everything, then run the trainer on Ray Train workers (local Ray or a cluster)."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import yaml

from lamscale import storage
from lamscale.config import Config, ConfigError
from lamscale.data.stream import absolute_pattern, check_shards, expand_urls
from lamscale.train.checkpoint import committed_steps
from lamscale.train.preempt import STOP_FILE, clear_stop, request_stop

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shards" / "tiny"


def run_url_for(cfg: Config) -> str:
    return storage.join(storage.normalize(cfg.run.storage), cfg.run.name)


def _ensure_sample(cfg: Config) -> None:
    """The embedded sample's shards are generated deterministically on first use."""
    urls = expand_urls(cfg.data.train) + expand_urls(cfg.data.val)
    if not all(u.startswith(str(SAMPLE_DIR)) for u in urls):
        return
    from lamscale.data.sample import GENERATOR_VERSION, build_sample

    manifest = SAMPLE_DIR / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("generator_version") == GENERATOR_VERSION:
        return

    print(f"[lamscale] generating the embedded sample shards in {SAMPLE_DIR} (first use)", flush=True)
    build_sample(str(SAMPLE_DIR), cfg.model.video_dim, cfg.model.text_dim, cfg.model.max_text)


def _check_feature_dims(cfg: Config) -> None:
    """Compare the model's input dims with the shards' manifest.json, when there is one."""
    first = expand_urls(cfg.data.train)[0]
    manifest_url = storage.join(first.rsplit("/", 1)[0], "manifest.json")
    if not storage.exists(manifest_url, storage.PREFLIGHT_BUDGET_S):
        return
    dims = json.loads(storage.read_bytes(manifest_url)).get("feature_dims", {})
    for kind, key in (("video", "model.video_dim"), ("text", "model.text_dim")):
        want = getattr(cfg.model, f"{kind}_dim")
        if kind in dims and dims[kind] != want:
            raise ConfigError(f"{key}: {want}, but {manifest_url} says the {kind} features are {dims[kind]}-d")


def prepare(cfg: Config) -> str:
    """Every check that can fail, before Ray or any worker starts; returns the run URL."""
    cfg.data.train, cfg.data.val = absolute_pattern(cfg.data.train), absolute_pattern(cfg.data.val)
    _ensure_sample(cfg)
    check_shards(cfg.data.train, "data.train")
    check_shards(cfg.data.val, "data.val")
    _check_feature_dims(cfg)
    run_url = run_url_for(cfg)
    storage.check_writable(run_url)
    storage.write_bytes(storage.join(run_url, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    return run_url


def _start_ray(cfg: Config, address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch would echo each worker line twice through its logger
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # LAMSCALE_* settings (storage retry budget, test fault injection) reach every worker
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("LAMSCALE_")}}
    if address:
        from lamscale.cluster.jobs import use_local_auth_token

        use_local_auth_token()  # clusters started where a Ray auth token exists require it
        ray.init(address=address, log_to_driver=True, runtime_env=env)
    else:  # a private in-process cluster sized for this run
        need = int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999)
        ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=True,
                 object_store_memory=256 * 2**20, log_to_driver=True, runtime_env=env)


def train(cfg: Config, address: str = "") -> str:
    """Train (or resume) the run named by `cfg`; returns its URL."""
    run_url = prepare(cfg)
    steps = committed_steps(run_url)
    if steps and steps[-1] >= cfg.train.max_steps and storage.exists(storage.join(run_url, "metrics_val.json")):
        print(f"[lamscale] {run_url} is already complete (step {steps[-1]}); "
              f"raise train.max_steps or pick another run.name to train more", flush=True)
        return run_url
    print(f"[lamscale] run {run_url}: " + (f"resuming from step {steps[-1]}" if steps else "new run"), flush=True)

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lamscale.train.loop import train_worker

    _start_ray(cfg, address or cfg.cluster.address)
    clear_stop(run_url)  # a request left by an earlier preempted run is spent
    previous = signal.signal(signal.SIGTERM, lambda *_: _on_sigterm(run_url))
    c = cfg.cluster
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_url": run_url, "driver_pid": os.getpid()},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=run_url if storage.is_local(run_url) else None,
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:
        failures = getattr(e, "worker_failures", None)
        if failures is None:
            raise
        rank, cause = _first_cause(failures)
        raise RunFailed(f"training failed on rank {rank}: {cause}; checkpoints committed before the failure are "
                        f"intact: fix the cause, then `lamscale resume {run_url}`") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if storage.exists(storage.join(run_url, STOP_FILE)):
        clear_stop(run_url)
        steps = committed_steps(run_url)
        print(f"[lamscale] preempted: checkpoint step {steps[-1] if steps else 0} is committed in {run_url}; "
              f"resume with the same command or `lamscale resume {run_url}`", flush=True)
        return run_url
    summary = storage.join(run_url, "metrics_val.json")
    if storage.exists(summary):
        brief = json.loads(storage.read_bytes(summary))["brief"]
        print(f"[lamscale] done: {run_url}\n" + json.dumps(brief, indent=2), flush=True)
    return run_url


class RunFailed(RuntimeError):
    """Training stopped on an error the workers could not recover from (one line for the user)."""


def _first_cause(failures: dict) -> tuple[int, str]:
    """The root error of the lowest failed rank, as its last `SomethingError: message` line."""
    rank = min(failures)
    lines = [line.strip() for line in str(failures[rank]).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return rank, (errors or lines or [type(failures[rank]).__name__])[-1]


def _on_sigterm(run_url: str) -> None:
    print("[lamscale] SIGTERM: saving at the next step boundary, then exiting", flush=True)
    request_stop(run_url)


def load_run_config(run: str, overrides: list[str]) -> Config:
    """The saved config of run folder / URL `run`, with its storage and name pointing at it."""
    from lamscale.config import load_config

    run_url = storage.normalize(run)
    saved = storage.join(run_url, "config.yaml")
    if not storage.exists(saved):
        raise ConfigError(f"{run}: not a lamscale run (no config.yaml)")
    parent, name = run_url.rsplit("/", 1)
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"lamscale-resume-{os.getpid()}.yaml"
    local.write_bytes(storage.read_bytes(saved))
    try:
        return load_config(local, [*overrides, f"run.storage={parent}", f"run.name={name}"])
    finally:
        local.unlink(missing_ok=True)
