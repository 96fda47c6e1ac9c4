"""Fault injection for the fault-tolerance tests: kill a real run at an exact point.

    LAMSCALE_FAULT="<point>@<step>"

When rank 0 reaches <point> at <step>, it SIGKILLs the driver and then itself, as a crash or a
pulled plug would; the other ranks die with the job. Points:
    after_step     a training step finished (mid-epoch, between checkpoints)
    after_commit   right after a checkpoint was committed
    before_commit  inside a save: every rank's files are uploaded, commit.json is not yet written
Unset (always, outside tests), every call is a no-op.
"""
from __future__ import annotations

import os
import signal

POINTS = ("after_step", "after_commit", "before_commit")
_driver_pid: int | None = None


def arm(driver_pid: int | None) -> None:
    """Remember the driver process (the payload carries its pid; tests run on one host)."""
    global _driver_pid
    _driver_pid = driver_pid


def parse(spec: str) -> tuple[str, int]:
    point, _, step = spec.partition("@")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"LAMSCALE_FAULT={spec!r}: expected <point>@<step> with point one of {POINTS}")
    return point, int(step)


def maybe_kill(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("LAMSCALE_FAULT", "")
    if not spec or rank != 0 or parse(spec) != (point, step):
        return
    print(f"[lamscale] LAMSCALE_FAULT: killing the run at {point}@{step}", flush=True)
    if _driver_pid:
        os.kill(_driver_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
