"""`lamscale shards build | verify | stats`: the command-line face of data/builders and data/verify."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lamscale.data.formats import FORMAT_NAMES

if TYPE_CHECKING:  # the builders import webdataset and torch: only the command that runs them does
    from lamscale.data.builders import BuildOptions, BuildResult

SHOWN_REJECTS = 5  # the summary shows a few; rejects.jsonl has them all


def register(shards_sub: argparse._SubParsersAction) -> None:
    b = shards_sub.add_parser("build", help="shards from an official dataset release",
                              description="Write WebDataset shards, manifest.json and rejects.jsonl from a release folder.")
    b.add_argument("input", type=Path, help="the release folder")
    b.add_argument("--format", required=True, choices=FORMAT_NAMES)
    b.add_argument("--out", required=True, help="output folder or URL (file://, s3://bucket/prefix)")
    b.add_argument("--splits", default="", help="comma-separated splits (default: every split the release has)")
    b.add_argument("--shard-size", default="256MB", help="target shard size, e.g. 256MB, 1GiB (default 256MB)")
    b.add_argument("--max-per-shard", type=int, default=None, help="at most this many samples per shard")
    b.add_argument("--annotations", default="",
                   help="comma-separated annotation files (default: the release's); madv2_ad: AD.csv[,SUBS.csv]")
    b.add_argument("--video-features", default="",
                   help="qvhighlights: comma-separated npz folders, concatenated (default slowfast_features,clip_features); "
                        "mad: the frames .h5; madv2_ad: the <movie>.npy folder or frames .h5; "
                        "msrvtt: the .npy folder (default video_features)")
    b.add_argument("--text-features", default="", help="qvhighlights: npz folder (clip_text_features); mad: tokens .h5")
    b.add_argument("--audio-features", default="", help="msrvtt: .npy folder (default audio_features, when present)")
    for kind in ("video", "text", "audio"):
        b.add_argument(f"--{kind}-dim", type=int, default=None, help=f"expected {kind} feature dim (default: official or first sample's)")
    b.add_argument("--clip-len", type=float, default=None, help="qvhighlights: seconds per feature clip (default 2.0)")
    b.add_argument("--fps", type=float, default=None, help="mad, madv2_ad: feature frames per second (default 5)")
    b.add_argument("--num-classes", type=int, default=None, help="idx: labels must be below this (default 10)")
    b.add_argument("--max-per-class", default="",
                   help="idx: a balanced subset, at most N images per class: N for every split, or train=600,test=100")
    b.add_argument("--subset-seed", type=int, default=None,
                   help="idx: pick the --max-per-class images at random with this seed (default: the first N in file order)")
    b.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    b.set_defaults(func=_cmd_build)

    v = shards_sub.add_parser("verify", help="check every shard's sha256 and decode every sample")
    v.add_argument("url", help="dataset folder or URL holding manifest.json")
    v.set_defaults(func=_cmd_verify)

    s = shards_sub.add_parser("stats", help="counts, bytes and sequence-length histograms")
    s.add_argument("url", help="dataset folder or URL holding manifest.json")
    s.add_argument("--png", default="", help="also plot the length histograms into this PNG file")
    s.set_defaults(func=_cmd_stats)


def _list(text: str) -> list[str] | None:
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


def options(args: argparse.Namespace) -> BuildOptions:
    from lamscale.data.builders import BuildOptions
    from lamscale.data.writer import parse_size

    dims = {k: getattr(args, f"{k}_dim") for k in ("video", "text", "audio") if getattr(args, f"{k}_dim") is not None}
    bad = {k: d for k, d in dims.items() if d <= 0}
    if bad:
        raise ValueError(f"--{next(iter(bad))}-dim: {next(iter(bad.values()))} is not a positive dim")
    if args.max_per_shard is not None and args.max_per_shard <= 0:
        raise ValueError(f"--max-per-shard: {args.max_per_shard} is not a positive count")
    idx_only = {"--num-classes": args.num_classes is not None, "--max-per-class": bool(args.max_per_class),
                "--subset-seed": args.subset_seed is not None}
    given = [name for name, on in idx_only.items() if on]
    if given and args.format != "idx":
        raise ValueError(f"{given[0]}: only --format idx takes it, not {args.format}")
    if args.subset_seed is not None and not args.max_per_class:
        raise ValueError(f"--subset-seed {args.subset_seed}: it picks the --max-per-class subset, and no --max-per-class is given")
    return BuildOptions(input=args.input.expanduser().resolve(), out=args.out, splits=_list(args.splits),
                        annotations=[Path(a) for a in _list(args.annotations) or []] or None,
                        video_features=_list(args.video_features), text_features=args.text_features or None,
                        audio_features=args.audio_features or None, dims=dims, clip_len=args.clip_len, fps=args.fps,
                        shard_size=parse_size(args.shard_size), max_per_shard=args.max_per_shard, overwrite=args.overwrite,
                        num_classes=args.num_classes, max_per_class=per_split_counts(args.max_per_class),
                        subset_seed=args.subset_seed)


def per_split_counts(text: str) -> dict[str, int] | None:
    """`--max-per-class`: `600` (every split, key "*") or `train=600,test=100`."""
    if not text.strip():
        return None
    counts = {}
    for part in text.split(","):
        split, sep, value = part.strip().rpartition("=")
        split = split.strip() if sep else "*"
        if not (value.strip().isascii() and value.strip().isdigit()) or int(value) <= 0 or (sep and not split):
            raise ValueError(f"--max-per-class: {part.strip()!r} is not a positive count N or SPLIT=N (e.g. train=600,test=100)")
        if split in counts:
            raise ValueError(f"--max-per-class: {split if split != '*' else 'the all-splits count'} is given twice")
        counts[split] = int(value)
    return counts


def summary(result: BuildResult) -> list[str]:
    m = result.manifest
    lines = []
    for split, c in m["counts"].items():
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(c["rejected_by_kind"].items()))
        info = m["splits"][split]
        where = f" -> {result.url}/{info['pattern']}" if info["pattern"] else ""
        lines.append(f"{split}: {c['input']} inputs, {c['written']} written in {len(info['shards'])} shards, "
                     f"{c['rejected']} rejected{f' ({kinds})' if kinds else ''}{where}")
    if result.rejects:
        lines.append(f"rejected inputs ({len(result.rejects)}, all in {result.url}/{m['rejects']}):")
        lines += [f"  {r['split']} {r['id']}: {r['kind']}: {r['reason']}" for r in result.rejects[:SHOWN_REJECTS]]
        if len(result.rejects) > SHOWN_REJECTS:
            lines.append(f"  … {len(result.rejects) - SHOWN_REJECTS} more")
    lines.append(f"feature dims {m['feature_dims'] or '-'}; manifest {result.url}/manifest.json")
    return lines


def _cmd_build(args: argparse.Namespace) -> int:
    from lamscale.data.builders import build

    result = build(args.format, options(args))
    print("\n".join(summary(result)), flush=True)
    written = sum(c["written"] for c in result.manifest["counts"].values())
    return 0 if written else 1  # nothing written: the layout or the options are wrong


def _cmd_verify(args: argparse.Namespace) -> int:
    from lamscale.data.verify import verify

    report = verify(args.url)
    for line in report.problems:
        print(line)
    status = f"{len(report.problems)} problem(s)" if report.problems else "OK"
    print(f"{report.url}: {report.shards} shards, {report.samples} samples checked: {status}", flush=True)
    return 1 if report.problems else 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lamscale.data.verify import format_stats, plot_lengths, stats

    st = stats(args.url)
    print(format_stats(st), flush=True)
    if args.png:
        plot_lengths(st, args.png)
        print(f"wrote {args.png}")
    return 0

