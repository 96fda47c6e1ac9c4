"""The driver: check everything, then run the trainer on Ray Train workers (local Ray or a cluster)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import yaml

from lamscale import storage
from lamscale.cluster.lease import RunLease
from lamscale.cluster.runs import clear_failed, mark_failed
from lamscale.config import EVAL_MAY_CHANGE, Config, ConfigError, resume_changes
from lamscale.data.urls import absolute_pattern, check_shards, expand_urls
from lamscale.tasks import get_task
from lamscale.train.commits import committed_steps
from lamscale.train.preempt import STOP_FILE, clear_stop, request_stop

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shards" / "tiny"


def run_url_for(cfg: Config) -> str:
    return storage.join(storage.normalize(cfg.run.storage), cfg.run.name)


def _ensure_sample(cfg: Config) -> None:
    """An embedded sample's shards (the QVH sample in shards/tiny, the MAD-like one in shards/mad_sample, the
    captioning one in shards/caption_sample) are generated deterministically on first use, or again when
    their generator has changed."""
    from lamscale.data import caption_sample, mad_sample, sample

    m = cfg.model
    urls = expand_urls(cfg.data.train) + expand_urls(cfg.data.val)
    for folder, module, build in (
            (SAMPLE_DIR, sample, lambda out: sample.build_sample(out, m.video_dim, m.text_dim, m.max_text)),
            (mad_sample.SAMPLE_DIR, mad_sample, lambda out: mad_sample.build_mad_sample(out, m.video_dim, m.text_dim, m.max_text)),
            (caption_sample.SAMPLE_DIR, caption_sample, lambda out: caption_sample.build_caption_sample(out, m.video_dim, m.audio_dim))):
        if not all(u.startswith(f"{folder}/") for u in urls):
            continue
        manifest = folder / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("generator_version") == module.GENERATOR_VERSION:
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        # two first runs at once (two terminals, parallel tests) must not write the same shards together
        with open(folder.parent / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if manifest.exists() and json.loads(manifest.read_text()).get("generator_version") == module.GENERATOR_VERSION:
                return
            print(f"[lamscale] generating the embedded sample shards in {folder} (first use)", flush=True)
            build(str(folder))
        return


def _check_feature_dims(cfg: Config) -> None:
    """Compare the model's input dims with the shards' manifest.json, when there is one."""
    first = expand_urls(cfg.data.train)[0]
    manifest_url = storage.join(first.rsplit("/", 1)[0], "manifest.json")
    if not storage.exists(manifest_url, storage.PREFLIGHT_BUDGET_S):
        return
    dims = json.loads(storage.read_bytes(manifest_url)).get("feature_dims", {})
    for kind, key in (("video", "model.video_dim"), ("text", "model.text_dim"), ("audio", "model.audio_dim")):
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
    get_task(cfg).preflight()
    run_url = run_url_for(cfg)
    storage.check_writable(run_url)
    return run_url


def _check_resume(cfg: Config, run_url: str, steps: list[int]) -> None:
    """A run with checkpoints resumes only under a config its checkpoints fit (model shape, data layout…)."""
    stored_url = storage.join(run_url, "config.yaml")
    if not steps or not storage.exists(stored_url):
        return
    changes = resume_changes(yaml.safe_load(storage.read_bytes(stored_url)) or {}, cfg)
    if changes:
        raise ConfigError(f"{run_url} resumes from step {steps[-1]}, whose checkpoint cannot take these changes: "
                          f"{'; '.join(changes)}; put them back, or train a new run (another run.name)")


def _check_local_resources(cfg: Config) -> None:
    """Ray started here gets this machine only: more workers than it holds would queue forever (or, with
    fractional CPUs, crowd dozens of processes onto a few cores)."""
    c = cfg.cluster
    cpus = os.cpu_count() or 1
    if c.num_workers * c.cpus_per_worker > cpus:
        raise ConfigError(f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker:g} "
                          f"needs {c.num_workers * c.cpus_per_worker:g} CPUs, this machine has {cpus}; lower them, "
                          f"or train on a Ray cluster (--address)")
    if c.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if c.num_workers > gpus:
            raise ConfigError(f"cluster.num_workers={c.num_workers} with cluster.use_gpu=true needs {c.num_workers} "
                              f"GPUs, this machine has {gpus}")


def _wait_for_cluster_resources(cfg: Config, address: str) -> None:
    """On an existing cluster (which may be scaling up), wait a bounded time for the run's resources."""
    import ray

    c = cfg.cluster
    need = {"CPU": c.num_workers * c.cpus_per_worker, **({"GPU": float(c.num_workers)} if c.use_gpu else {})}
    budget = float(os.environ.get("LAMSCALE_RESOURCE_WAIT_S", "60"))
    deadline, announced = time.monotonic() + budget, False
    while True:
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
        if not short:
            return
        text = ", ".join(f"{need[k]:g} {k}s (it has {have.get(k, 0.0):g})" for k in short)
        if time.monotonic() >= deadline:
            raise ConfigError(f"the Ray cluster at {address} does not have the {text} that cluster.num_workers="
                              f"{c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker:g}"
                              f"{' (one GPU each)' if c.use_gpu else ''} need, after waiting {budget:.0f}s; "
                              f"lower them or add nodes")
        if not announced:
            print(f"[lamscale] waiting up to {budget:.0f}s for the cluster to offer {text}", flush=True)
            announced = True
        time.sleep(2)


