"""Shard URL patterns: expansion, absolute paths, existence. Free of torch and webdataset, so the driver's
checks (and a CLI error about a missing shard) answer before any heavy import."""
from __future__ import annotations

import braceexpand

from lamscale import storage

PIPE = "pipe:"


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def expand_urls(pattern: str) -> list[str]:
    """`dir/train-{000000..000003}.tar` (and comma- or space-separated lists) → absolute URLs.
    A `pipe:` pattern is one shell command (spaces included) with braces expanded."""
    if is_pipe(pattern.strip()):
        return list(braceexpand.braceexpand(pattern.strip()))
    urls = [u for part in pattern.replace(",", " ").split() for u in braceexpand.braceexpand(part)]
    return [storage.normalize(u) for u in urls]


def absolute_pattern(pattern: str) -> str:
    """The same shard pattern with local paths made absolute (Ray workers run in other folders)."""
    if is_pipe(pattern.strip()):
        return pattern.strip()
    return " ".join(storage.normalize(part) for part in pattern.replace(",", " ").split())


def check_shards(pattern: str, key: str) -> list[str]:
    """Raise StorageError naming the first shard URL that does not exist (`pipe:` commands are not probed)."""
    urls = expand_urls(pattern)
    if not urls:
        raise storage.StorageError(f"{key}: no shard URLs in {pattern!r}")
    for url in urls:
        if is_pipe(url):
            continue
        try:
            found = storage.exists(url, storage.PREFLIGHT_BUDGET_S)
        except Exception as e:  # unreachable endpoint, bad credentials…
            raise storage.StorageError(f"{key}: cannot reach shard {url}: {type(e).__name__}: {e}") from None
        if not found:
            raise storage.StorageError(f"{key}: shard not found: {url}")
    return urls
