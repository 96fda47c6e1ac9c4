"""`lamscale bench data`: read throughput of the two embedded samples from a real S3 server (SeaweedFS on
127.0.0.1, started here) and from local disk.

- clips (shards/tiny, the QVH sample): the training loader — samples/s and MB/s of collated batches —
  with 0 (in the training process), 1, 2… loader workers.
- movies (shards/mad_sample, movie-level shards, all 16 movies): the project's reader (`reader.read_samples`,
  range GETs + streaming tar) with `movies.decode_movie`, in process: movies/s and MB/s.

Every row also has the same bytes read two cheaper ways, so the cost of each layer shows: `reader_mb_per_s`
(the reader, samples grouped but not decoded) and `raw_mb_per_s` (one plain S3 GET / file read per shard).
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from lamscale.bench.common import environment, markdown_table
from lamscale.bench.seaweedfs import SeaweedFS
from lamscale.data.loader import LoaderSpec, TrainLoader
from lamscale.data.movies import decode_movie
from lamscale.data.reader import ReadOptions, read_samples

ROOT = Path(__file__).resolve().parents[2]
PATTERN = "train-{000000..000003}.tar"
BUCKET = "lamscale-bench"
COLUMNS = ["dataset", "source", "workers", "samples", "seconds", "samples_per_s", "mb_per_s", "reader_mb_per_s",
           "raw_mb_per_s", "first_batch_s"]

Run = tuple[int, float, float]  # (samples, seconds, seconds to the first batch / movie)


def sample_shards() -> Path:
    """The embedded sample's shards (generated on first use, as `lamscale train` does)."""
    from lamscale.cluster.launch import SAMPLE_DIR, _ensure_sample
    from lamscale.config import load_config

    _ensure_sample(load_config(ROOT / "configs" / "tiny.yaml"))
    return SAMPLE_DIR


def movie_shards() -> tuple[Path, list[str]]:
    """The embedded MAD-like sample's folder and its tar names, train and val (generated on first use)."""
    from lamscale.cluster.launch import _ensure_sample
    from lamscale.config import load_config
    from lamscale.data.mad_sample import SAMPLE_DIR

    _ensure_sample(load_config(ROOT / "configs" / "mad_sample.yaml"))
    return SAMPLE_DIR, sorted(p.name for p in SAMPLE_DIR.glob("*.tar"))


def read_once(spec: LoaderSpec, workers: int, batches: int) -> Run:
    """(samples, seconds, seconds to the first batch) for `batches` batches from a fresh loader."""
    from lamscale.config import load_config
    from lamscale.tasks import get_task

    task = get_task(load_config(ROOT / "configs" / "tiny.yaml"))
    collate = task.collate  # the trainer's batch (configs/tiny.yaml: max_clips 75, max_text 32)
    t0 = time.perf_counter()
    samples, first = 0, 0.0
    for i, batch in enumerate(TrainLoader(spec, 0, 1, workers, collate)):
        samples += len(batch.meta)
        if i == 0:
            first = time.perf_counter() - t0
        if i + 1 == batches:
            break
    return samples, time.perf_counter() - t0, first


def _undecoded(raw: dict) -> dict:
    return raw  # the reader's grouped tar members as they are: what the reader costs without a decoder


def samples_once(urls: list[str], options: ReadOptions, decode: Callable[[dict], Any]) -> Run:
    """(samples, seconds, seconds to the first sample) for one pass of the reader over `urls`."""
    t0 = time.perf_counter()
    samples, first = 0, 0.0
    for _ in read_samples(urls, options, decode=decode):
        samples += 1
        if samples == 1:
            first = time.perf_counter() - t0
    return samples, time.perf_counter() - t0, first