def _loopback_only() -> None:
    """Ray rewrites 127.0.0.1 (a node's address, or the cluster address a driver dials) into the host's
    outside IP, and a node it starts listens on every interface, unless it believes multi-node clusters are
    off (its setting for macOS/Windows). A cluster this process starts, or one on loopback, needs no more."""
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the raylet and GCS it starts read it too
    ray_constants.ENABLE_RAY_CLUSTER = False


STATE_API = "LAMSCALE_RAY_STATE_API"  # "0": the cluster this process trains on has no dashboard (set by _start_ray)


def _start_ray(cfg: Config, address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch would echo each worker line twice through its logger
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's node-drain watcher (ours is the stop file) makes Ray log an E-level line about its
    # actor's constructor arguments at every worker-group start; the driver propagates this to the controller
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # LAMSCALE_* settings (storage retry budget, test fault injection) reach every worker
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("LAMSCALE_")}}
    if address:
        from lamscale.cluster.jobs import use_local_auth_token

        use_local_auth_token()  # clusters started where a Ray auth token exists require it
        if "://" not in address and address.rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1"):
            _loopback_only()  # else Ray dials this machine's outside IP, where a loopback-only cluster is not
        context = ray.init(address=address, log_to_driver=True, runtime_env=env)
        os.environ[STATE_API] = "1" if context.dashboard_url else "0"
    else:  # a private in-process cluster sized for this run, on 127.0.0.1 only
        _loopback_only()
        need = int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999)
        # address="local": always a new cluster; without it Ray joins whatever RAY_ADDRESS or the last `ray start`
        # on this machine names (then refuses num_cpus), so a run's placement would depend on the shell it came from
        # LAMSCALE_RAY_DASHBOARD=0: no dashboard (its processes cost a few CPU-seconds per start on a small box)
        dashboard = os.environ.get("LAMSCALE_RAY_DASHBOARD", "1") != "0"
        env["env_vars"][STATE_API] = os.environ[STATE_API] = "1" if dashboard else "0"  # a sweep's trials read it too
        ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=dashboard,
                 _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20, log_to_driver=True, runtime_env=env)


