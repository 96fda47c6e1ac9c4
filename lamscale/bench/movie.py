"""`lamscale bench movie`: one grounding forward over a whole movie (its frames + one sentence) with a run
config's model, per movie length, each in a fresh process: seconds and peak memory above the model's.

This is what grounding eval does for every val sentence (N = frames + tokens); with a LAM backend that
is O(N) in memory the peak must grow linearly in N (a dense N×N mask would be 16× from 9k to 36k).
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from lamscale.bench.common import (_fixed_mmap_threshold, _in_fresh_process, _peak_rss_bytes, _reset_peak_rss,
                                   _rss_bytes, environment, markdown_table)

SENTENCE_TOKENS = 12


def _movie_forward(config: str, frames: int, threads: int, queue) -> None:
    try:
        from lamscale.config import load_config
        from lamscale.tasks import get_task

        torch.set_num_threads(threads)
        _fixed_mmap_threshold()  # freed blocks leave RSS at once, so the peak follows live tensors
        cfg = load_config(config, [f"model.max_clips={max(frames, 256)}"])
        model = get_task(cfg).build_model().eval()
        g = torch.Generator().manual_seed(0)

        def forward(n: int) -> None:
            video = torch.randn(1, n, cfg.model.video_dim, generator=g).half()  # shards hold float16
            text = torch.randn(1, SENTENCE_TOKENS, cfg.model.text_dim, generator=g).half()
            with torch.no_grad():
                model(video.float(), torch.ones(1, n, dtype=torch.bool), text.float(),
                      torch.ones(1, SENTENCE_TOKENS, dtype=torch.bool))

        forward(256)  # kernels loaded, code resident
        base = _rss_bytes()
        _reset_peak_rss()
        t0 = time.perf_counter()
        forward(frames)
        seconds = time.perf_counter() - t0
        peak = (_peak_rss_bytes() - base) / 2**20
        n = frames + SENTENCE_TOKENS
        queue.put({"N": n, "frames": frames, "ms": round(1000 * seconds, 1), "peak_mib": round(peak, 1),
                   "mib_per_1k_tokens": round(1000 * peak / n, 3)})
    except Exception as e:
        queue.put({"frames": frames, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                   "trace": traceback.format_exc()[-800:]})


def bench_movie(config: str, lengths: list[int], threads: int = 0, timeout: float = 1800) -> dict:
    """One row per movie length (frames), for `report.write`: time (ms) and peak memory of the forward."""
    threads = threads or torch.get_num_threads()
    case = f"{os.path.basename(config).rsplit('.', 1)[0]} forward"
    rows = []
    for frames in lengths:
        row = _in_fresh_process(_movie_forward, (config, frames, threads), "cpu", timeout)
        row = {"N": frames + SENTENCE_TOKENS, "frames": frames, "case": case, **row}
        print(f"[bench movie] {frames} frames: " + (row.get("error") or f"{row['ms'] / 1000:.1f} s, "
                                                    f"peak {row['peak_mib']} MiB above the model"), flush=True)
        rows.append(row)
    table = markdown_table(rows, ["frames", "N", "ms", "peak_mib", "mib_per_1k_tokens", "error"])
    return {"kind": "movie", "settings": {"config": config, "threads": threads, "sentence_tokens": SENTENCE_TOKENS},
            "env": environment("cpu"), "rows": rows, "table": table, "time_label": "forward time (ms)"}
