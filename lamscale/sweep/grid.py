"""The sweep's grid → trials: every grid point × seed, each a normal run config.

`variant` names the paper's ablation:
    vanilla          no LAM (model.lam.layers=none)
    vanilla+params   vanilla plus a per-layer MLP branch with as many parameters as lam-all's generators
                     (model.extra_mlp, sized here: the reviewers' parameter-matched control)
    lam-first        LAM in the first layer only (the paper's single-layer LAM)
    lam-all          LAM in every layer (multi-layer LAM)
`combine` and `heads` are short for model.lam.combine / model.lam.heads; any other key is a dotted config
key. LAM-only keys mean nothing to the vanilla variants: those trials drop them and are not repeated.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from lamscale.config import Config, ConfigError, load_config

VARIANTS = {"vanilla": ["model.lam.layers=none"], "vanilla+params": ["model.lam.layers=none"],
            "lam-first": ["model.lam.layers=first"], "lam-all": ["model.lam.layers=all"]}
ALIASES = {"combine": "model.lam.combine", "heads": "model.lam.heads"}
VANILLA = ("vanilla", "vanilla+params")


@dataclass
class Trial:
    name: str  # the run's name under the sweep folder
    point: dict[str, str]  # grid key → value (variant included)
    seed: int
    overrides: list[str] = field(default_factory=list)  # config overrides, in order

    @property
    def variant(self) -> str:
        return self.point.get("variant", "config")


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` specs → {key: values}, in the order given; one clear line for a malformed one."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise ConfigError(f"--grid {spec!r}: expected key=value1,value2,…")
        key = key.strip()
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list every value in one --grid")
        if key == "variant":
            unknown = [v for v in items if v not in VARIANTS]
            if unknown:
                raise ConfigError(f"--grid variant: unknown {unknown}; expected some of {list(VARIANTS)}")
        grid[key] = items
    return grid


def _lam_only(key: str) -> bool:
    return ALIASES.get(key, key).startswith("model.lam.")


def _short(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", value.replace("+", "-plus-")).strip("-") or "x"


def trials(grid: dict[str, list[str]], seeds: int) -> list[Trial]:
    """Every grid point × seed 0..seeds-1 (vanilla variants without the LAM-only keys, once each)."""
    keys = list(grid)
    out, seen = [], set()
    for values in itertools.product(*grid.values()):
        point = dict(zip(keys, values))
        if point.get("variant") in VANILLA:
            point = {k: v for k, v in point.items() if not _lam_only(k)}
        for seed in range(seeds):
            ident = (tuple(sorted(point.items())), seed)
            if ident in seen:
                continue
            seen.add(ident)
            name = "_".join(([_short(point["variant"])] if "variant" in point else [])
                            + [f"{k.rsplit('.', 1)[-1]}-{_short(v)}" for k, v in point.items() if k != "variant"]
                            + [f"seed{seed}"])
            overrides = [*VARIANTS.get(point.get("variant", ""), [])]
            overrides += [f"{ALIASES.get(k, k)}={v}" for k, v in point.items() if k != "variant"]
            out.append(Trial(name, point, seed, [*overrides, f"train.seed={seed}"]))
    return out


def parameter_count(cfg: Config) -> int:
    import torch

    from lamscale.tasks import get_task

    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in get_task(cfg).build_model().parameters())


def matched_extra_mlp(config: str, base: list[str], trial: Trial) -> int:
    """The model.extra_mlp width whose parameters come closest to lam-all's generators, per layer."""
    lam_all = load_config(config, [*base, *[o for o in trial.overrides if o != "model.lam.layers=none"],
                                   "model.lam.layers=all"])
    vanilla = load_config(config, [*base, *trial.overrides])
    extra = (parameter_count(lam_all) - parameter_count(vanilla)) / vanilla.model.layers
    dim = vanilla.model.dim
    return max(1, round((extra - dim) / (2 * dim + 1)))  # dim→h→dim: h·dim + h + h·dim + dim parameters


def trial_configs(config: str, base: list[str], grid_trials: list[Trial], storage: str) -> dict[str, Config]:
    """Each trial's validated config (its run under `storage`); vanilla+params gets its matched width."""
    configs = {}
    for t in grid_trials:
        if t.variant == "vanilla+params":
            t.overrides.append(f"model.extra_mlp={matched_extra_mlp(config, base, t)}")
        try:
            configs[t.name] = load_config(config, [*base, *t.overrides, f"run.storage={storage}", f"run.name={t.name}"])
        except ConfigError as e:
            raise ConfigError(f"sweep trial {t.name}: {e}") from None
    return configs