def raw_getter(endpoint: str) -> Callable[[str], bytes]:
    """Whole-object reads with nothing of the project in between: one S3 GET per shard, or one file read."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)  # credentials from the environment (SeaweedFS.env())

    def get(url: str) -> bytes:
        if url.startswith("s3://"):
            bucket, key = url[len("s3://"):].split("/", 1)
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return Path(url).read_bytes()

    return get


def raw_once(urls: list[str], get: Callable[[str], bytes]) -> Run:
    t0 = time.perf_counter()
    total = sum(len(get(u)) for u in urls)
    return total, time.perf_counter() - t0, 0.0


def median(runs: list[Run]) -> Run:
    """The run of median duration."""
    return sorted(runs, key=lambda r: r[1])[len(runs) // 2]


def layer_rates(urls: list[str], options: ReadOptions, get: Callable[[str], bytes], nbytes: int,
                repeats: int) -> dict:
    """MB/s of one pass over `urls` through the reader without decoding, and as plain whole-object reads."""
    reader = median([samples_once(urls, options, _undecoded) for _ in range(repeats)])
    raw = median([raw_once(urls, get) for _ in range(repeats)])
    return {"reader_mb_per_s": nbytes / 1e6 / reader[1], "raw_mb_per_s": nbytes / 1e6 / raw[1]}


def row(dataset: str, source: str, workers: int, run: Run, nbytes: int, layers: dict) -> dict:
    samples, seconds, first = run
    return {"dataset": dataset, "source": source, "case": f"{dataset}-{source}-w{workers}", "workers": workers,
            "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "mb_per_s": nbytes / 1e6 / seconds, **layers, "first_batch_s": first}


def bench_data(workers: list[int], epochs: int, repeats: int = 3, batch_size: int = 16, block_kib: int = 8192) -> dict:
    shards = sample_shards()
    names = [f"train-{i:06d}.tar" for i in range(4)]
    shard_bytes = sum((shards / n).stat().st_size for n in names)
    movies_dir, movie_names = movie_shards()
    movie_bytes = sum((movies_dir / n).stat().st_size for n in movie_names)
    batches = epochs * 1200 // batch_size  # the sample's 1200 training queries per epoch
    options = ReadOptions(block_kib=block_kib)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lamscale-bench-s3-") as tmp:
        server = SeaweedFS(Path(tmp))
        server.start()
        saved = dict(os.environ)
        try:
            server.make_bucket(BUCKET)
            fs = server.fs()
            for n in names:
                fs.put_file(str(shards / n), f"{BUCKET}/sample/{n}")
            for n in movie_names:
                fs.put_file(str(movies_dir / n), f"{BUCKET}/mad/{n}")
            os.environ.update(server.env())  # loader workers are forked from this process
            get = raw_getter(server.endpoint)
            for source, base in (("s3", f"s3://{BUCKET}/sample"), ("local", str(shards))):
                spec = LoaderSpec(f"{base}/{PATTERN}", 0, batch_size, 256, options=options)
                read_once(spec, 0, 1200 // batch_size)  # warm-up: client set-up, server and page caches
                # the layers below the loader read the same bytes once per pass: rates, not totals, compare
                layers = layer_rates([f"{base}/{n}" for n in names], options, get, shard_bytes, repeats)
                for w in workers:
                    runs = [read_once(spec, w, batches) for _ in range(repeats)]  # rates include loader start-up
                    rows.append(row("clips", source, w, median(runs), epochs * shard_bytes, layers))
                    print(f"  {rows[-1]['case']}: {rows[-1]['samples_per_s']:.0f} samples/s", flush=True)
            for source, base in (("s3", f"s3://{BUCKET}/mad"), ("local", str(movies_dir))):
                # `epochs` passes per run, as for clips: one pass of 16 movies is over in ~0.1 s
                urls = [f"{base}/{n}" for n in movie_names] * epochs
                samples_once(urls, options, decode_movie)  # warm-up, as for clips
                layers = layer_rates(urls, options, get, epochs * movie_bytes, repeats)
                run = median([samples_once(urls, options, decode_movie) for _ in range(repeats)])
                rows.append(row("movies", source, 0, run, epochs * movie_bytes, layers))
                print(f"  {rows[-1]['case']}: {rows[-1]['samples_per_s']:.1f} movies/s, "
                      f"{rows[-1]['mb_per_s']:.0f} MB/s (raw {layers['raw_mb_per_s']:.0f} MB/s)", flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            server.stop()
    settings = {"shards": f"embedded sample, 4 × {shard_bytes / 4e6:.1f} MB, 1200 samples (75 clips × 64-d video, "
                          "≤ 32 × 32-d text, float16)",
                "movie_shards": f"embedded MAD-like sample (train + val), {len(movie_names)} tars, "
                                f"{movie_bytes / 1e6:.1f} MB, one sample per movie (3k–12k frames × 64-d, float16)",
                "epochs": epochs, "repeats (median)": repeats, "batch_size": batch_size,
                "shuffle_buffer": 256, "read_block_kib": block_kib, "ranks": 1,
                "collate": "tasks.moment_retrieval.collate (max_clips 75, max_text 32)",
                "movies": "`epochs` passes, in process: reader.read_samples + movies.decode_movie; samples = movies, "
                          "first_batch_s = to the first movie",
                "reader_mb_per_s": "reader.read_samples, members grouped per sample, not decoded",
                "raw_mb_per_s": "whole-object reads: boto3 get_object per tar / a file read",
                "server": "SeaweedFS (weed server, one process) on 127.0.0.1"}
    return {"kind": "data", "env": environment("cpu"), "settings": settings, "rows": rows,
            "table": markdown_table(rows, COLUMNS)}


def run(workers: list[int], epochs: int, repeats: int, out: str) -> int:
    """Measure, print the table, write `out`.json and `out`.md."""
    from lamscale.bench.report import write

    results = bench_data(workers, epochs, repeats)
    print(results["table"])
    with warnings.catch_warnings():  # the plot has no lines: "no artists with labels"
        warnings.simplefilter("ignore")
        written = write(results, out)
    os.remove(out + ".png")  # report.write also plots time and memory against N, which a loader has not
    print("wrote " + ", ".join(p for p in written if not p.endswith(".png")))
    return 0
