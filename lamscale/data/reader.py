"""Reading shards: open any URL (remote reads retry with backoff), tar members → samples, and bad data
either raised as one line naming shard and key (`on_error: raise`) or skipped and counted (`skip`).
"""
from __future__ import annotations

import io
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys

from lamscale import storage
from lamscale.data.schema import SampleError, decode
from lamscale.data.urls import is_pipe

SKIP_KINDS = ("samples", "shards")  # a corrupt sample; a shard cut short (the rest of it is lost)
COUNTED = (*SKIP_KINDS, "truncated")  # data events a stream counts: skips, and samples cut to the model's limits


class DataError(RuntimeError):
    """Shard data that cannot be read; the message is one line naming the shard (and key)."""


class CutShardError(DataError):
    """A tar that ends (or breaks) in the middle: everything after the named key is lost."""


@dataclass(frozen=True)
class ReadOptions:
    on_error: str = "raise"  # or "skip": drop the sample (or the rest of a truncated shard) and count it
    allow_pipe: bool = False  # `pipe:CMD` URLs run a shell command per shard
    retry_s: float = 120.0  # how long a remote read keeps retrying before it fails
    block_kib: int = 8192  # bytes fetched per remote range request


def refuse_pipe(urls: list[str], key: str, allowed: bool) -> None:
    """Raise DataError naming `key` when a `pipe:` URL is given but not allowed."""
    pipes = [u for u in urls if is_pipe(u)]
    if pipes and not allowed:
        raise DataError(f"{key}: {pipes[0]!r} is a pipe: URL, which runs a shell command; "
                        f"set data.allow_pipe=true to allow it")


class RetryingFile(io.RawIOBase):
    """A remote file read front to back; a failed read reopens it at the same byte and tries again,
    backing off 0.5 s, 1 s, 2 s … (capped at 8 s) for up to `retry_s` seconds."""

    def __init__(self, url: str, retry_s: float, block_kib: int):
        self.url, self.retry_s, self.block = url, retry_s, block_kib * 1024
        self.pos, self.file = 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        deadline, delay = time.monotonic() + self.retry_s, 0.5
        while True:
            try:
                if self.file is None:
                    fs, path = storage.fs_for(self.url)
                    self.file = fs.open(path, "rb", block_size=self.block)
                    self.file.seek(self.pos)
                data = self.file.read(len(buffer))
                buffer[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except Exception as e:  # noqa: BLE001 - sorted into transient or not just below
                self._drop()
                if not storage.transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise storage.StorageError(f"{self.url}: still failing after {self.retry_s:.0f} s of retries: "
                                               f"{type(e).__name__}: {_line(e)}") from None
                print(f"[lamscale] {self.url}: read failed at byte {self.pos} ({type(e).__name__}); "
                      f"retrying in {delay:.1f} s", file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(2 * delay, 8.0)

    def _drop(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass
        self.file = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, options: ReadOptions):
    if is_pipe(url):
        refuse_pipe([url], "data", options.allow_pipe)
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if storage.is_local(url):
        return open(storage.local_path(url), "rb")
    return RetryingFile(url, options.retry_s, options.block_kib)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def tar_members(url: str, options: ReadOptions) -> Iterator[dict]:
    """Regular files of the tar at `url` as {fname, data, __url__}; a cut or corrupt tar raises DataError
    naming the shard and the sample key it stopped in."""
    last = None
    stream = open_shard(url, options)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            while True:
                info = tar.next()
                if info is None:
                    return
                last = info.name
                if info.isreg():
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                tar.members = []  # streaming: keep no index of what was read
    except (tarfile.TarError, EOFError) as e:
        key = base_plus_ext(last)[0] if last else None
        where = f"in sample {key!r}" if key else "before its first sample"
        raise CutShardError(f"{url}: truncated or corrupt tar {where} ({type(e).__name__}: {_line(e)})") from None
    finally:
        stream.close()


SkipHook = Callable[[str, str], None]  # (kind, one-line message)


Decode = Callable[[dict], Any]  # raw members → a sample (SampleError when it cannot)


def shard_samples(url: str, options: ReadOptions, on_skip: SkipHook, decode: Decode = decode) -> Iterator[Any]:
    """Decoded samples of one shard, bad ones raised or skipped per `options.on_error`."""
    try:
        for raw in group_by_keys(tar_members(url, options)):
            try:
                yield decode(raw)
            except SampleError as e:
                if options.on_error != "skip":
                    raise DataError(_line(e)) from None
                on_skip("samples", _line(e))
    except CutShardError as e:
        if options.on_error != "skip":
            raise
        on_skip("shards", str(e))


def read_samples(urls: list[str], options: ReadOptions, on_skip: SkipHook | None = None,
                 decode: Decode = decode) -> Iterator[Any]:
    for url in urls:
        yield from shard_samples(url, options, on_skip or print_skip, decode)


def print_skip(kind: str, message: str) -> None:
    if kind == "truncated":
        print(f"[lamscale] truncated: {message}", file=sys.stderr, flush=True)
        return
    what = "rest of shard" if kind == "shards" else "sample"
    print(f"[lamscale] skipped ({what}): {message}", file=sys.stderr, flush=True)
