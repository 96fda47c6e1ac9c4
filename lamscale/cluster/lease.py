"""One writer per run: the driver that trains a run holds a lease file in its storage (local folder or
s3:// prefix) and refreshes it from a thread; a second driver on the same run refuses in one line, or
waits for a lease whose driver died until that driver's workers cannot write any more.

Object stores have no atomic create-if-absent through fsspec, so taking the lease is write, wait a
moment, read back: of two drivers that write at nearly the same time, both read the last write and
only its owner goes on. The wait (SETTLE_S) is longer than one read-then-write round trip, which is
the window in which a second writer could still miss the first one's lease.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

import psutil

from lamscale import storage

LEASE_FILE = "LEASE.json"
ACCESS_BUDGET_S = 5.0  # one lease read/write: a store that is down this long leaves the lease alone


def expiry_s() -> float:
    """A lease whose heartbeat is older than this is stale (LAMSCALE_LEASE_EXPIRY_S, default 30 s)."""
    return float(os.environ.get("LAMSCALE_LEASE_EXPIRY_S", "30"))


class LeaseHeld(ValueError):
    """Another live driver holds the run (a ValueError: `lamscale` prints it as one line, exit 2)."""


def _process_key(proc: psutil.Process) -> list:
    return [proc.pid, round(proc.create_time(), 2)]  # pid plus start time: a reused pid is another process


def _alive(key: list) -> bool:
    try:
        proc = psutil.Process(key[0])
        return round(proc.create_time(), 2) == key[1] and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, IndexError, TypeError):
        return False


def _ray_writers() -> list[list]:
    """The driver's raylet and Ray worker processes (`ray::…`): what may still write the run after the
    driver dies. Ray's dashboard and runtime-env agents (`ray::…Agent`) outlive a killed driver but write
    nothing of ours."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if (cmd.startswith("ray::") and "Agent" not in cmd.split(" ")[0]) or cmd.split(" ")[0].endswith("/raylet"):
                found.append(_process_key(child))
        except psutil.Error:
            continue
    return found


def read_lease(run_url: str) -> dict | None:
    """The lease record of the run at `run_url`, or None when nobody holds it."""
    url = storage.join(run_url, LEASE_FILE)
    for _ in range(3):
        try:
            if not storage.exists(url, ACCESS_BUDGET_S):
                return None
            return json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            return None
        except ValueError:  # caught mid-write (local files): read again
            time.sleep(0.1)
    return {"token": "?", "heartbeat": 0}  # unreadable: treat as stale


def lease_age_s(record: dict) -> float:
    return time.time() - float(record.get("heartbeat", 0))


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} (since {started})"


