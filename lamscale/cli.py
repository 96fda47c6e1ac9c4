"""`lamscale` command line: train, resume, metrics, shards, jobs (submit/status/logs/stop/runs), bench."""
from __future__ import annotations

import argparse
import json
import sys

from lamscale import storage
from lamscale.cluster import jobs_cli
from lamscale.config import ConfigError, load_config
from lamscale.data import shards_cli
from lamscale.storage import StorageError


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config is one line before torch or Ray loads
    from lamscale.cluster.launch import train

    train(cfg, args.address)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.status:
        from lamscale.sweep.report import status_lines

        url = args.status if storage.exists(storage.join(storage.normalize(args.status), "sweep_plan.json")) \
            else storage.join(storage.normalize("runs"), args.status)
        if not storage.exists(storage.join(url, "sweep_plan.json")):
            raise FileNotFoundError(f"--status {args.status}: no sweep there (no sweep_plan.json in {url})")
        print("\n".join(status_lines(url)))
        return 0
    if not args.config or not args.grid:
        raise ValueError("sweep: give CONFIG and at least one --grid key=v1,v2 (or --status NAME)")
    from lamscale.sweep.tune import run_sweep

    url = run_sweep(args.config, args.grid, args.seeds, args.name, args.overrides, args.address, args.max_concurrent)
    print(storage.read_bytes(storage.join(url, "sweep.md")).decode(), flush=True)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from lamscale.cluster.launch import load_run_config, train

    train(load_run_config(args.run, args.overrides), args.address)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lamscale.cluster.launch import evaluate

    evaluate(args.run, args.step, args.data, args.split, args.address, args.overrides)
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    if args.dataset == "mad":
        return _cmd_metrics_mad(args)
    if args.dataset == "captioning":
        return _cmd_metrics_captioning(args)
    if args.convention:
        raise ValueError("--convention is for 'metrics mad'; QVHighlights has one official evaluation")
    from lamscale.tasks.qvhighlights_metrics import evaluate, load_jsonl

    result = evaluate(load_jsonl(args.preds), load_jsonl(args.gt), match_number=not args.subset)
    print(json.dumps(result, indent=4))
    return 0


def _cmd_metrics_mad(args: argparse.Namespace) -> int:
    from lamscale.tasks.mad_metrics import evaluate, evaluate_both, load_jsonl

    if args.subset:
        raise ValueError("--subset is for 'metrics qvhighlights'; MAD scores every ground-truth query")
    preds, gt = load_jsonl(args.preds, "predictions"), load_jsonl(args.gt, "truths")
    names = (args.preds, args.gt)
    result = ({args.convention: evaluate(preds, gt, args.convention, names)} if args.convention
              else evaluate_both(preds, gt, names))
    print(json.dumps(result, indent=4))
    return 0


def _cmd_metrics_captioning(args: argparse.Namespace) -> int:
    from lamscale.tasks.caption_metrics import evaluate, load_predictions, load_truths, require_java

    if args.subset or args.convention:
        raise ValueError("--subset and --convention are for 'metrics qvhighlights' and 'metrics mad'; "
                         "captioning scores every ground-truth video")
    preds, gt = load_predictions(args.preds), load_truths(args.gt)
    try:
        require_java()
    except RuntimeError as e:  # a missing tool, reported like bad input: one line, exit 2
        raise ValueError(str(e)) from None
    print(json.dumps(evaluate(preds, gt, names=(args.preds, args.gt)), indent=4))
    return 0


