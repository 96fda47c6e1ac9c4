"""What rank 0 shows people: TensorBoard events (scalars, LAM mask heatmaps) and a progress line.

Events are written to a local folder and copied to run storage when the run storage is remote:
object stores cannot append, and a training step must never wait on the network for a log line.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from lamscale import storage


def heatmap(mask: torch.Tensor) -> np.ndarray:
    """(n, n) values → (n, n, 3) uint8 viridis image, scaled to the mask's own range."""
    from matplotlib import colormaps

    m = mask.float().cpu().numpy()
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5)
    return (colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8)


class RateWindow:
    """Throughput of the steps since the last log line (samples and tokens summed over `world` ranks)."""

    def __init__(self, world: int):
        self.world = world
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.samples, self.tokens, self.steps = time.perf_counter(), 0.0, 0, 0, 0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, samples: int, tokens: int) -> None:
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens

    def rates(self) -> dict[str, float]:
        """The window's rates; starts the next window."""
        s = time.perf_counter() - self.start
        out = {"samples_per_s": self.samples * self.world / s, "tokens_per_s": self.tokens * self.world / s,
               "step_time_s": s / max(self.steps, 1), "data_wait_share": self.wait / s}
        self.reset()
        return out


class Monitor:
    def __init__(self, run_url: str, start_step: int, total_steps: int):
        self.remote = None if storage.is_local(run_url) else storage.join(run_url, "tb")
        log_dir = os.path.join(storage.local_path(run_url), "tb") if self.remote is None else tempfile.mkdtemp(prefix="lamscale-tb-")
        # purge_step hides events a killed run wrote after its last checkpoint (the checkpoint's own step stays)
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step > 0 else None)
        self.log_dir, self.total = log_dir, total_steps
        self.start_step, self.start_time = start_step, time.time()

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}{k}", v, step)

    def mask_images(self, step: int, maps: list[tuple[int, torch.Tensor]]) -> None:
        for layer, mask in maps:  # mask (Hm, n, n): show the first head (shared masks have one)
            self.writer.add_image(f"lam_mask/layer_{layer}", heatmap(mask[0]), step, dataformats="HWC")
            self.writer.add_histogram(f"lam_mask_values/layer_{layer}", mask.float(), step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for tag, image in images.items():  # HWC uint8
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def texts(self, step: int, texts: dict[str, str]) -> None:
        for tag, text in texts.items():  # markdown (TensorBoard's Text tab renders tables)
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, loss: float, lr: float, samples_per_s: float) -> str:
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        eta_txt = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        pct = 100.0 * step / self.total
        return (f"step {step}/{self.total} ({pct:.0f}%) | loss {loss:.4f} | lr {lr:.2e} | "
                f"{samples_per_s:.1f} samples/s | ETA {eta_txt}")

    def sync(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            for name in os.listdir(self.log_dir):
                storage.upload(os.path.join(self.log_dir, name), storage.join(self.remote, name))

    def close(self) -> None:
        self.sync()
        self.writer.close()
