"""Run configuration: dataclasses loaded from YAML, with dotted `key=value` overrides.

Everything is validated here, in the driver, before Ray or any worker starts: an unknown key, a
value of the wrong type or outside its choices raises `ConfigError` with one line naming it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lamscale.tasks.settings import (TASK_CONFIGS, CaptioningConfig, ClassificationConfig, GroundingConfig,  # noqa: F401
                                     MomentRetrievalConfig, TaskConfig)


class ConfigError(ValueError):
    """Bad configuration; the message is one line naming the file/key/value."""


@dataclass
class LAMConfig:
    """Learnable Attention Mask (DESIGN.md §1)."""

    layers: Union[Literal["all", "first", "none"], list[int]] = "all"
    combine: Literal["mul", "add"] = "mul"
    heads: Literal["shared", "per_head"] = "shared"
    key: Literal["position", "token"] = "position"
    bound: Literal["none", "sigmoid"] = "none"
    rank: int = 16  # r: rank of the mask M = H G^T + 1 c^T
    hidden: int = 64  # r1: width of the generator MLP
    max_len: int = 512  # N_max for key=position
    backend: Literal["auto", "dense", "chunked", "cpp", "sdpa", "triton"] = "chunked"
    block: int = 128  # query block of the chunked backend; caps the cpp kernel's tile (≤ 128 rows × 4·rows keys)


@dataclass
class ModelConfig:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    video_dim: int = 64
    text_dim: int = 32
    audio_dim: int = 0  # > 0: an audio modality (T×audio_dim features, time-aligned like frames; captioning)
    max_clips: int = 75
    max_text: int = 32
    checkpointing: bool = True  # activation checkpointing per layer (non-reentrant)
    # how a frame knows its time: a learned table of max_clips positions ("table"), or a depthwise
    # temporal convolution over neighbouring frames ("conv": translation-invariant, any length — what
    # training on windows and evaluating on whole movies needs)
    time_embedding: Literal["table", "conv"] = "table"
    time_kernel: int = 9  # frames the "conv" time embedding sees (odd)
    # > 0: each layer gets a per-token MLP branch (dim → extra_mlp → dim) beside attention: a vanilla model
    # with as many extra parameters as LAM's generators (`lamscale sweep` variant vanilla+params sets it)
    extra_mlp: int = 0
    lam: LAMConfig = field(default_factory=LAMConfig)


@dataclass
class DataConfig:
    train: str = "shards/tiny/train-{000000..000003}.tar"
    val: str = "shards/tiny/val-{000000..000000}.tar"
    batch_size: int = 16  # per worker
    shuffle_buffer: int = 256
    clip_len: float = 2.0  # seconds per clip
    workers: int = 0  # DataLoader processes per rank; 0 reads in the training process (the same batches as 1)
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt sample or cut shard: stop naming it, or skip and count it
    allow_pipe: bool = False  # `pipe:CMD` shard URLs run shell commands: refused unless allowed
    token_budget: int = 0  # > 0: length-bucketed batches of at most this many padded tokens (replaces batch_size)
    bucket_pool: int = 1024  # samples sorted into length buckets at a time (token_budget > 0)
    window: int = 0  # > 0: train on random windows of this many clips holding a target moment (eval: full length)
    read_retry_s: float = 120.0  # a remote shard read retries with backoff this long before failing
    read_block_kib: int = 8192  # bytes per remote range request
    truncate: bool = False  # a sample longer than model.max_clips/max_text: error naming it (false), or cut and count it


@dataclass
class TrainConfig:
    max_steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1
    zero_stage: int = 2
    zero3_param_persistence: int = 100_000  # ZeRO-3 keeps parameters under this many elements whole on every rank
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 50
    keep_last: int = 2
    mask_images: bool = True


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str = ""  # empty: start Ray in-process; else an existing cluster ("auto", "ray://…")
    max_failures: int = 0


@dataclass
class RunConfig:
    name: str = ""  # defaults to the config file's stem
    storage: str = "runs/"  # local folder, file://… or s3://bucket/prefix


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=MomentRetrievalConfig)  # task.name picks the dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading -----------------------------------------------------------------------------------

_FLOAT_TEXT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.?(?:inf|nan)$", re.I)


class _OverrideLoader(yaml.SafeLoader):
    """YAML for one `key=value` override, where only plain decimals are integers: YAML 1.1 reads
    0x10, 010, 0b11, 1_000 and 1:30 as 16, 8, 3, 1000 and 90, which a command line never means."""


_OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                      list("-+0123456789"))
_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{key}: expected one of {list(typing.get_args(hint))}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{key}: expected {' or '.join(errors)}".replace("expected expected", "expected"))
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a decimal integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):  # YAML 1.1 reads "3e-4" as a string
            number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # a nan lr or an inf rate only fails deep inside the workers
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, data: Any, prefix: str, raw: dict[str, str] | None = None) -> Any:
    """`data` as dataclass `cls`; `raw` maps overridden keys to their text (a string key keeps it as typed)."""
    raw = raw or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{full}' (known under '{prefix or '<top>'}': {', '.join(names)})")
        hint = hints[key]
        if hint is TaskConfig:  # each task has its own dataclass, picked by task.name
            hint = _task_config_class(value, full)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full, raw)
        elif hint is str and full in raw:  # run.name=2024 is a name, not a number
            kwargs[key] = raw[full]
        else:
            kwargs[key] = _check_value(full, value, hint)
    return cls(**kwargs)


def _task_config_class(section: Any, prefix: str) -> type:
    name = section.get("name", "moment_retrieval") if isinstance(section, dict) else None
    if name not in TASK_CONFIGS:
        raise ConfigError(f"{prefix}.name: unknown task {name!r}; expected one of {sorted(TASK_CONFIGS)}")
    return TASK_CONFIGS[name]


def _apply_override(tree: dict, item: str, raw_values: dict[str, str]) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: not a valid value ({str(e).splitlines()[0]})") from None
    raw_values[key.strip()] = raw
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = value


def _check_ranges(checks: dict[str, tuple[Any, str]]) -> None:
    """`checks`: key -> (value, range) with range one of '>0', '>=0', '>=-1', '[0,1]', '[0,1)', '(0,1]'."""
    tests = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=-1": lambda v: v >= -1,
             "[0,1]": lambda v: 0 <= v <= 1, "[0,1)": lambda v: 0 <= v < 1, "(0,1]": lambda v: 0 < v <= 1}
    words = {">0": "a positive value", ">=0": "0 or more", ">=-1": "-1 (unlimited) or more",
             "[0,1]": "a value in [0, 1]", "[0,1)": "a value in [0, 1)", "(0,1]": "a value in (0, 1]"}
    for key, (value, rng) in checks.items():
        if not tests[rng](value):
            raise ConfigError(f"{key}: expected {words[rng]}, got {value}")


def validate(cfg: Config) -> None:
    """Value ranges and cross-field checks that types alone cannot express."""
    m, lam, t, c, task = cfg.model, cfg.model.lam, cfg.train, cfg.cluster, cfg.task
    _validate_name(cfg.run.name)
    _check_ranges({
        "model.dim": (m.dim, ">0"), "model.layers": (m.layers, ">0"), "model.heads": (m.heads, ">0"),
        "model.ffn_mult": (m.ffn_mult, ">0"), "model.dropout": (m.dropout, "[0,1)"),
        "model.video_dim": (m.video_dim, ">0"), "model.text_dim": (m.text_dim, ">0"),
        "model.max_clips": (m.max_clips, ">0"), "model.max_text": (m.max_text, ">0"),
        "model.audio_dim": (m.audio_dim, ">=0"), "model.extra_mlp": (m.extra_mlp, ">=0"),
        "model.lam.rank": (lam.rank, ">0"), "model.lam.hidden": (lam.hidden, ">0"),
        "model.lam.max_len": (lam.max_len, ">0"), "model.lam.block": (lam.block, ">0"),
        "data.batch_size": (cfg.data.batch_size, ">0"), "data.clip_len": (cfg.data.clip_len, ">0"),
        "train.max_steps": (t.max_steps, ">0"), "train.lr": (t.lr, ">0"), "train.weight_decay": (t.weight_decay, ">=0"),
        "train.warmup_steps": (t.warmup_steps, ">=0"), "train.min_lr_ratio": (t.min_lr_ratio, "[0,1]"),
        "train.grad_clip": (t.grad_clip, ">=0"), "train.grad_accum": (t.grad_accum, ">0"), "train.seed": (t.seed, ">=0"),
        "train.log_every": (t.log_every, ">0"), "train.eval_every": (t.eval_every, ">0"),
        "train.ckpt_every": (t.ckpt_every, ">0"), "train.keep_last": (t.keep_last, ">0"),
        "cluster.num_workers": (c.num_workers, ">0"), "cluster.cpus_per_worker": (c.cpus_per_worker, ">0"),
        "cluster.max_failures": (c.max_failures, ">=-1"),
    })
    if m.dim % m.heads:
        raise ConfigError(f"model.dim: {m.dim} is not divisible by model.heads={m.heads}")
    if m.time_kernel < 1 or m.time_kernel % 2 == 0:
        raise ConfigError(f"model.time_kernel: expected an odd number of frames ≥ 1, got {m.time_kernel}")
    if t.zero3_param_persistence < 0:
        raise ConfigError(f"train.zero3_param_persistence: expected 0 or more elements, got {t.zero3_param_persistence}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: expected 0, 1, 2 or 3, got {t.zero_stage}")
    task.validate(cfg)
    if isinstance(lam.layers, list):
        if not lam.layers:  # an empty list silently trained the baseline
            raise ConfigError("model.lam.layers: [] puts the mask in no layer; write `none` for the baseline "
                              "without masks, or list layer indices")
        bad = [i for i in lam.layers if not 0 <= i < m.layers]
        if bad:
            raise ConfigError(f"model.lam.layers: layer indices {bad} outside 0..{m.layers - 1}")
        twice = sorted({i for i in lam.layers if lam.layers.count(i) > 1})
        if twice:
            raise ConfigError(f"model.lam.layers: layer index {', '.join(map(str, twice))} listed twice in {lam.layers}")
    _validate_backend(cfg)
    _validate_data(cfg)


def _validate_name(name: str) -> None:
    """A run name is one folder under run.storage: no path, nothing hidden, nothing `lamscale runs` cannot list."""
    if (not name or name.startswith(".") or any(ch in name for ch in "/\\") or not name.isprintable()
            or name != name.strip() or os.path.isabs(name)):
        raise ConfigError(f"run.name: {name!r} is not a plain folder name (letters, digits, '-', '_', '.'; "
                          f"no '/', not starting with '.')")


def _validate_backend(cfg: Config) -> None:
    """An attention backend that cannot run on the workers' device fails here, not in every worker."""
    lam, gpu = cfg.model.lam, cfg.cluster.use_gpu
    if lam.backend == "cpp" and gpu:
        raise ConfigError("model.lam.backend: cpp is the CPU kernel, but cluster.use_gpu=true; "
                          "use triton, chunked or auto on GPUs")
    if lam.backend == "triton" and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.lam.backend: triton needs CUDA GPUs (cluster.use_gpu=true); use cpp, chunked "
                          "or auto on CPUs (or set TRITON_INTERPRET=1 to run the kernels in the interpreter)")
    if lam.backend == "sdpa" and lam.layers != "none" and (lam.combine != "add" or lam.bound != "none"):
        raise ConfigError(f"model.lam.backend: sdpa computes combine=add with bound=none only, not "
                          f"combine={lam.combine} bound={lam.bound}; use auto, chunked, cpp (CPU) or triton (GPU)")


