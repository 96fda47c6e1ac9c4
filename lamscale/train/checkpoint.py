"""Checkpoints in run storage: each rank's DeepSpeed files + its own state, committed by a marker.

    <run>/checkpoints/step_00000050/
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt   (DeepSpeed)
        rank_R.pt            loader position + RNG states of rank R
        trainer.json         step, tokens seen
        commit.json          written last by rank 0: every file's size and sha256

A checkpoint without commit.json (a save that was killed) is never restored from; old checkpoints are
removed only after a newer one is committed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch

from lamscale import storage
from lamscale.train import faults
from lamscale.train.commits import STEP_DIR, committed_steps
from lamscale.train.collectives import Collectives

TAG = "ckpt"  # DeepSpeed's sub-folder name inside each local staging dir


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointStore:
    def __init__(self, run_url: str, rank: int, world: int, keep_last: int, comm: Collectives):
        self.run_url, self.rank, self.world, self.keep_last, self.comm = run_url, rank, world, keep_last, comm
        self.fs, _ = storage.fs_for(run_url)

    def url(self, step: int) -> str:
        return storage.join(self.run_url, "checkpoints", f"step_{step:08d}")

    def save(self, engine, step: int, rank_state: dict, trainer_state: dict) -> None:
        """Collective: every rank calls it at the same step."""
        staging = tempfile.mkdtemp(prefix=f"lamscale-save-r{self.rank}-")
        try:
            engine.save_checkpoint(staging, tag=TAG, save_latest=False)
            folder = os.path.join(staging, TAG)
            torch.save({**rank_state, "rng": rng_state()}, os.path.join(folder, f"rank_{self.rank}.pt"))
            if self.rank == 0:
                with open(os.path.join(folder, "trainer.json"), "w") as f:
                    json.dump(trainer_state, f)
            files = {}
            for name in sorted(os.listdir(folder)):
                local = os.path.join(folder, name)
                storage.upload(local, storage.join(self.url(step), name))
                files[name] = {"bytes": os.path.getsize(local), "sha256": _sha256(local)}
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        everyone = self.comm.gather(files, self.world)  # doubles as the barrier: all uploads are done
        faults.maybe_kill("before_commit", step, self.rank)
        if self.rank == 0:
            manifest = {"step": step, "world_size": self.world, "files": {k: v for f in everyone for k, v in f.items()}}
            storage.write_bytes(storage.join(self.url(step), "commit.json"), json.dumps(manifest, indent=1).encode())
            self._prune(step)
        self.comm.barrier()

    def _prune(self, newest: int) -> None:
        steps = committed_steps(self.run_url)
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            storage.remove_tree(self.url(step))
        # uncommitted leftovers older than the newest commit are dead saves
        root = storage.fs_for(storage.join(self.run_url, "checkpoints"))[1]
        self.fs.invalidate_cache()
        for entry in storage.retry(lambda: self.fs.ls(root, detail=False), f"list {root}"):
            m = STEP_DIR.search(entry.rstrip("/"))
            if m and int(m.group(1)) < newest and int(m.group(1)) not in steps:
                storage.remove_tree(self.url(int(m.group(1))))

    def load(self, engine, step: int) -> tuple[dict, dict]:
        """Restore engine + this rank's state from committed `step`; returns (rank_state, trainer_state)."""
        url = self.url(step)
        manifest = json.loads(storage.read_bytes(storage.join(url, "commit.json")))
        if manifest["world_size"] != self.world:
            raise RuntimeError(f"{url}: saved with {manifest['world_size']} workers, this run has {self.world}")
        mine = [n for n in manifest["files"] if not n.startswith(("zero_pp_rank_", "rank_"))
                or n.startswith((f"zero_pp_rank_{self.rank}_", f"rank_{self.rank}."))]
        staging = tempfile.mkdtemp(prefix=f"lamscale-load-r{self.rank}-")
        try:
            folder = os.path.join(staging, TAG)
            os.makedirs(folder)
            for name in mine:
                local, remote = os.path.join(folder, name), storage.join(url, name)
                storage.download(remote, local)
                if _sha256(local) != manifest["files"][name]["sha256"]:
                    raise RuntimeError(f"{remote}: sha256 does not match commit.json (corrupt checkpoint)")
            engine.load_checkpoint(staging, tag=TAG)
            rank_state = torch.load(os.path.join(folder, f"rank_{self.rank}.pt"), weights_only=True)
            with open(os.path.join(folder, "trainer.json")) as f:
                trainer_state = json.load(f)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        set_rng_state(rank_state.pop("rng"))
        return rank_state, trainer_state
