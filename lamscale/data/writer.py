"""Write samples into WebDataset tar shards on any fsspec URL, with sizes and sha256 for the manifest."""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import TYPE_CHECKING, Iterable

from tqdm import tqdm

from lamscale import storage
from lamscale.data.schema import SCHEMA_VERSION, MomentSample, encode

if TYPE_CHECKING:  # webdataset loads torch: imported where a tar is written, not by the driver's sample check
    import webdataset as wds


def write_shards(samples: Iterable[MomentSample], total: int, out_url: str, split: str, n_shards: int) -> dict:
    """Spread `total` samples evenly over `n_shards` shards named `{split}-{i:06d}.tar`."""
    import webdataset as wds

    per_shard = -(-total // n_shards)
    shards, buf, writer, count = [], None, None, 0

    def close() -> None:
        writer.close()
        data = buf.getvalue()
        name = f"{split}-{len(shards):06d}.tar"
        storage.write_bytes(storage.join(out_url, name), data)
        shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    for sample in tqdm(samples, total=total, desc=f"{split} shards", unit="sample"):
        if writer is None:
            buf, count = io.BytesIO(), 0
            writer = wds.TarWriter(buf)
        writer.write(encode(sample))
        count += 1
        if count == per_shard:
            close()
            writer = None
    if writer is not None:
        close()
    first_last = f"{{{0:06d}..{len(shards) - 1:06d}}}"
    return {"pattern": f"{split}-{first_last}.tar", "samples": sum(s["samples"] for s in shards), "shards": shards}


def write_manifest(out_url: str, manifest: dict) -> None:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    storage.write_bytes(storage.join(out_url, "manifest.json"), json.dumps(manifest, indent=2).encode())


# --- shards rolled at a target size (the builders) ------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
               "G": 10**9, "GB": 10**9, "GIB": 2**30}
_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads members to blocks and the archive to whole records


def parse_size(text: str | int) -> int:
    """`256MB`, `1GiB`, `500k`, `4096` → bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--shard-size: {text!r} is not a size like 256MB, 1GiB or 500000")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _tar_bytes(raw: dict) -> int:
    """Bytes one sample adds to a tar: a header block per member plus its data padded to blocks."""
    return sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for k, v in raw.items() if not k.startswith("_"))


class ShardWriter:
    """Write encoded samples into `{split}-{i:06d}.tar` shards of at most `max_bytes` (a single larger
    sample gets a shard of its own) and at most `max_samples` samples.

    A shard is assembled in memory and stored with one retried write: object stores take whole objects,
    and a failed upload is simply repeated. The tar mtime is fixed so equal inputs give equal sha256.
    """

    def __init__(self, out_url: str, split: str, max_bytes: int = 256 * 10**6, max_samples: int | None = None):
        self.out_url, self.split, self.max_bytes, self.max_samples = out_url, split, max_bytes, max_samples
        self.shards: list[dict] = []
        self._buf: io.BytesIO | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def write(self, raw: dict) -> None:
        if self._tar is not None and (self._count == self.max_samples or self._would_overflow(raw)):
            self._close_shard()
        if self._tar is None:
            self._buf, self._count = io.BytesIO(), 0
            import webdataset as wds

            self._tar = wds.TarWriter(self._buf, mtime=0)
        self._tar.write(raw)
        self._count += 1

    def _would_overflow(self, raw: dict) -> bool:
        # the tar stream is buffered, so count from the archive's own offset; + 2 end-of-archive blocks
        end = self._tar.tarstream.offset + _tar_bytes(raw) + 2 * _TAR_BLOCK
        return -(-end // _TAR_RECORD) * _TAR_RECORD > self.max_bytes

    def _close_shard(self) -> None:
        self._tar.close()
        data = self._buf.getvalue()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        storage.write_bytes(storage.join(self.out_url, name), data)
        self.shards.append({"name": name, "samples": self._count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self._tar, self._buf = None, None

    def close(self) -> dict:
        """Flush the last shard; returns the split's manifest entry (pattern, samples, bytes, shards)."""
        if self._tar is not None:
            self._close_shard()
        pattern = f"{self.split}-{{000000..{len(self.shards) - 1:06d}}}.tar" if self.shards else None
        return {"pattern": pattern, "samples": sum(s["samples"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards), "shards": self.shards}
