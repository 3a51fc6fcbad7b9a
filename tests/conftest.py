from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import moto_server

FAKE_KEY_ID = "segpipe-test-key-id"
FAKE_SECRET = "segpipe-test-secret-never-logged"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS provider chain at the loopback server, with fake credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    fsspec.filesystem("s3").clear_instance_cache()
    return s3_endpoint
