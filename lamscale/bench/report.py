"""Write a benchmark's JSON, markdown table and a PNG plot of time and memory against N."""
from __future__ import annotations

import json
import os


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["case"] for r in results["rows"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [r for r in results["rows"] if r["case"] == name and "ms" in r]
        if rows:
            ax_t.plot([r["N"] for r in rows], [r["ms"] for r in rows], marker="o", label=name)
            ax_m.plot([r["N"] for r in rows], [r["peak_mib"] for r in rows], marker="o", label=name)
    for ax, label in ((ax_t, results.get("time_label", "fwd+bwd time (ms)")), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    env = results["env"]
    fig.suptitle(f"lamscale bench {results['kind']} — {env['card']} ({env['device']}), torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, prefix: str) -> list[str]:
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(results, f, indent=2)
    env = results["env"]
    header = (f"lamscale bench {results['kind']} on {env['card']} ({env['device']}, {env['threads']} threads), "
              f"torch {env['torch']}, {env['date']}; settings {json.dumps(results['settings'])}\n\n")
    with open(prefix + ".md", "w") as f:
        f.write(header + results["table"] + "\n")
    plot(results, prefix + ".png")
    return [prefix + ext for ext in (".json", ".md", ".png")]
