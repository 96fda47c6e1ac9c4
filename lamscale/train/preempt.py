"""Preemption: a SIGTERM to the driver becomes a stop request in run storage; every rank agrees on it
at the same step boundary (a collective), saves a checkpoint and returns.

Ray Train runs the training function off the worker's main thread, where no signal handler can be
installed, so the driver (whose main thread can) is the one that listens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lamscale import storage

if TYPE_CHECKING:  # the driver imports this module for the stop file: it needs no torch
    from lamscale.train.collectives import Collectives

STOP_FILE = "STOP_REQUESTED"


def request_stop(run_url: str) -> None:
    storage.write_bytes(storage.join(run_url, STOP_FILE), b"SIGTERM\n")


def clear_stop(run_url: str) -> None:
    storage.remove_file(storage.join(run_url, STOP_FILE), missing_ok=True)


class StopFlag:
    """Rank 0 looks for the stop request; an all-reduce makes every rank see the same answer."""

    def __init__(self, run_url: str, rank: int, comm: Collectives):
        self.url, self.rank, self.comm = storage.join(run_url, STOP_FILE), rank, comm

    def agreed(self) -> bool:
        return self.comm.any(self.rank == 0 and storage.exists(self.url))