def _cmd_shards_sample(args: argparse.Namespace) -> int:
    from lamscale.data.sample import build_sample

    manifest = build_sample(args.out, args.video_dim, args.text_dim)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards -> {args.out}/{info['pattern']}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from lamscale.train.curves import plot_curves

    data = plot_curves(args.runs, args.tag or ["val/top1"], args.out, args.x)
    for tag, series in data.items():
        for run, points in series.items():
            print(f"{tag} {run}: {len(points['y'])} points, last {points['y'][-1]:.4g} at {args.x} {points['x'][-1]}")
    print(f"wrote {args.out}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _cmd_bench(args: argparse.Namespace) -> int:
    from lamscale.bench.report import write

    device = args.device or ("cuda" if _cuda() else "cpu")
    if args.what == "data":  # loader throughput from a real S3 server: its own options, no time-vs-N plot
        from lamscale.bench.data import run

        return run(_ints(args.workers), args.epochs, args.repeats, args.out or "docs/bench/data_cpu")
    if args.what == "movie":  # one grounding forward over a whole movie per length: time and peak RSS
        from lamscale.bench.movie import bench_movie

        device = "cpu"  # the CPU path in linear memory is what it checks
        results = bench_movie(args.config, _ints(args.lengths) if args.lengths else [9000, 18000, 36000],
                              overrides=tuple(args.overrides))
    elif args.what == "attention":
        from lamscale.bench.attention import CASES, bench_attention

        cases = args.cases.split(",") if args.cases else [c for c in CASES if _runs_on(c, device)]
        lengths = _ints(args.lengths) if args.lengths else ([4096, 8192, 16384, 32768, 65536] if device == "cuda" else [1024, 2048, 4096])
        heads, head_dim = (args.heads or (12 if device == "cuda" else 4)), (args.head_dim or (64 if device == "cuda" else 32))
        results = bench_attention(lengths, cases, device, heads, head_dim, args.rank, args.dtype or ("bfloat16" if device == "cuda" else "float32"), args.block, args.repeats)
    else:
        from lamscale.bench.encoder import VARIANTS, bench_encoder

        variants = args.cases.split(",") if args.cases else [v for v in VARIANTS if _runs_on(v, device)]
        lengths = _ints(args.lengths) if args.lengths else ([8192, 36000] if device == "cuda" else [2048])
        gpu = device == "cuda"
        results = bench_encoder(lengths, variants, device, args.dim or (768 if gpu else 128), args.layers or (12 if gpu else 2),
                                args.heads or (12 if gpu else 4), args.block, args.dtype or ("bfloat16" if gpu else "float32"), args.repeats,
                                args.paired_rounds)
    print(results["table"])
    out = args.out or f"docs/bench/{args.what}_{device}"
    print("wrote " + ", ".join(write(results, out)))
    return 0


def _runs_on(case: str, device: str) -> bool:
    """Triton and FlexAttention cases need a GPU; the C++ kernel is CPU-only."""
    gpu_only = any(word in case for word in ("triton", "flex"))
    return not gpu_only if device == "cpu" else "cpp" not in case


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lamscale", description="Train LAM Transformer encoders on long multimodal sequences.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) the run a config names")
    t.add_argument("config", nargs="?", default="configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    t.add_argument("--address", default="", help="existing Ray cluster (default: start Ray in-process)")
    t.set_defaults(func=_cmd_train)

    sw = sub.add_parser("sweep", help="LAM variants vs baselines over seeds as Ray Tune trials; tables with intervals")
    sw.add_argument("config", nargs="?", default="")
    sw.add_argument("overrides", nargs="*", help="key=value overrides for every trial (right after CONFIG)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid axis (repeatable): variant=vanilla,vanilla+params,lam-first,lam-all, combine=mul,add, "
                         "heads=shared,per_head, or any dotted config key")
    sw.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1 per grid point (train.seed)")
    sw.add_argument("--name", default="", help="the sweep's folder under run.storage (default sweep-<config name>)")
    sw.add_argument("--max-concurrent", type=int, default=1, help="trials at a time (each takes cluster.num_workers)")
    sw.add_argument("--address", default="", help="existing Ray cluster (default: start Ray in-process)")
    sw.add_argument("--status", default="", metavar="NAME", help="list a sweep's trials (its folder, or its name under runs/)")
    sw.set_defaults(func=_cmd_sweep)

    r = sub.add_parser("resume", help="continue a run from its newest committed checkpoint")
    r.add_argument("run", help="run folder or s3:// prefix")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--address", default="")
    r.set_defaults(func=_cmd_resume)

    e = sub.add_parser("eval", help="evaluate a committed checkpoint on a shard set (metrics + predictions into the run)")
    e.add_argument("run", help="run folder or s3:// prefix")
    e.add_argument("overrides", nargs="*", help="key=value: how to decode and read (task.beam_size=5, data.batch_size=4)")
    e.add_argument("--step", type=int, default=None, help="committed step (default: the newest)")
    e.add_argument("--data", default="", help="shard pattern to evaluate (default: the run's data.val)")
    e.add_argument("--split", default="val", help="name in the outputs: predictions_<split>.jsonl, metrics_<split>.json")
    e.add_argument("--address", default="")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("metrics", help="official-equivalent evaluation of a predictions file")
    m.add_argument("dataset", choices=["qvhighlights", "mad", "captioning"],
                   help="captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr by pycocoevalcap (needs Java; no SPICE: "
                        "its models are downloaded on first use)")
    m.add_argument("--preds", required=True)
    m.add_argument("--gt", required=True)
    m.add_argument("--subset", action="store_true", help="qvhighlights: score only the qids present in both files")
    m.add_argument("--convention", choices=["official", "cone"], default=None,
                   help="mad: MAD's official evaluation (IoU >= t) or CONE's (IoU > t); default both")
    m.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("shards", help="dataset shards")
    ssub = s.add_subparsers(dest="shards_command", required=True)
    sample = ssub.add_parser("sample", help="generate the embedded sample dataset")
    sample.add_argument("--out", default="shards/tiny")
    sample.add_argument("--video-dim", type=int, default=64)
    sample.add_argument("--text-dim", type=int, default=32)
    sample.set_defaults(func=_cmd_shards_sample)
    shards_cli.register(ssub)
    jobs_cli.register(sub)
    pl = sub.add_parser("plot", help="scalar curves of runs (TensorBoard events) into one PNG")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("--tag", action="append", help="scalar tag, repeatable (default val/top1)")
    pl.add_argument("--x", default="step", help="step or minutes")
    pl.add_argument("--out", required=True, help="PNG path (the points go next to it as .json)")
    pl.set_defaults(func=_cmd_plot)
    b = sub.add_parser("bench", help="performance suite: fwd+bwd time and peak memory against N; data-loader throughput")
    b.add_argument("what", choices=["attention", "encoder", "data", "movie"])
    b.add_argument("--config", default="configs/mad_sample.yaml",
                   help="movie: the run config whose model runs (grounding: a forward; captioning: a training step)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="movie: a config override (repeatable), e.g. --set model.dim=64")
    b.add_argument("--device", choices=["cpu", "cuda"], default="")
    b.add_argument("--lengths", default="", help="comma-separated N values")
    b.add_argument("--paired-rounds", type=int, default=8,
                   help="encoder: steps per case when timing each variant interleaved with vanilla-sdpa (0: skip)")
    b.add_argument("--cases", default="", help="comma-separated cases (attention) or variants (encoder)")
    b.add_argument("--heads", type=int, default=0)
    b.add_argument("--head-dim", type=int, default=0)
    b.add_argument("--dim", type=int, default=0)
    b.add_argument("--layers", type=int, default=0)
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--block", type=int, default=256)
    b.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"])
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--workers", default="0,1,2", help="data: comma-separated loader worker counts")
    b.add_argument("--epochs", type=int, default=2, help="data: epochs of the embedded sample read per run")
    b.add_argument("--out", default="", help="output prefix (default docs/bench/<what>_<device>)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StorageError, ValueError, FileNotFoundError) as e:
        print(f"lamscale: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        from lamscale.cluster.launch import Interrupted, RunFailed

        if isinstance(e, Interrupted):  # saved after Ctrl-C; the resume hint is printed: not a success
            return 130
        if not isinstance(e, RunFailed):
            raise
        print(f"lamscale: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("lamscale: interrupted; run the same command again to resume from the newest checkpoint",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