def train(cfg: Config, address: str = "") -> str:
    """Train (or resume) the run named by `cfg`; returns its URL. Everything that can be refused is
    refused before Ray starts; one driver at a time holds the run (lamscale/cluster/lease.py)."""
    address = address or cfg.cluster.address
    run_url = prepare(cfg)
    if not address:
        _check_local_resources(cfg)
    lease = RunLease(run_url, local_ray=not address)
    lease.acquire()
    try:
        steps = committed_steps(run_url)  # after the lease: the driver before us may have just committed
        _check_resume(cfg, run_url, steps)
        if steps and steps[-1] >= cfg.train.max_steps and storage.exists(storage.join(run_url, "metrics_val.json")):
            print(f"[lamscale] {run_url} is already complete (step {steps[-1]}); "
                  f"raise train.max_steps or pick another run.name to train more", flush=True)
            return run_url
        clear_failed(run_url)
        storage.write_bytes(storage.join(run_url, "config.yaml"),
                            yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        print(f"[lamscale] run {run_url}: " + (f"resuming from step {steps[-1]}" if steps else "new run"), flush=True)
        try:
            return _fit(cfg, run_url, address, lease)
        except Interrupted:
            raise
        except Exception as e:  # `lamscale runs` then says "failed", not "new" or "incomplete"
            mark_failed(run_url, " ".join(str(e).split())[:500] or type(e).__name__)
            raise
    finally:
        lease.release()


def _torch_trainer(cfg: Config, run_url: str, address: str, lease: RunLease, worker, **payload):
    """Ray started (or reached), the lease beating, and a TorchTrainer running `worker` on every rank."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            # our workers stream their own shards: without Ray Datasets, Ray Train v2's DatasetsCallback only
            # starts an idle DatasetManager actor per run (a process importing ray.data, ~3 CPU-s). A private
            # hook of the pinned Ray (pyproject: ray==2.60.0): re-check it when Ray is upgraded
            callbacks = super()._create_default_callbacks()
            dropped = {"DatasetsCallback"} if not self.datasets else set()
            # its PlacementGroupCleaner actor asks the State API (a full dashboard) whether the controller still
            # lives: on a cluster without one it can never tell, and logs that failure every second of the run
            if os.environ.get(STATE_API) == "0":
                dropped.add("PlacementGroupCleanerCallback")
            return [cb for cb in callbacks if type(cb).__name__ not in dropped]

    _start_ray(cfg, address)
    lease.beat()  # records the raylet: a re-run after this driver is killed waits for it
    if address:
        _wait_for_cluster_resources(cfg, address)
    c = cfg.cluster
    return Trainer(
        worker,
        train_loop_config={"config": cfg.to_dict(), "run_url": run_url, "driver_pid": os.getpid(), **payload},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=run_url if storage.is_local(run_url) else None,
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )


def evaluate(run: str, step: int | None = None, data: str = "", split: str = "val", address: str = "",
             overrides: list[str] | None = None) -> dict:
    """`lamscale eval`: a committed checkpoint of `run` (the newest by default) on `data` (default: the
    run's data.val), on Ray workers like training; writes predictions_<split>.* and metrics_<split>.json.
    `overrides` may change how it decodes and reads (task.*, data.*, the backend), not what the checkpoint holds."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split):
        raise ConfigError(f"--split: {split!r} is not a plain name (letters, digits, '-', '_')")
    cfg = load_run_config(run, [*(overrides or []), *([f"data.val={data}"] if data else [])], EVAL_MAY_CHANGE)
    address = address or cfg.cluster.address
    run_url = run_url_for(cfg)
    cfg.data.val = absolute_pattern(cfg.data.val)
    _ensure_sample(cfg)
    check_shards(cfg.data.val, "--data" if data else "data.val")
    steps = committed_steps(run_url)
    if not steps:
        raise ConfigError(f"{run}: no committed checkpoint to evaluate")
    if step is not None and step not in steps:
        raise ConfigError(f"--step {step}: not a committed checkpoint of {run} (committed: {steps})")
    step = steps[-1] if step is None else step
    if not address:
        _check_local_resources(cfg)
    lease = RunLease(run_url, local_ray=not address)
    lease.acquire()  # no training run writes the same files meanwhile
    try:
        print(f"[lamscale] evaluating {run_url} step {step} on {cfg.data.val} as '{split}'", flush=True)
        from lamscale.train.loop import eval_worker  # torch: only once every check has passed

        trainer = _torch_trainer(cfg, run_url, address, lease, eval_worker, step=step, split=split)
        with _worker_failures_as_one_line("evaluation failed on rank {rank}: {cause}"):
            _fit_off_main_thread(trainer)
    finally:
        lease.release()
    report = json.loads(storage.read_bytes(storage.join(run_url, f"metrics_{split}.json")))
    print(f"[lamscale] wrote {storage.join(run_url, f'metrics_{split}.json')} and predictions_{split}.jsonl\n"
          + json.dumps(report["brief"], indent=2), flush=True)
    return report


def _fit(cfg: Config, run_url: str, address: str, lease: RunLease) -> str:
    from lamscale.train.loop import train_worker

    trainer = _torch_trainer(cfg, run_url, address, lease, train_worker)
    clear_stop(run_url)  # a request left by an earlier preempted run is spent
    stop = _StopOnSignals(run_url)
    with _worker_failures_as_one_line("training failed on rank {rank}: {cause}; checkpoints committed before the "
                                      f"failure are intact: fix the cause, then `lamscale resume {run_url}`"), stop:
        _fit_off_main_thread(trainer)
    if storage.exists(storage.join(run_url, STOP_FILE)):
        clear_stop(run_url)
        steps = committed_steps(run_url)
        print(f"[lamscale] preempted: checkpoint step {steps[-1] if steps else 0} is committed in {run_url}; "
              f"resume with the same command or `lamscale resume {run_url}`", flush=True)
        if stop.interrupted:
            raise Interrupted(run_url)
        return run_url
    summary = storage.join(run_url, "metrics_val.json")
    if storage.exists(summary):
        brief = json.loads(storage.read_bytes(summary))["brief"]
        print(f"[lamscale] done: {run_url}\n" + json.dumps(brief, indent=2), flush=True)
    return run_url


@contextlib.contextmanager
def _worker_failures_as_one_line(template: str):
    """A Ray Train worker failure becomes RunFailed(template with the lowest failed rank and its root error)."""
    try:
        yield
    except Exception as e:
        failures = getattr(e, "worker_failures", None)
        if failures is None:
            raise
        rank, cause = _first_cause(failures)
        raise RunFailed(template.format(rank=rank, cause=cause)) from None


def _fit_off_main_thread(trainer) -> None:
    """trainer.fit() in a helper thread: on the main thread Ray Train installs its own SIGINT handler, which
    aborts the workers without a save and exits 0; here the main thread keeps ours (_StopOnSignals)."""
    outcome: dict = {}

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="lamscale-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # wakes for signal handlers
    if "error" in outcome:
        raise outcome["error"]


class _StopOnSignals:
    """SIGTERM or Ctrl-C (SIGINT): save at the next step boundary, then exit (Ctrl-C: with status 130).
    A second Ctrl-C aborts at once, without the save."""

    def __init__(self, run_url: str):
        self.run_url, self.interrupted, self.previous = run_url, False, {}

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # a sweep's trial runs in a Tune thread: the sweep's driver owns the signals
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        print(f"[lamscale] {name}: saving at the next step boundary, then exiting{again}", flush=True)
        request_stop(self.run_url)


class RunFailed(RuntimeError):
    """Training stopped on an error the workers could not recover from (one line for the user)."""


class Interrupted(RuntimeError):
    """Ctrl-C stopped the run after saving (the driver already said how to resume); exit status 130."""


def _first_cause(failures: dict) -> tuple[int, str]:
    """The root error of the lowest failed rank, as its last `SomethingError: message` line."""
    rank = min(failures)
    lines = [line.strip() for line in str(failures[rank]).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return rank, (errors or lines or [type(failures[rank]).__name__])[-1]


def load_run_config(run: str, overrides: list[str], may_change: tuple[str, ...] | None = None) -> Config:
    """The saved config of run folder / URL `run`, with its storage and name pointing at it. With
    `may_change` (eval), an override of any other key is refused: the checkpoints could not take it."""
    from lamscale.config import load_config

    run_url = storage.normalize(run)
    saved = storage.join(run_url, "config.yaml")
    if not storage.exists(saved):
        raise ConfigError(f"{run}: not a lamscale run (no config.yaml)")
    parent, name = run_url.rsplit("/", 1)
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"lamscale-resume-{os.getpid()}.yaml"
    stored = storage.read_bytes(saved)
    local.write_bytes(stored)
    try:
        cfg = load_config(local, [*overrides, f"run.storage={parent}", f"run.name={name}"])
    finally:
        local.unlink(missing_ok=True)
    changes = resume_changes(yaml.safe_load(stored) or {}, cfg, may_change) if may_change else []
    if changes:
        raise ConfigError(f"{run}: its checkpoints cannot be evaluated under these changes: {'; '.join(changes)} "
                          "(eval may change task.*, data.*, the backend and where it runs)")
    return cfg
