"""Which checkpoints of a run are committed: read by the driver, `lamscale runs` and the workers. Free of
torch, so the commands that only look at a run answer without loading it."""
from __future__ import annotations

import re

from lamscale import storage

STEP_DIR = re.compile(r"step_(\d{8})$")


def committed_steps(run_url: str) -> list[int]:
    """Steps of the committed checkpoints in `run_url`, oldest first."""
    fs, root = storage.fs_for(storage.join(run_url, "checkpoints"))

    def listing() -> list[int]:
        fs.invalidate_cache()  # object-store listings are cached per process; other ranks/runs write here
        if not fs.exists(root):
            return []
        steps = []
        for entry in fs.ls(root, detail=False):
            m = STEP_DIR.search(entry.rstrip("/"))
            if m and fs.exists(storage.join(entry, "commit.json")):
                steps.append(int(m.group(1)))
        return sorted(steps)

    return storage.retry(listing, f"list the checkpoints of {run_url}")
