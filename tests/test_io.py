"""The storage layer: one request per object read, through a real S3 API on loopback."""

from __future__ import annotations

import fsspec
import pytest

from segpipe.io import read_bytes
from tests.faultproxy import FaultPlan, fault_proxy


def test_reading_an_object_is_one_get(s3_env: str) -> None:
    fs = fsspec.filesystem("s3")
    fs.makedirs("segpipe-io", exist_ok=True)
    fs.pipe_file("segpipe-io/photo.jpg", b"\xff\xd8" + bytes(range(256)) * 100)
    with fault_proxy(s3_env, FaultPlan(enabled=False)) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "skip_instance_cache": True}
        data = read_bytes("s3://segpipe-io/photo.jpg", **options)
        assert data == fs.cat_file("segpipe-io/photo.jpg")
        assert proxy.requests == [("GET", "/segpipe-io/photo.jpg")]
        proxy.requests.clear()
        with pytest.raises(FileNotFoundError):
            read_bytes("s3://segpipe-io/missing.jpg", **options)
        assert [method for method, _ in proxy.requests] == ["GET"]
