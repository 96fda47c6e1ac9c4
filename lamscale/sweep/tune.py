"""Run a sweep's trials through Ray Tune, each an ordinary lamscale run (`launch.train`: the same checks,
TorchTrainer, checkpoints and TensorBoard events) under `<run.storage>/<sweep name>/<trial>`.

Resuming is two layers deep: the Tune experiment (`<sweep>/tune`) is restored when it exists, so finished
trials are not scheduled again, and a trial that is scheduled again resumes its own run from its newest
committed checkpoint (a complete run just reports its metrics). So re-running the same command after
the driver was killed finishes the sweep without redoing work.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lamscale import storage
from lamscale.config import Config, ConfigError, from_dict, load_config
from lamscale.sweep.grid import Trial, parse_grid, trial_configs, trials

PLAN_FILE = "sweep_plan.json"


def _trial(params: dict) -> None:
    """One Tune trial: train (or resume, or find complete) the trial's run; report its final metrics."""
    import ray
    from ray import tune

    from lamscale.cluster import launch

    cfg = from_dict(params["config"])
    run_url = launch.run_url_for(cfg)
    address = ray.get_runtime_context().gcs_address  # the sweep's cluster: each trial's TorchTrainer joins it
    launch.train(cfg, address=address)
    report = json.loads(storage.read_bytes(storage.join(run_url, "metrics_val.json")))
    tune.report({k: float(v) for k, v in report["brief"].items()} | {"step": report["step"]})


def sweep_url_for(config: str, storage_root: str, name: str) -> str:
    return storage.join(storage.normalize(storage_root), name or f"sweep-{Path(config).stem}")


def plan(config: str, grid_specs: list[str], seeds: int, name: str, overrides: list[str]) -> tuple[str, list[Trial], dict[str, Config]]:
    """Every check before Ray starts: the grid, each trial's config, the data; returns (sweep URL, trials, configs)."""
    from lamscale.cluster.launch import prepare

    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds}; expected at least 1")
    grid = parse_grid(grid_specs)
    base = load_config(config, overrides)
    url = sweep_url_for(config, base.run.storage, name)
    plan_trials = trials(grid, seeds)
    configs = trial_configs(config, overrides, plan_trials, url)
    for cfg in configs.values():
        prepare(cfg)
    record = {"config": str(config), "overrides": overrides, "grid": grid, "seeds": seeds,
              "trials": [{"name": t.name, "point": t.point, "seed": t.seed, "overrides": t.overrides} for t in plan_trials]}
    old = storage.join(url, PLAN_FILE)
    if storage.exists(old) and json.loads(storage.read_bytes(old)) != record:
        raise ConfigError(f"{url} holds another sweep (its {PLAN_FILE} differs: other grid, seeds, config or "
                          f"overrides); resume it with its own command, or pick another --name")
    storage.write_bytes(old, json.dumps(record, indent=2).encode())
    return url, plan_trials, configs


def run_sweep(config: str, grid_specs: list[str], seeds: int, name: str = "", overrides: list[str] | None = None,
              address: str = "", max_concurrent: int = 1) -> str:
    """Plan, run every unfinished trial through Ray Tune, write the results; returns the sweep URL."""
    import ray
    from ray import tune

    from lamscale.cluster.launch import _start_ray
    from lamscale.sweep.report import write_results

    url, plan_trials, configs = plan(config, grid_specs, seeds, name, overrides or [])
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: {max_concurrent}; expected at least 1")
    if not storage.is_local(url):
        raise ConfigError(f"{url}: sweeps keep their Tune experiment on a local or shared filesystem for now")
    first = next(iter(configs.values()))
    c = first.cluster
    if not address and max_concurrent * c.num_workers * c.cpus_per_worker > (os.cpu_count() or 1):
        raise ConfigError(f"--max-concurrent {max_concurrent} × cluster.num_workers={c.num_workers} × "
                          f"cpus_per_worker={c.cpus_per_worker:g} needs more CPUs than this machine's "
                          f"{os.cpu_count()}; lower it, or sweep on a Ray cluster (--address)")
    print(f"[lamscale] sweep {url}: {len(plan_trials)} trials, at most {max_concurrent} at a time", flush=True)
    # a private cluster gets one logical CPU more than the trials' workers: the trials' drivers take 0.01 each
    sized = dataclasses.replace(first, cluster=dataclasses.replace(c, num_workers=max_concurrent * c.num_workers + 1,
                                                                   cpus_per_worker=1.0))
    _start_ray(sized, address)
    trainable = tune.with_resources(_trial, {"cpu": 0.01})  # the trial only drives; its TorchTrainer takes the CPUs
    experiment = str(Path(storage.local_path(url)) / "tune")
    space = {"config": tune.grid_search([configs[t.name].to_dict() for t in plan_trials])}
    if tune.Tuner.can_restore(experiment):
        print("[lamscale] resuming the sweep: finished trials are kept, unfinished ones resume", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=storage.local_path(url), verbose=0))
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    write_results(url)
    ray.shutdown()
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed; the others are in {url}/sweep.md; fix the cause and "
                           f"run the same command to resume")
    return url
