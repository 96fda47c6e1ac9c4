"""lamscale/storage.py: which errors are outages (retried) and which are answers, and a retry budget that is
wall time against a store that refuses connections (botocore's own retries used to stretch 3 s to 7 s)."""
import time

import aiohttp
import botocore.exceptions as boto
import fsspec
import pytest

from conftest import free_ports
from lamscale import storage

OUTAGES = [boto.EndpointConnectionError(endpoint_url="http://s3"), boto.ConnectTimeoutError(endpoint_url="http://s3"),
           boto.ReadTimeoutError(endpoint_url="http://s3"), boto.ConnectionClosedError(endpoint_url="http://s3"),
           boto.ResponseStreamingError(error="reset"), boto.IncompleteReadError(actual_bytes=1, expected_bytes=2),
           aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("truncated"), aiohttp.ClientOSError(),
           ConnectionRefusedError(), TimeoutError(), OSError(16, "SlowDown (s3fs's EBUSY)")]
ANSWERS = [boto.NoCredentialsError(), boto.ParamValidationError(report="bad key"), FileNotFoundError("gone"),
           boto.UnknownEndpointError(service_name="s3", region_name="nowhere"),
           PermissionError("denied"), ValueError("bad")]


@pytest.mark.parametrize("error", OUTAGES, ids=lambda e: type(e).__name__)
def test_outages_are_transient(error):
    assert storage.transient(error)


@pytest.mark.parametrize("error", ANSWERS, ids=lambda e: type(e).__name__)
def test_answers_are_not_retried(error):
    assert not storage.transient(error)


def test_a_refused_store_gives_up_within_the_budget():
    """Nothing listens on the port: each call fails within a second (botocore's own retries made it 5-9 s), so
    our loop tries again after 0.5 s (and 1 s) and gives up before its next wait would pass the 3 s budget."""
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    fs = fsspec.filesystem("s3", key="k", secret="s", client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                           skip_instance_cache=True)
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"gave up after [2-9] tries in 3s: EndpointConnectionError"):
        storage.retry(lambda: fs.cat_file("bucket/file"), "read s3://bucket/file", budget_s=3.0)
    assert time.monotonic() - started < 6.0  # the budget, and one more call on a busy machine
