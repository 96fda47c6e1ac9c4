"""One way to reach run storage and shards: fsspec URLs (local paths, file://, s3://…).

s3fs reads AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment, so an
S3-compatible server (SeaweedFS, MinIO) needs no code here. Filesystems are created lazily in each
process: s3fs instances are not fork-safe, and fsspec's instance cache is per process.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage is unreachable or a file is missing; the message names the URL."""


def normalize(url: str) -> str:
    """Local paths become absolute (workers may run in another directory); URLs stay as they are."""
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url)).rstrip("/")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url)


PREFLIGHT_BUDGET_S = 5.0  # checks before any worker starts: bad input should fail in seconds, not minutes


def retry_budget_s() -> float:
    """How long a storage call keeps retrying before the run gives up (LAMSCALE_STORAGE_RETRY_S)."""
    return float(os.environ.get("LAMSCALE_STORAGE_RETRY_S", "120"))


# network errors by class name (EndpointConnectionError has "Connect"); not "Endpoint": UnknownEndpointError is a
# bad config, an answer
TRANSIENT_WORDS = ("Connect", "Timeout", "HTTPClientError", "IncompleteRead", "Payload")


def transient(e: BaseException) -> bool:
    """Errors a later attempt may not see (refused or reset connections, timeouts, 5xx and throttling answers,
    which s3fs turns into OSError); a missing file, a refusal or missing credentials are answers, not outages."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (OSError, TimeoutError)):
        return True
    # botocore/aiohttp network errors are not all OSError subclasses (a dropped connection mid-read, a truncated
    # body); NoCredentialsError & co. are answers. Matched by their classes' names, the bases included.
    return any(cls.__module__.split(".")[0] in ("botocore", "aiohttp", "aiobotocore") and
               any(word in cls.__name__ for word in TRANSIENT_WORDS) for cls in type(e).__mro__)


# One botocore attempt per S3 call: our retry loops (here and the shard reader's) own the retries, so their
# budgets are wall time. botocore's own retries of a refused connection made a 3 s budget take 7 s and a
# lease release 19.5 s. Throttling (503 SlowDown) is still retried: by s3fs a few times, then by our loops.
# A user's own fsspec config for s3 (config_kwargs.retries) is kept.
fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {}).setdefault("retries", {"max_attempts": 1})


def retry(fn: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff (0.5 s doubling, at most
    8 s apart) for up to `budget_s` seconds, so a store that restarts does not end the run.

    With the run's budget (no `budget_s`), the first retry prints one line on stderr, so a store that is
    down is not two silent minutes; short pre-flight budgets stay quiet (their error line follows soon)."""
    announce = budget_s is None
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline, delay, tries = time.monotonic() + budget, 0.5, 0
    while True:
        try:
            return fn()
        except Exception as e:
            tries += 1
            if not transient(e) or time.monotonic() + delay > deadline:
                first = str(e).splitlines()[0] if str(e) else ""
                why = f"gave up after {tries} tries in {budget:.0f}s: " if transient(e) else ""
                raise StorageError(f"{what}: {why}{type(e).__name__}: {first}") from e
            if announce and tries == 1:
                print(f"[lamscale] retrying {what} for up to {budget:.0f}s: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def check_writable(url: str) -> None:
    """Create `url` if needed and write/delete a probe file, or raise StorageError naming it."""
    try:
        fs, path = fs_for(url)
        fs.makedirs(path, exist_ok=True)
        probe = join(path, f".lamscale-probe-{os.getpid()}-{time.monotonic_ns()}")  # two drivers may probe at once
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # any failure here means the run could not save anything
        raise StorageError(f"run storage {url!r} is not writable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def upload(local: str, url: str) -> None:
    fs, path = fs_for(url)

    def _put() -> None:
        if is_local(url):
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.put_file(local, path)

    retry(_put, f"upload {url}")


def download(url: str, local: str) -> None:
    fs, path = fs_for(url)
    retry(lambda: fs.get_file(path, local), f"download {url}")


def remove_tree(url: str) -> None:
    """Delete everything under `url`, including the empty "directory" entry some S3 servers keep."""
    fs, path = fs_for(url)
    retry(lambda: fs.rm(path, recursive=True), f"remove {url}")
    if not is_local(url):
        remove_file(url, missing_ok=True)
    fs.invalidate_cache()


def remove_file(url: str, missing_ok: bool = False) -> None:
    """Delete one file; with `missing_ok`, one that is not there is not an error (one call, no look-up first)."""
    fs, path = fs_for(url)

    def _remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    retry(_remove, f"remove {url}")


def exists(url: str, budget_s: float | None = None) -> bool:
    fs, path = fs_for(url)
    return retry(lambda: fs.exists(path), f"look up {url}", budget_s)


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    return retry(lambda: fs.cat_file(path), f"read {url}")


def write_bytes(url: str, data: bytes) -> None:
    fs, path = fs_for(url)

    def _write() -> None:
        if is_local(url):
            fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)

    retry(_write, f"write {url}")
