"""Shared fixtures: the repo root, the embedded sample shards, a real SeaweedFS server."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # for tests/helpers.py and tests/seaweed.py


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_shards() -> Path:
    """The embedded sample's shards (generated on first use, like `lamscale train` does)."""
    from lamscale.cluster.launch import SAMPLE_DIR, _ensure_sample
    from lamscale.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    _ensure_sample(cfg)
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 with a bucket `lamscale-test`."""
    from seaweed import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.make_bucket("lamscale-test")
    yield server
    server.stop()
