from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from segpipe.core.fingerprints import CACHE_ENV
from segpipe.tools.s3local import loopback_s3_env

FAKE_KEY_ID = "segpipe-test-key-id"
FAKE_SECRET = "segpipe-test-secret-never-logged"
REPO = Path(__file__).resolve().parents[1]


def run_isolated(argv: Sequence[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """A command in its own process, from the repository root, without this environment's
    cluster address or cloud credentials (it starts its own S3 server and Ray runtime); it
    must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session", autouse=True)
def fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This session's own cache of checked weights (:mod:`segpipe.core.fingerprints`), in the
    environment the job runs and their child processes inherit: the first run fills it."""
    before = os.environ.get(CACHE_ENV)
    path = tmp_path_factory.mktemp("segpipe-cache")
    os.environ[CACHE_ENV] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session, stopped at its end.

    The standard AWS provider chain is pointed at it through the environment, before any Ray
    runtime starts, so that Ray's workers inherit the same settings.
    """
    credentials = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with loopback_s3_env(credentials) as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint: str) -> str:
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    return s3_endpoint


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """One embedded Ray runtime for the in-process pipeline tests, with the CPU slots the job
    gives an embedded Ray (segpipe.job.pipeline.embedded_ray_cpus)."""
    import ray

    from segpipe.job.pipeline import EMBEDDED_RAY_SYSTEM_CONFIG, embedded_ray_cpus

    ray.init(
        num_cpus=embedded_ray_cpus(),
        include_dashboard=False,
        object_store_memory=1_500_000_000,
        _system_config=EMBEDDED_RAY_SYSTEM_CONFIG,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random R50-FPN Mask R-CNN state dict (91 classes), saved by the tests."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("weights") / "maskrcnn-random.pt"
    torch.save(model.state_dict(), path)
    return path