def _validate_data(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    for key, value in {"data.bucket_pool": d.bucket_pool, "data.read_block_kib": d.read_block_kib,
                       "data.shuffle_buffer": d.shuffle_buffer}.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive value, got {value}")
    for key, value in {"data.workers": d.workers, "data.token_budget": d.token_budget, "data.window": d.window,
                       "data.read_retry_s": d.read_retry_s}.items():
        if value < 0:
            raise ConfigError(f"{key}: expected 0 or more, got {value}")
    if 0 < d.token_budget < m.max_clips + m.max_text:
        raise ConfigError(f"data.token_budget: {d.token_budget} cannot hold one sample of up to "
                          f"{m.max_clips + m.max_text} tokens (model.max_clips + model.max_text)")
    if d.window > m.max_clips:
        raise ConfigError(f"data.window: {d.window} clips is more than model.max_clips={m.max_clips}")
    for key, pattern in (("data.train", d.train), ("data.val", d.val)):
        if re.search(r"(^|[\s,])pipe:", pattern) and not d.allow_pipe:
            raise ConfigError(f"{key}: {pattern.strip()!r} is a pipe: URL, which runs a shell command; "
                              f"set data.allow_pipe=true to allow it")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load YAML `path` (None: all defaults), apply `overrides`, validate."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw: dict[str, str] = {}
    for item in overrides:
        _apply_override(tree, item, raw)
    try:
        cfg = _build(Config, tree, "", raw)
        if cfg.run.name == "" and "name" in (tree.get("run") or {}):  # `run.name=$UNSET` should not pick a run
            raise ConfigError("run.name: empty; give a name, or leave run.name out to use the config file's name")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path is not None else "default"
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. inside a Ray worker)."""
    return _build(Config, data, "")


# Keys a resumed run may change: cadence, the schedule's end, where and how it runs. Everything else
# (model shape, data layout and order, optimiser, seed, workers) must match the checkpoint it resumes.
RESUME_MAY_CHANGE = (
    "run.", "train.max_steps", "train.min_lr_ratio", "train.eval_every", "train.ckpt_every", "train.log_every",
    "train.keep_last", "train.mask_images", "cluster.address", "cluster.max_failures", "cluster.cpus_per_worker",
    "cluster.use_gpu", "model.checkpointing", "model.lam.backend", "model.lam.block", "data.val", "data.on_error",
    "data.allow_pipe", "data.read_retry_s", "data.read_block_kib", "data.truncate",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Keys `lamscale eval` may change besides those: how a checkpoint is decoded and read (beam size, eval batch,
# length buckets).
EVAL_MAY_CHANGE = (*RESUME_MAY_CHANGE, "task.", "data.")
# Fixed whatever the prefixes above allow: the task's name picks the head the checkpoint holds.
NEVER_CHANGES = ("task.name",)


def resume_changes(stored: dict, cfg: Config, may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """`key: old -> new` for each key that differs from the run's stored config and cannot change on resume
    (or under `may_change`, for eval). Keys the stored config lacks (added since) or no longer known are not
    compared."""
    old, new = _flatten(stored), _flatten(cfg.to_dict())
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key in old and old[key] != new[key] and (not key.startswith(may_change) or key in NEVER_CHANGES)]
