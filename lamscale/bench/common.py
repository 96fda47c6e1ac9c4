"""Measuring one case: median fwd+bwd time after warm-up, and peak memory.

Each case runs in a fresh process. After its warm-up (so lazily loaded code is already resident),
its peak memory is measured over one step: on CPU as the peak resident size (VmHWM, reset through
/proc/self/clear_refs) above the resident size before it, with glibc made to mmap every large block
so that freed memory leaves RSS; on a GPU as torch.cuda.max_memory_allocated above the allocated
bytes. Timing comes after, with malloc back to reusing its heap: mmap'ing every tensor costs page
faults on each step (about +50 % on an encoder step here), which no real run pays.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
import traceback
from typing import Callable

import torch

Case = Callable[[], Callable[[], None]]  # builds inputs, returns the step to time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _fixed_mmap_threshold() -> None:
    """Make glibc return every large free to the OS at once, so RSS follows live tensor memory.

    By default glibc raises its mmap threshold after freeing a large block and keeps later blocks of
    that size on its heap: memory freed in the warm-up would then hide the peak we measure.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it turns off the dynamic adjustment
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _reusing_malloc() -> None:
    """Undo _fixed_mmap_threshold for timing: blocks up to 64 MiB come from (and go back to) the heap."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 2**20)
    libc.mallopt(-1, 128 * 2**20)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _child(build: Case, device: str, warmup: int, repeats: int, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        if device == "cpu":
            _fixed_mmap_threshold()
        step = build()
        for _ in range(warmup):
            step()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes()
            _reset_peak_rss()
        step()
        _sync(device)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _peak_rss_bytes() - base
            _reusing_malloc()
            for _ in range(warmup):  # let the heap grow to the step's working set before timing
                step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        queue.put({"ms": 1000 * statistics.median(times), "peak_mib": max(peak, 0) / 2**20})
    except torch.OutOfMemoryError:
        queue.put({"error": "out of memory"})
    except Exception as e:  # report, keep benchmarking the other cases
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", "trace": traceback.format_exc()[-800:]})


def _in_fresh_process(target: Callable, args: tuple, device: str, timeout: float) -> dict:
    """Run target(*args, queue) in a new process and return what it put on the queue, or {"error"}."""
    ctx = mp.get_context("spawn" if device == "cuda" else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"error": f"timed out after {timeout:.0f}s"}
    if queue.empty():
        return {"error": "out of memory (killed)" if proc.exitcode and proc.exitcode < 0 else f"exit {proc.exitcode}"}
    return queue.get()


def measure(build: Case, device: str, warmup: int = 1, repeats: int = 3, threads: int = 0, timeout: float = 900) -> dict:
    """Run `build` in a fresh process; returns {"ms", "peak_mib"} or {"error"}."""
    return _in_fresh_process(_child, (build, device, warmup, repeats, threads or torch.get_num_threads()), device, timeout)


def _paired_child(builds: list[Case], device: str, warmup: int, rounds: int, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        steps = [build() for build in builds]
        for step in steps:
            for _ in range(warmup):
                step()
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(rounds):  # alternate, so that drift in machine speed hits every case alike
            for step, record in zip(steps, times):
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                record.append(time.perf_counter() - t0)
        queue.put({"ms": [1000 * statistics.median(t) for t in times]})
    except Exception as e:
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})


def measure_paired(builds: list[Case], device: str, warmup: int = 1, rounds: int = 8, threads: int = 0,
                   timeout: float = 900) -> dict:
    """Time several cases in one fresh process, one step of each in turn; returns {"ms": [median per case]}.

    On a shared or throttled machine, separate runs drift by ±15 %; interleaved steps see the same
    machine, so their ratio is the number to compare cases by.
    """
    return _in_fresh_process(_paired_child, (builds, device, warmup, rounds, threads or torch.get_num_threads()),
                             device, timeout)


def single_process_group(device: str) -> None:
    """A torch.distributed world of one in this (fresh, per-case) process, for DeepSpeed's engine:
    gloo on CPU, NCCL on a GPU, as Ray Train gives the trainer."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed reads the launcher's variables (LOCAL_RANK picks the GPU)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        env["card"] = torch.cuda.get_device_name()
    else:
        import platform

        env["card"] = platform.processor() or platform.machine()
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_cases(lengths: list[int], cases: list[str], build: Callable[[int, str], Case], device: str, repeats: int,
              desc: str) -> list[dict]:
    """Measure every (N, case) with a progress bar; rows keep errors (e.g. out of memory) as results."""
    from tqdm import tqdm

    rows = []
    for n, name in tqdm([(n, c) for n in lengths for c in cases], desc=desc, unit="case"):
        result = measure(build(n, name), device, warmup=1, repeats=repeats)
        rows.append({"N": n, "case": name, **{k: v for k, v in result.items() if k != "trace"}})
    return rows


def baseline_at(rows: list[dict], n: int, case: str) -> dict | None:
    return next((r for r in rows if r["N"] == n and r["case"] == case and "ms" in r), None)