class RunLease:
    """The run lease of one driver; `acquire()` takes it or raises LeaseHeld, `release()` gives it back.

    `local_ray` (Ray started in-process): each heartbeat records the driver's Ray processes (raylet and
    workers, the ones that write the run), so a re-run on the same host after the driver was killed goes
    on as soon as those are gone instead of waiting for the lease to expire. On a cluster the workers run
    elsewhere: a re-run waits for the expiry.
    """

    def __init__(self, run_url: str, say: Callable[[str], None] = print, local_ray: bool = True):
        self.url, self.run_url, self.say = storage.join(run_url, LEASE_FILE), run_url, say
        self.expiry = expiry_s()
        self.heartbeat_s = max(0.5, self.expiry / 6)
        self.settle_s = 0.3 if storage.is_local(run_url) else 2.0
        me = psutil.Process()
        self.record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": me.pid,
                       "process": _process_key(me), "started": time.time(), "heartbeat": time.time(),
                       "local_ray": local_ray, "procs": []}
        self.held, self.lost = False, False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back --------------------------------------------------------------------

    def acquire(self) -> None:
        announced = False
        while True:
            current = read_lease(self.run_url)
            if current is not None and current.get("token") != self.record["token"] and not self._free(current):
                if not self._driver_died_here(current):
                    raise LeaseHeld(
                        f"{self.run_url} is being trained by {describe(current)}, heartbeat "
                        f"{max(0.0, lease_age_s(current)):.0f}s ago; wait for it to finish, or stop it (kill "
                        f"{current.get('pid')} on {current.get('host')}, or `lamscale stop JOB`) and run this again")
                if not announced:  # killed on this host: its workers may still be saving
                    self.say(f"[lamscale] waiting for the processes of the killed driver {describe(current)} to end "
                             f"(at most {self.expiry:.0f}s after its last heartbeat)")
                    announced = True
                time.sleep(1.0)
                continue
            if current is not None and current.get("token") not in (self.record["token"], "?"):
                why = (f"no heartbeat for {lease_age_s(current):.0f}s" if lease_age_s(current) >= self.expiry
                       else "it was killed and its Ray processes are gone")
                self.say(f"[lamscale] taking over the run lease of {describe(current)}: {why}")
            self._write()
            time.sleep(self.settle_s)
            confirmed = read_lease(self.run_url)
            if confirmed is not None and confirmed.get("token") == self.record["token"]:
                break
            # another driver wrote after us: its lease is fresh now, so the next round refuses
        self.held = True
        self._thread = threading.Thread(target=self._beat_loop, name="lamscale-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never raises: called on the way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + ACCESS_BUDGET_S + 1)
        if not self.held:
            return
        self.held = False
        outcome: dict = {}

        def remove() -> None:
            try:
                current = read_lease(self.run_url)
                if current is not None and current.get("token") == self.record["token"]:
                    fs, path = storage.fs_for(self.url)
                    fs.rm_file(path)
                outcome["done"] = True
            except Exception as e:  # the store is down: the lease expires by itself
                outcome["error"] = type(e).__name__

        # a store that accepts connections but does not answer holds each call up to botocore's 60 s read
        # timeout: the way out waits at most 2 × ACCESS_BUDGET_S of wall time for the store
        remover = threading.Thread(target=remove, name="lamscale-lease-release", daemon=True)
        remover.start()
        remover.join(2 * ACCESS_BUDGET_S)
        if "done" not in outcome:
            why = outcome.get("error", f"no answer in {2 * ACCESS_BUDGET_S:.0f}s")
            self.say(f"[lamscale] could not remove the run lease {self.url} ({why}); "
                     f"it expires {self.expiry:.0f}s after its last heartbeat")

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- heartbeat ---------------------------------------------------------------------------------

    def beat(self) -> None:
        """Refresh the heartbeat (and the recorded child processes), unless another driver took the lease."""
        current = read_lease(self.run_url)
        if current is not None and current.get("token") != self.record["token"]:
            if not self.lost:
                self.lost = True
                self.say(f"[lamscale] warning: the run lease was taken over by {describe(current)}; "
                         f"this driver no longer refreshes it")
            return
        self._write()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.lost:
                return
            try:
                self.beat()
            except Exception:  # a store outage: try again at the next beat; the run itself retries longer
                continue

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        if self.record["local_ray"]:
            self.record["procs"] = _ray_writers()
        data = json.dumps(self.record).encode()
        if storage.is_local(self.url):  # a reader never sees half a file
            path = storage.local_path(self.url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{self.record['token']}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs, path = storage.fs_for(self.url)
            storage.retry(lambda: fs.pipe_file(path, data), f"write {self.url}", ACCESS_BUDGET_S)

    # --- whose lease is it -------------------------------------------------------------------------

    def _free(self, record: dict) -> bool:
        """Stale, or its driver died on this host and every process it recorded is gone."""
        if lease_age_s(record) >= self.expiry:
            return True
        return bool(record.get("local_ray")) and self._driver_died_here(record) and \
            not any(_alive(p) for p in record.get("procs") or [])

    def _driver_died_here(self, record: dict) -> bool:
        if record.get("host") != self.record["host"] or not record.get("process"):
            return False
        return not _alive(record["process"])


def lease_state(run_url: str) -> str | None:
    """'running' when a driver holds a fresh lease on the run, else None."""
    record = read_lease(run_url)
    if record is None or lease_age_s(record) >= expiry_s():
        return None
    return "running"
