"""Cluster submission: `ray start` head + a worker that declares a GPU, `ray job submit`.

The worker's GPU is declared, not real: Ray schedules the model actors onto it (one GPU
each), and the actor, finding no CUDA device, runs on the CPU (`--device auto`). That
exercises the GPU scheduling path a real cluster takes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segpipe.analytics.query import connect
from segpipe.job.record import read_record
from segpipe.tools.s3local import free_port, stop_process
from segpipe.tools.samples import sample_image

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def ports(*names: str) -> list[str]:
    flags = []
    for name in names:
        flags += [f"--{name}", str(free_port())]
    return flags


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A two-node Ray cluster on loopback, shared by this module's tests; yields the dashboard
    address and the client env (whose RAY_GCS_ADDRESS names the cluster for a driver).

    Both `ray start --block` processes are stopped (with everything they started) at the end.
    """
    tmp_path = tmp_path_factory.mktemp("cluster")
    gcs_port, dashboard_port = free_port(), free_port()
    # Token authentication is on by default; clients send the token only in "token" mode.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain: stop at once
    # The cluster's own token, shared by its nodes and clients through the environment, so
    # the test needs no ~/.ray/auth_token (a fresh machine has none).
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"segpipe-ray-{os.getpid()}-{gcs_port}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
    per_node = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    head = [RAY, "start", "--head", "--port", str(gcs_port), "--num-cpus", "2",
            "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), *ports("ray-client-server-port"),
            *ports(*per_node), *common]  # fmt: skip
    worker = [RAY, "start", "--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "1",
              "--num-gpus", "1", *ports(*per_node), *common]  # fmt: skip
    logs = tmp_path / "ray-start.log"
    procs: list[subprocess.Popen[bytes]] = []
    with logs.open("wb") as log:
        try:
            procs.append(subprocess.Popen(head, env=env, stdout=log, stderr=log))
            address = f"http://127.0.0.1:{dashboard_port}"
            wait_for(lambda: _jobs_api_up(address, env), 120, "the head's Jobs API")
            procs.append(subprocess.Popen(worker, env=env, stdout=log, stderr=log))
            gcs = f"127.0.0.1:{gcs_port}"
            wait_for(lambda: _gpus(gcs, env) >= 1, 120, "the GPU worker to join")
            yield address, dict(env, RAY_GCS_ADDRESS=gcs)
        finally:
            for proc in reversed(procs):  # the worker first, while its head still answers
                stop_process(proc, timeout=60)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _jobs_api_up(address: str, env: dict[str, str]) -> bool:
    result = subprocess.run(
        [RAY, "job", "list", "--address", address], env=env, capture_output=True, timeout=60
    )
    return result.returncode == 0


def _gpus(gcs_address: str, env: dict[str, str]) -> float:
    code = "import ray, json; ray.init(); print(json.dumps(ray.cluster_resources()))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, RAY_ADDRESS=gcs_address),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        return 0
    return float(json.loads(result.stdout.strip().splitlines()[-1]).get("GPU", 0))


def test_job_submitted_to_a_cluster_with_a_gpu_worker(
    cluster: tuple[str, dict[str, str]], tmp_path: Path, random_checkpoint: Path
) -> None:
    address, env = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, size in enumerate([(120, 90), (80, 140), (100, 100)]):
        sample_image(60 + i, size).save(inputs / f"c{i}.png")
    (inputs / "zero.jpg").write_bytes(b"")
    output = tmp_path / "out"
    command = [
        RAY, "job", "submit", "--address", address, "--submission-id", "segpipe-test", "--",
        sys.executable, str(REPO / "jobs" / "segment.py"),
        "--input", str(inputs), "--output", str(output), "--run-id", "cluster",
        "--weights", str(random_checkpoint), "--min-size", "96", "--max-size", "160",
        "--max-detections", "5", "--batch-size", "1",
        # Both nodes run on this machine: its disk is shared by construction.
        "--local-paths-shared",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, "segpipe-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()

    record = read_record(str(output), "cluster")
    assert record["status"] == "succeeded"
    assert record["actors"]["gpus_per_actor"] == 1.0  # scheduled onto the GPU worker
    assert record["counts"]["images"] == 4 and record["counts"]["images_error"] == 1
    con = connect(str(output))
    assert con.execute("SELECT count(*) FROM images").fetchone() == (4,)
    zero = con.execute("SELECT error_code FROM images WHERE uri LIKE '%zero.jpg'").fetchone()
    assert zero == ("empty",)


def test_a_cluster_of_two_nodes_refuses_local_paths(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """Without --local-paths-shared, a driver joining a two-node cluster refuses a local
    output before it lists or writes anything, naming the path and the fix."""
    _, env = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    sample_image(70, (64, 48)).save(inputs / "a.png")
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "segpipe.cli", "run", "--input", str(inputs),
        "--output", str(output), "--run-id", "local", "--weights", "shapes",
    ]  # fmt: skip
    driver_env = dict(env, RAY_ADDRESS=env["RAY_GCS_ADDRESS"])
    result = subprocess.run(command, env=driver_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"--input {inputs} is a local path, and this Ray cluster has 2 nodes" in result.stderr
    assert "--local-paths-shared" in result.stderr
    assert not (output / "_runs" / "local.json").exists()  # nothing of the run was written
