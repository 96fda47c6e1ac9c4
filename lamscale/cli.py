"""`lamscale` command line: train, resume, metrics, shards."""
from __future__ import annotations

import argparse
import json
import sys

from lamscale.config import ConfigError, load_config
from lamscale.storage import StorageError


def _cmd_train(args: argparse.Namespace) -> int:
    from lamscale.cluster.launch import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.address)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from lamscale.cluster.launch import load_run_config, train

    train(load_run_config(args.run, args.overrides), args.address)
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from lamscale.tasks.qvhighlights_metrics import evaluate, load_jsonl

    result = evaluate(load_jsonl(args.preds), load_jsonl(args.gt), match_number=not args.subset)
    print(json.dumps(result, indent=4))
    return 0


def _cmd_shards_sample(args: argparse.Namespace) -> int:
    from lamscale.data.sample import build_sample

    manifest = build_sample(args.out, args.video_dim, args.text_dim)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards -> {args.out}/{info['pattern']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lamscale", description="Train LAM Transformer encoders on long multimodal sequences.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) the run a config names")
    t.add_argument("config", nargs="?", default="configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    t.add_argument("--address", default="", help="existing Ray cluster (default: start Ray in-process)")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("resume", help="continue a run from its newest committed checkpoint")
    r.add_argument("run", help="run folder or s3:// prefix")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--address", default="")
    r.set_defaults(func=_cmd_resume)

    m = sub.add_parser("metrics", help="official-equivalent evaluation of a predictions file")
    m.add_argument("dataset", choices=["qvhighlights"])
    m.add_argument("--preds", required=True)
    m.add_argument("--gt", required=True)
    m.add_argument("--subset", action="store_true", help="score only the qids present in both files")
    m.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("shards", help="dataset shards")
    ssub = s.add_subparsers(dest="shards_command", required=True)
    sample = ssub.add_parser("sample", help="generate the embedded sample dataset")
    sample.add_argument("--out", default="shards/tiny")
    sample.add_argument("--video-dim", type=int, default=64)
    sample.add_argument("--text-dim", type=int, default=32)
    sample.set_defaults(func=_cmd_shards_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StorageError, ValueError, FileNotFoundError) as e:
        print(f"lamscale: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("lamscale: interrupted; run the same command again to resume from the newest checkpoint",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
