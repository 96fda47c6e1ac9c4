"""`lamscale bench data`: training-loader throughput — samples/s and MB/s of collated batches — reading
the embedded sample's shards from a real S3 server (SeaweedFS on 127.0.0.1, started here) and from
local disk, with 0 (in the training process), 1, 2… loader workers."""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

from lamscale.bench.common import environment, markdown_table
from lamscale.bench.seaweedfs import SeaweedFS
from lamscale.data.loader import LoaderSpec, TrainLoader
from lamscale.data.reader import ReadOptions

PATTERN = "train-{000000..000003}.tar"
BUCKET = "lamscale-bench"


def sample_shards() -> Path:
    """The embedded sample's shards (generated on first use, as `lamscale train` does)."""
    from lamscale.cluster.launch import SAMPLE_DIR, _ensure_sample
    from lamscale.config import load_config

    _ensure_sample(load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"))
    return SAMPLE_DIR


def read_once(spec: LoaderSpec, workers: int, batches: int) -> tuple[int, float, float]:
    """(samples, seconds, seconds to the first batch) for `batches` batches from a fresh loader."""
    from lamscale.config import load_config
    from lamscale.tasks import get_task

    task = get_task(load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"))
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


def measure(spec: LoaderSpec, workers: int, batches: int, shard_bytes: int, epochs: int, repeats: int) -> dict:
    """The median of `repeats` runs; its rates include the loader's start-up (forking workers, first reads)."""
    runs = sorted((read_once(spec, workers, batches) for _ in range(repeats)), key=lambda r: r[1])
    samples, seconds, first = runs[len(runs) // 2]
    return {"workers": workers, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "mb_per_s": epochs * shard_bytes / 1e6 / seconds, "first_batch_s": first}


def bench_data(workers: list[int], epochs: int, repeats: int = 3, batch_size: int = 16, block_kib: int = 8192) -> dict:
    shards = sample_shards()
    names = [f"train-{i:06d}.tar" for i in range(4)]
    shard_bytes = sum((shards / n).stat().st_size for n in names)
    batches = epochs * 1200 // batch_size  # the sample's 1200 training queries per epoch
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
            os.environ.update(server.env())  # loader workers are forked from this process
            for source, pattern in (("s3", f"s3://{BUCKET}/sample/{PATTERN}"), ("local", f"{shards}/{PATTERN}")):
                spec = LoaderSpec(pattern, 0, batch_size, 256, options=ReadOptions(block_kib=block_kib))
                read_once(spec, 0, 1200 // batch_size)  # warm-up: client set-up, server and page caches
                for w in workers:
                    rows.append({"source": source, "case": f"{source}-w{w}",
                                 **measure(spec, w, batches, shard_bytes, epochs, repeats)})
                    print(f"  {rows[-1]['case']}: {rows[-1]['samples_per_s']:.0f} samples/s", flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            server.stop()
    settings = {"shards": f"embedded sample, 4 × {shard_bytes / 4e6:.1f} MB, 1200 samples (75 clips × 64-d video, "
                          "≤ 32 × 32-d text, float16)",
                "epochs": epochs, "repeats (median)": repeats, "batch_size": batch_size,
                "shuffle_buffer": 256, "read_block_kib": block_kib, "ranks": 1,
                "collate": "tasks.moment_retrieval.collate (max_clips 75, max_text 32)",
                "server": "SeaweedFS (weed server, one process) on 127.0.0.1"}
    return {"kind": "data", "env": environment("cpu"), "settings": settings, "rows": rows,
            "table": markdown_table(rows, ["source", "workers", "samples", "seconds", "samples_per_s", "mb_per_s",
                                           "first_batch_s"])}


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
