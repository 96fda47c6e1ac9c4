"""`lamscale plot`: scalar curves of one or more runs (TensorBoard events) into one PNG.

    lamscale plot runs/fashion_mnist --tag val/top1 --x minutes --out docs/fashion_mnist_top1.png

The x axis is the step, or the minutes since the run's first logged step (wall time: what a budget is counted in).
"""
from __future__ import annotations

import json
from pathlib import Path


def load_events(run: str):
    """The run's TensorBoard scalars (an EventAccumulator, loaded); one line if it has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lamscale import storage

    tb = f"{str(run).rstrip('/')}/tb"
    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    if storage.exists(tb):  # the accumulator raises its own multi-line error on a missing folder
        acc.Reload()
    if not acc.Tags().get("scalars"):
        raise FileNotFoundError(f"{run}: no TensorBoard scalars under {tb}")
    return acc


def read_scalars(run: str, tag: str, acc=None) -> list[tuple[int, float, float]]:
    """[(step, wall_time, value)] of one tag, oldest first; a resumed run's rewritten steps keep the newest."""
    acc = acc or load_events(run)
    tags = acc.Tags()["scalars"]
    if tag not in tags:
        raise ValueError(f"{run}: no scalar {tag!r}; it has {', '.join(sorted(tags))}")
    by_step = {e.step: (e.step, e.wall_time, e.value) for e in acc.Scalars(tag)}
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(runs: list[str], tags: list[str], out: str, x: str = "step") -> dict:
    """One panel per tag, one line per run; writes `out` (PNG) and `out` with .json (the plotted points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "minutes"):
        raise ValueError(f"--x: expected step or minutes, got {x!r}")
    data: dict = {}
    for run in runs:
        acc = load_events(run)
        start = min(e.wall_time for t in acc.Tags()["scalars"] for e in acc.Scalars(t))  # its first logged step
        for tag in tags:
            points = read_scalars(run, tag, acc)
            xs = [s if x == "step" else round((w - start) / 60, 3) for s, w, _ in points]
            data.setdefault(tag, {})[run] = {"x": xs, "y": [round(v, 4) for _, _, v in points]}  # float32 in the events
    fig, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags), 3.8), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for run, series in data[tag].items():
            ax.plot(series["x"], series["y"], marker="o", markersize=3, label=Path(run).name)
            ax.annotate(f"{series['y'][-1]:.2f}", (series["x"][-1], series["y"][-1]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
        ax.set_xlabel("step" if x == "step" else "minutes since the first logged step")
        ax.set_title(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    Path(out).with_suffix(".json").write_text(json.dumps({"x": x, "curves": data}, indent=1) + "\n")
    return data

