"""What runs a storage folder (or s3:// prefix) holds: newest committed step, last eval metrics, state.

A run is a sub-folder with the config.yaml `lamscale train` writes before training; its steps come from
the checkpoints' commit markers, so a save that was killed never counts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import yaml

from lamscale import storage
from lamscale.cluster.lease import lease_state
from lamscale.train.commits import committed_steps
from lamscale.train.preempt import STOP_FILE

SHOWN_METRICS = ("MR-full-mAP", "HL-min-VeryGood-mAP")
FAILED_FILE = "FAILED.json"  # the last driver on the run ended in an error (removed when one starts again)


def mark_failed(run_url: str, error: str) -> None:
    """Record that the driver ended in `error`; never raises (it runs on the way out of a failure)."""
    url = storage.join(run_url, FAILED_FILE)
    fs, path = storage.fs_for(url)
    data = json.dumps({"time": time.time(), "error": error}).encode()
    try:
        storage.retry(lambda: fs.pipe_file(path, data), f"write {url}", 5.0)
    except Exception:  # the store is down: the run's own error line says what happened
        pass


def clear_failed(run_url: str) -> None:
    storage.remove_file(storage.join(run_url, FAILED_FILE), missing_ok=True)


@dataclass
class RunSummary:
    name: str
    url: str
    step: int | None  # newest committed checkpoint
    max_steps: int | None
    eval_step: int | None  # step of metrics_val.json
    metrics: dict[str, float] = field(default_factory=dict)  # metrics_val.json's "brief"
    state: str = "new"  # new | running | stopping | complete | failed | incomplete

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(url: str) -> dict | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def summarize(run_url: str) -> RunSummary:
    """The summary of the run at `run_url` (a folder holding config.yaml)."""
    config = yaml.safe_load(storage.read_bytes(storage.join(run_url, "config.yaml"))) or {}
    max_steps = (config.get("train") or {}).get("max_steps")
    steps = committed_steps(run_url)
    step = steps[-1] if steps else None
    report = _read_json(storage.join(run_url, "metrics_val.json")) or {}
    eval_step = report.get("step")
    if storage.exists(storage.join(run_url, STOP_FILE)):
        state = "stopping"
    elif lease_state(run_url):
        state = "running"
    elif step is not None and max_steps is not None and step >= max_steps and eval_step == step:
        state = "complete"
    elif storage.exists(storage.join(run_url, FAILED_FILE)):
        state = "failed"
    else:
        state = "incomplete" if step is not None else "new"
    return RunSummary(run_url.rstrip("/").rsplit("/", 1)[-1], run_url, step, max_steps, eval_step,
                      report.get("brief", {}), state)


def list_runs(storage_url: str) -> list[RunSummary]:
    """Every run directly under `storage_url` (or the run `storage_url` itself), sorted by name."""
    root = storage.normalize(storage_url)
    try:
        fs, path = storage.fs_for(root)
        fs.invalidate_cache()  # object-store listings are cached per process
        if storage.exists(storage.join(root, "config.yaml")):
            return [summarize(root)]
        if not fs.isdir(path):
            raise storage.StorageError(f"{storage_url}: no such folder or prefix")
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True)
                 if e.get("type") == "directory"]
        urls = [storage.join(root, name) for name in names]
        return sorted((summarize(u) for u in urls if storage.exists(storage.join(u, "config.yaml"))),
                      key=lambda r: r.name)
    except storage.StorageError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, unreadable file…
        text = str(e).strip().splitlines()
        raise storage.StorageError(f"{storage_url}: {type(e).__name__}: {text[0] if text else ''}") from None


def format_runs(runs: list[RunSummary]) -> str:
    """A fixed-width table, one run per line."""
    header = ["RUN", "STEP", "STATE", "EVAL@", *SHOWN_METRICS, "URL"]
    rows = [header]
    for r in runs:
        step = "-" if r.step is None else str(r.step)
        rows.append([r.name, f"{step}/{r.max_steps if r.max_steps is not None else '?'}", r.state,
                     "-" if r.eval_step is None else str(r.eval_step),
                     *(f"{r.metrics[m]:.2f}" if m in r.metrics else "-" for m in SHOWN_METRICS), r.url])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]) for row in rows)
