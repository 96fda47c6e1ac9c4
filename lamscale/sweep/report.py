"""A sweep's results, from its trials' own run folders (metrics_val.json is the truth, not Tune's records):
`sweep.json`, `sweep.md` (per variant: each headline metric as mean ± std over seeds, parameters, and the
paired difference to vanilla over the same seeds with a 95 % bootstrap interval), `sweep.png` (points per
seed, mean and interval) and TensorBoard HParams entries under `<sweep>/hparams`, so the HParams tab
compares the trials.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass

from lamscale import storage
from lamscale.cluster.runs import summarize
from lamscale.config import load_config
from lamscale.sweep.grid import parameter_count
from lamscale.sweep.stats import bootstrap_ci, mean_std
from lamscale.sweep.tune import PLAN_FILE


@dataclass
class TrialResult:
    name: str
    point: dict
    seed: int
    state: str
    step: int | None
    params: int
    metrics: dict  # brief metrics of the final eval ({} until complete)


def _group(point: dict) -> str:
    """A table row: the grid point without its seed (variant first)."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "config"


def _baseline_key(point: dict) -> tuple:
    """What pairs a trial with its vanilla trial: the grid keys that are not about LAM (and the seed)."""
    return tuple(sorted((k, v) for k, v in point.items() if k not in ("variant", "combine", "heads")
                        and not k.startswith("model.lam.")))


def collect(url: str) -> tuple[dict, list[TrialResult]]:
    plan = json.loads(storage.read_bytes(storage.join(url, PLAN_FILE)))
    results = []
    for t in plan["trials"]:
        run_url = storage.join(url, t["name"])
        cfg = load_config(plan["config"], [*plan["overrides"], *t["overrides"]])
        summary = summarize(run_url) if storage.exists(storage.join(run_url, "config.yaml")) else None
        state = summary.state if summary else "new"
        metrics = summary.metrics if summary and state == "complete" else {}
        results.append(TrialResult(t["name"], t["point"], t["seed"], state, summary.step if summary else None,
                                   parameter_count(cfg), metrics))
    return plan, results


def summarize_sweep(plan: dict, results: list[TrialResult], headline: list[str]) -> list[dict]:
    """One row per grid point: mean ± std of each headline metric over its complete seeds, and the paired
    difference to vanilla (same seed, same non-LAM keys) with a 95 % bootstrap interval."""
    rows, by_group = [], defaultdict(list)
    for r in results:
        by_group[_group(r.point)].append(r)
    vanilla = {(_baseline_key(r.point), r.seed): r for r in results if r.point.get("variant") == "vanilla" and r.metrics}
    for group, members in by_group.items():
        done = [m for m in members if m.metrics]
        row = {"group": group, "point": members[0].point, "params": members[0].params, "seeds": [m.seed for m in done],
               "trials": len(members), "complete": len(done), "metrics": {}}
        for key in headline:
            values = [m.metrics[key] for m in done if key in m.metrics]
            if not values:
                continue
            mean, std = mean_std(values)
            entry = {"values": values, "mean": mean, "std": std, "ci95": list(bootstrap_ci(values))}
            pairs = [(m.metrics[key], vanilla[(_baseline_key(m.point), m.seed)].metrics[key]) for m in done
                     if (_baseline_key(m.point), m.seed) in vanilla and m.point.get("variant") != "vanilla"]
            if pairs:
                diffs = [a - b for a, b in pairs]
                entry["vs_vanilla"] = {"mean": mean_std(diffs)[0], "ci95": list(bootstrap_ci(diffs)), "pairs": len(diffs)}
            row["metrics"][key] = entry
        rows.append(row)
    return rows


def markdown(rows: list[dict], headline: list[str], plan: dict) -> str:
    cols = " | ".join(f"{k} (mean ± std) | Δ vs vanilla [95 % CI]" for k in headline)
    lines = [f"Sweep of `{plan['config']}` {' '.join(plan['overrides'])}: seeds 0..{plan['seeds'] - 1}, "
             f"grid {json.dumps(plan['grid'])}", "", f"| trial group | params | seeds | {cols} |",
             "|" + "---|" * (3 + 2 * len(headline))]
    for row in rows:
        cells = []
        for key in headline:
            m = row["metrics"].get(key)
            if m is None:
                cells += ["—", "—"]
                continue
            cells.append(f"{m['mean']:.2f} ± {m['std']:.2f}")
            d = m.get("vs_vanilla")
            cells.append(f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "—")
        lines.append(f"| {row['group']} | {row['params']:,} | {row['complete']}/{row['trials']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], key: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.6))
    for x, row in enumerate(rows):
        m = row["metrics"].get(key)
        if not m:
            continue
        ax.scatter([x + 0.08 * (i - (len(m["values"]) - 1) / 2) for i in range(len(m["values"]))], m["values"],
                   s=18, color="tab:gray", zorder=2, label="a seed" if x == 0 else None)
        lo, hi = m["ci95"]
        ax.errorbar([x + 0.3], [m["mean"]], yerr=[[m["mean"] - lo], [hi - m["mean"]]], fmt="o", color="tab:blue",
                    capsize=4, zorder=3, label="mean, 95 % bootstrap CI" if x == 0 else None)
    ax.set_xticks(range(len(rows)), [r["group"].replace(", ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel(key)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hparams(url: str, results: list[TrialResult], headline: list[str]) -> None:
    """One HParams session per complete trial (the grid point, seed and parameter count → its headline metrics)."""
    from torch.utils.tensorboard import SummaryWriter

    root = f"{storage.local_path(url)}/hparams"
    shutil.rmtree(root, ignore_errors=True)  # rewritten whole: no duplicate sessions
    for r in results:
        if not r.metrics:
            continue
        with SummaryWriter(f"{root}/{r.name}") as writer:
            writer.add_hparams({**{k: str(v) for k, v in r.point.items()}, "seed": r.seed, "params": r.params},
                               {f"hparam/{k}": float(r.metrics[k]) for k in headline if k in r.metrics}, run_name=".")


def write_results(url: str) -> dict:
    """sweep.json, sweep.md, sweep.png and the HParams entries of the sweep at `url`; returns sweep.json."""
    from lamscale.tasks import get_task

    plan, results = collect(url)
    task = get_task(load_config(plan["config"], plan["overrides"]))
    headline = list(dict.fromkeys([task.primary, *task.headline()]))
    rows = summarize_sweep(plan, results, headline)
    report = {"config": plan["config"], "overrides": plan["overrides"], "grid": plan["grid"], "seeds": plan["seeds"],
              "primary": task.primary, "headline": headline, "rows": rows,
              "trials": [vars(r) for r in results]}
    storage.write_bytes(storage.join(url, "sweep.json"), json.dumps(report, indent=2).encode())
    storage.write_bytes(storage.join(url, "sweep.md"), markdown(rows, headline, plan).encode())
    plot(rows, task.primary, f"{storage.local_path(url)}/sweep.png")
    hparams(url, results, headline)
    return report


def status_lines(url: str) -> list[str]:
    """`lamscale sweep --status`: one line per trial (state, step, final metrics)."""
    _, results = collect(url)
    lines = [f"{'trial':<40} {'state':<11} {'step':>6}  metrics"]
    for r in results:
        brief = ", ".join(f"{k} {v:.2f}" for k, v in r.metrics.items())
        lines.append(f"{r.name:<40} {r.state:<11} {'' if r.step is None else r.step:>6}  {brief}")
    return lines
