"""`lamscale bench movie`: one grounding forward over a whole movie (its frames + one sentence) with a run
config's model, per movie length, each in a fresh process: seconds and peak memory above the model's.
With a captioning config: one training step (forward + backward) over a movie segment of that many
frames + context words + a caption, what MADv2 audio description trains on.

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
CAPTION_VOCAB, CONTEXT_WORDS, CAPTION_TOKENS = 1000, 64, 24


def _grounding_forward(cfg):
    from lamscale.tasks import get_task

    model = get_task(cfg).build_model().eval()
    g = torch.Generator().manual_seed(0)

    def forward(n: int) -> None:
        video = torch.randn(1, n, cfg.model.video_dim, generator=g).half()  # shards hold float16
        text = torch.randn(1, SENTENCE_TOKENS, cfg.model.text_dim, generator=g).half()
        with torch.no_grad():
            model(video.float(), torch.ones(1, n, dtype=torch.bool), text.float(),
                  torch.ones(1, SENTENCE_TOKENS, dtype=torch.bool))
    return forward, SENTENCE_TOKENS


def _caption_step(cfg):
    """A training step's forward + backward (no tokenizer needed: a fixed vocabulary size)."""
    from lamscale.model.captioner import CaptionModel

    t = cfg.task
    model = CaptionModel(cfg.model, CAPTION_VOCAB, t.decoder_layers, t.max_caption, t.cross_lam).train()
    g = torch.Generator().manual_seed(0)
    extra = CONTEXT_WORDS + min(CAPTION_TOKENS, t.max_caption)

    def step(n: int) -> None:
        video = torch.randn(1, n, cfg.model.video_dim, generator=g).half().float()
        audio = torch.randn(1, n, cfg.model.audio_dim, generator=g) if cfg.model.audio_dim else None
        words = torch.randint(4, CAPTION_VOCAB, (1, min(CONTEXT_WORDS, cfg.model.max_text)), generator=g)
        caption = torch.randint(4, CAPTION_VOCAB, (1, min(CAPTION_TOKENS, t.max_caption)), generator=g)
        ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)  # noqa: E731
        logits = model(video, ones(video), audio, None if audio is None else ones(audio), words, ones(words), caption)
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    return step, extra


def _movie_forward(config: str, frames: int, threads: int, overrides: tuple, queue) -> None:
    try:
        from lamscale.config import load_config

        torch.set_num_threads(threads)
        _fixed_mmap_threshold()  # freed blocks leave RSS at once, so the peak follows live tensors
        cfg = load_config(config, [*overrides, f"model.max_clips={max(frames, 256)}"])
        forward, extra = (_caption_step if cfg.task.name == "captioning" else _grounding_forward)(cfg)

        forward(256)  # kernels loaded, code resident
        base = _rss_bytes()
        _reset_peak_rss()
        t0 = time.perf_counter()
        forward(frames)
        seconds = time.perf_counter() - t0
        peak = (_peak_rss_bytes() - base) / 2**20
        n = frames + extra
        queue.put({"N": n, "frames": frames, "ms": round(1000 * seconds, 1), "peak_mib": round(peak, 1),
                   "mib_per_1k_tokens": round(1000 * peak / n, 3)})
    except Exception as e:
        queue.put({"frames": frames, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                   "trace": traceback.format_exc()[-800:]})


def bench_movie(config: str, lengths: list[int], threads: int = 0, timeout: float = 1800, overrides: tuple = ()) -> dict:
    """One row per movie length (frames), for `report.write`: time (ms) and peak memory of the forward
    (grounding) or of a training step (captioning)."""
    from lamscale.config import load_config

    threads = threads or torch.get_num_threads()
    captioning = load_config(config, list(overrides)).task.name == "captioning"
    case = f"{os.path.basename(config).rsplit('.', 1)[0]} {'training step' if captioning else 'forward'}"
    rows = []
    for frames in lengths:
        row = _in_fresh_process(_movie_forward, (config, frames, threads, tuple(overrides)), "cpu", timeout)
        row = {"frames": frames, "case": case, **row}
        print(f"[bench movie] {frames} frames: " + (row.get("error") or f"{row['ms'] / 1000:.1f} s, "
                                                    f"peak {row['peak_mib']} MiB above the model"), flush=True)
        rows.append(row)
    table = markdown_table(rows, ["frames", "N", "ms", "peak_mib", "mib_per_1k_tokens", "error"])
    return {"kind": "movie", "settings": {"config": config, "overrides": list(overrides), "threads": threads,
                                          "extra_tokens": CONTEXT_WORDS + CAPTION_TOKENS if captioning else SENTENCE_TOKENS},
            "env": environment("cpu"), "rows": rows, "table": table, "time_label": "forward time (ms)"}
