"""Write samples into WebDataset tar shards on any fsspec URL, with sizes and sha256 for the manifest."""
from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable

import webdataset as wds
from tqdm import tqdm

from lamscale import storage
from lamscale.data.schema import SCHEMA_VERSION, MomentSample, encode


def write_shards(samples: Iterable[MomentSample], total: int, out_url: str, split: str, n_shards: int) -> dict:
    """Spread `total` samples evenly over `n_shards` shards named `{split}-{i:06d}.tar`."""
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
