"""Static checks of the deployment files under infra/ (nothing is built, applied or deployed here).

Every YAML file must parse; every KubeRay RayJob must run a job script that exists with a config that
validates (overrides included) on a cluster big enough for it; credentials may only arrive through
Secret references; the GPU job must ask for GPUs; the Ray cluster launcher config must satisfy Ray's
own schema; and the image must install the project and run as a non-root user.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import MetaTrainConfig, PretrainConfig, TuneConfig, load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
CLUSTER_YAML = INFRA / "cluster" / "stamp-cluster.yaml"
SECRETS_YAML = KUBERAY / "secret.example.yaml"

JOB_MODELS: dict[str, type] = {"pretrain.py": PretrainConfig, "meta_train.py": MetaTrainConfig, "tune.py": TuneConfig}
RAYJOB_FILES = {
    "rayjob-pretrain.yaml": "pretrain.py",
    "rayjob-meta-train.yaml": "meta_train.py",
    "rayjob-tune.yaml": "tune.py",
    "rayjob-meta-train-gpu.yaml": "meta_train.py",
}
GPU_RAYJOB = "rayjob-meta-train-gpu.yaml"
GPU_CONFIG = "jobs/configs/meta_train_resnet18_gpu.yaml"
SECRET_NAME = "stamp-credentials"
CONFIGMAP_NAME = "stamp-endpoints"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_KEYS = ("STAMP_S3_ENDPOINT", "STAMP_BUCKET", "MLFLOW_TRACKING_URI")

# Variable names whose value is a credential: such a variable must never carry an inline value.
SECRET_NAME_RE = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|KEY_ID|PRIVATE_KEY|CREDENTIAL|API_KEY", re.I)
# Values that look like credentials wherever they appear in infra/ (files are scanned as text).
CREDENTIAL_VALUE_RES = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@", re.I),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
}
PLACEHOLDER_RE = re.compile(r"REPLACE|CHANGE[_-]?ME|PLACEHOLDER|^<.*>$|^\$\{?[A-Z_]+\}?$", re.I)


# ------------------------------------------------------------------------------------ helpers


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_all(path: Path) -> list[Any]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _yaml_files() if p.is_relative_to(KUBERAY) for d in _load_all(p)]


def _rayjob(name: str) -> dict[str, Any]:
    docs = _load_all(KUBERAY / name)
    assert len(docs) == 1, f"{name}: expected exactly one document, got {len(docs)}"
    return docs[0]


def _pod_specs(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, pod spec) for the head group and every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    yield "head", head, head["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("2", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _entrypoint(job: dict[str, Any]) -> tuple[Path, Path, list[str]]:
    """(job script, config file, overrides) of a RayJob's `python jobs/<x>.py --config <y> [k=v]`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3"), f"entrypoint must start with python: {argv}"
    script = argv[1]
    assert script.startswith("jobs/") and script.endswith(".py"), f"entrypoint script {script!r} is not jobs/<job>.py"
    rest = argv[2:]
    assert "--config" in rest, f"entrypoint has no --config: {argv}"
    i = rest.index("--config")
    config = rest[i + 1]
    overrides = rest[:i] + rest[i + 2 :]
    assert all("=" in o and not o.startswith("-") for o in overrides), f"unexpected entrypoint words: {overrides}"
    return REPO / script, REPO / config, overrides


def _worker_slots(job: dict[str, Any], cpus_per_worker: float, use_gpu: bool) -> int:
    """How many Ray Train workers (cpus_per_worker CPUs, 1 GPU if use_gpu) fit on the worker pods."""
    slots = 0
    for name, group, pod in _pod_specs(job):
        container = pod["containers"][0]
        limits = container["resources"]["limits"]
        params = group.get("rayStartParams") or {}
        cpus = _quantity(params.get("num-cpus", limits["cpu"]))
        gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        per_pod = math.floor(cpus / cpus_per_worker + 1e-9)
        if use_gpu:
            per_pod = min(per_pod, math.floor(gpus))
        replicas = 1 if name == "head" else int(group.get("replicas", group.get("minReplicas", 0)))
        slots += per_pod * replicas
    return slots


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines are removed even inside a continuation
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------------- all files


def test_expected_files_exist() -> None:
    expected = [INFRA / "README.md", DOCKERFILE, DOCKERIGNORE, SECRETS_YAML, CLUSTER_YAML]
    expected += [KUBERAY / name for name in RAYJOB_FILES]
    missing = [str(p.relative_to(REPO)) for p in expected if not p.is_file()]
    assert not missing, f"missing infra files: {missing}"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
        if path.is_relative_to(KUBERAY):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path}: Kubernetes object without {key}"
            assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_every_rayjob_file_is_checked() -> None:
    """A new RayJob manifest must be added to RAYJOB_FILES (so its entrypoint is validated)."""
    found = {p.name for p, d in _k8s_docs() if d.get("kind") == "RayJob"}
    assert found == set(RAYJOB_FILES), f"RayJob manifests {sorted(found)} != checked {sorted(RAYJOB_FILES)}"


# ----------------------------------------------------------------------------------- RayJobs


@pytest.fixture(scope="module")
def endpoints() -> dict[str, Any]:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _load_all(SECRETS_YAML)}
    assert ("Secret", SECRET_NAME) in docs, f"{SECRETS_YAML.name} defines no Secret {SECRET_NAME}"
    assert ("ConfigMap", CONFIGMAP_NAME) in docs, f"{SECRETS_YAML.name} defines no ConfigMap {CONFIGMAP_NAME}"
    return {"secret": docs[("Secret", SECRET_NAME)], "configmap": docs[("ConfigMap", CONFIGMAP_NAME)]}


def test_secret_and_configmap_examples(endpoints: dict[str, Any]) -> None:
    secret, configmap = endpoints["secret"], endpoints["configmap"]
    values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
    for key in SECRET_KEYS:
        assert key in values, f"Secret {SECRET_NAME} has no key {key}"
    for key, value in values.items():
        assert PLACEHOLDER_RE.search(str(value)), (
            f"Secret {SECRET_NAME} key {key} is not a placeholder: real credentials must never be committed"
        )
    data = configmap.get("data") or {}
    for key in ENDPOINT_KEYS:
        assert key in data, f"ConfigMap {CONFIGMAP_NAME} has no key {key}"
    for key in data:
        assert not SECRET_NAME_RE.search(key), f"ConfigMap {CONFIGMAP_NAME} holds {key}: credentials belong in the Secret"


@pytest.mark.parametrize("name", sorted(RAYJOB_FILES))
def test_rayjob_shape(name: str) -> None:
    job = _rayjob(name)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: the RayCluster must go away after the job"
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"], f"{name}: head has no container"
    assert cluster["workerGroupSpecs"], f"{name}: no worker group"
    ray_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray["))
    assert str(cluster["rayVersion"]) == ray_pin.split("==")[1], f"{name}: rayVersion differs from pyproject ({ray_pin})"
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    workdir = next(a for i, a in _dockerfile_instructions() if i == "WORKDIR")
    assert runtime_env.get("working_dir") == workdir, (
        f"{name}: runtimeEnvYAML working_dir must be the image's WORKDIR ({workdir}) so `python jobs/...` resolves"
    )


@pytest.mark.parametrize("name", sorted(RAYJOB_FILES))
def test_rayjob_entrypoint_runs_an_existing_job_with_a_valid_config(name: str, endpoints: dict[str, Any]) -> None:
    job = _rayjob(name)
    script, config, overrides = _entrypoint(job)
    assert script.parent == REPO / "jobs" and script.is_file(), f"{name}: {script} does not exist"
    assert script.name == RAYJOB_FILES[name], f"{name}: runs {script.name}, expected {RAYJOB_FILES[name]}"
    assert config.parent == REPO / "jobs" / "configs" and config.is_file(), f"{name}: config {config} does not exist"
    cfg = load_config(config, overrides, JOB_MODELS[script.name])  # raises ConfigError naming the bad key

    # Multi-node Ray Train needs shared storage, in the bucket the ConfigMap points at.
    storage = cfg.storage_path
    assert storage and storage.startswith("s3://"), f"{name}: storage_path must be s3://... on a cluster, got {storage!r}"
    bucket = endpoints["configmap"]["data"]["STAMP_BUCKET"]
    assert storage.split("/")[2] == bucket, f"{name}: storage_path bucket differs from STAMP_BUCKET ({bucket})"

    # The worker groups must hold every Ray Train worker the config asks for, or the job waits forever.
    if isinstance(cfg, TuneConfig):
        scaling, concurrent = cfg.meta_train.scaling, cfg.max_concurrent_trials
    else:
        scaling, concurrent = cfg.scaling, 1
    needed = scaling.num_workers * concurrent
    slots = _worker_slots(job, scaling.cpus_per_worker, scaling.use_gpu)
    assert slots >= needed, (
        f"{name}: the cluster fits {slots} Ray Train workers of {scaling.cpus_per_worker} CPU(s)"
        f"{' + 1 GPU' if scaling.use_gpu else ''}, the config needs {needed}"
    )


@pytest.mark.parametrize("name", sorted(RAYJOB_FILES))
def test_rayjob_pods(name: str) -> None:
    job = _rayjob(name)
    for group, _, pod in _pod_specs(job):
        where = f"{name} {group}"
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: runAsNonRoot must be true"
        for container in pod["containers"]:
            assert container.get("image"), f"{where}: container without image"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in resources.get(kind, {}), f"{where}: resources.{kind}.{res} missing"
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where

            config_maps = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
            assert CONFIGMAP_NAME in config_maps, f"{where}: no envFrom configMapRef {CONFIGMAP_NAME}"
            env = {e["name"]: e for e in container.get("env", [])}
            for key in SECRET_KEYS:
                ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") == SECRET_NAME and ref.get("key") == key, (
                    f"{where}: {key} must come from secretKeyRef {SECRET_NAME}/{key}"
                )


def test_gpu_rayjob_requests_gpus() -> None:
    job = _rayjob(GPU_RAYJOB)
    _, config, overrides = _entrypoint(job)
    assert config == REPO / GPU_CONFIG, f"{GPU_RAYJOB} must run {GPU_CONFIG}"
    assert load_config(config, overrides, MetaTrainConfig).scaling.use_gpu is True
    gpu_groups = [
        group["groupName"]
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
        if _quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
        and _quantity(c["resources"].get("requests", {}).get("nvidia.com/gpu", 1)) >= 1
    ]
    assert gpu_groups, f"{GPU_RAYJOB}: no worker group requests nvidia.com/gpu"


@pytest.mark.parametrize("name", sorted(set(RAYJOB_FILES) - {GPU_RAYJOB}))
def test_cpu_rayjobs_request_no_gpus(name: str) -> None:
    job = _rayjob(name)
    script, config, overrides = _entrypoint(job)
    cfg = load_config(config, overrides, JOB_MODELS[script.name])
    scaling = cfg.meta_train.scaling if isinstance(cfg, TuneConfig) else cfg.scaling
    assert scaling.use_gpu is False, f"{name}: a CPU RayJob runs a config with use_gpu: true"
    for _, _, pod in _pod_specs(job):
        for c in pod["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), f"{name}: CPU job requests a GPU"


# ------------------------------------------------------------------------------- credentials


def test_no_inline_credentials_in_kubernetes_objects() -> None:
    for path, doc in _k8s_docs():
        if doc.get("kind") == "Secret":
            continue  # its values are checked to be placeholders above
        for where, node in _walk(doc):
            if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
                # An env entry: a credential variable must be a reference, never a value.
                if SECRET_NAME_RE.search(str(node["name"])):
                    assert "value" not in node and "secretKeyRef" in node.get("valueFrom", {}), (
                        f"{path.name}: {where} sets {node['name']} inline; use valueFrom.secretKeyRef"
                    )
            if isinstance(node, dict) and doc.get("kind") == "ConfigMap" and where == "data":
                bad = [k for k in node if SECRET_NAME_RE.search(k)]
                assert not bad, f"{path.name}: ConfigMap holds credentials {bad}"


def test_no_credential_values_anywhere_in_infra() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        for what, regex in CREDENTIAL_VALUE_RES.items():
            match = regex.search(text)
            assert match is None, f"{path.relative_to(REPO)} contains what looks like a {what}"
        # KEY=value / KEY: value assignments of credential variables must be references or placeholders.
        for m in re.finditer(r"\b([A-Z][A-Z0-9_]*)\s*(?:=|:)\s*[\"']?([^\s\"'#]+)", text):
            name, value = m.group(1), m.group(2)
            if SECRET_NAME_RE.search(name) and not name.endswith(("_FILE", "_PATH")):
                ok = (
                    PLACEHOLDER_RE.search(value)
                    or value.startswith(("$", "...", "<"))
                    or value in ("", "true", "false", "null", "{}", "[]")
                    or re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", value)  # a variable's name (key: AWS_ACCESS_KEY_ID)
                )
                assert ok, f"{path.relative_to(REPO)}: {name} is given a literal value"


# ------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config() -> None:
    docs = _load_all(CLUSTER_YAML)
    assert len(docs) == 1
    cfg = docs[0]
    head = cfg.get("head_node_type")
    types = cfg.get("available_node_types")
    assert head and isinstance(types, dict), "cluster launcher config needs head_node_type and available_node_types"
    assert head in types, f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"
    assert len(types) >= 2, "no worker node type"
    for name, node_type in types.items():
        assert "node_config" in node_type and "resources" in node_type, f"node type {name}: node_config/resources"

    # Ray's own schema (what `ray up` validates), read without importing ray.
    import jsonschema

    spec = find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))

    setup = " ; ".join(cfg.get("setup_commands", []))
    assert re.search(r"pip install \.", setup), "setup_commands must install the project with `pip install .`"
    mounts = cfg.get("file_mounts", {})
    assert "." in mounts.values(), "file_mounts must ship the repository (local path '.')"
    for local in mounts.values():
        assert ".stamp/credentials" not in str(local), "never ship the embedded stack's credentials file"
    init = " ; ".join(cfg.get("initialization_commands", []))
    assert "cluster.env" in init, "initialization_commands must load the env file written from the environment"
    for cmd_list in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("ray start" in c for c in cfg.get(cmd_list, [])), f"{cmd_list} must start Ray"


# ------------------------------------------------------------------------------------ image


def test_dockerfile_installs_the_project_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    words = [i for i, _ in instructions]
    args = dict.fromkeys(a.split("=", 1)[0] for i, a in instructions if i == "ARG")
    assert "BASE_IMAGE" in args and "TORCH_INDEX_URL" in args, "build args BASE_IMAGE and TORCH_INDEX_URL"
    base_default = next(a for i, a in instructions if i == "ARG" and a.startswith("BASE_IMAGE="))
    assert base_default == "BASE_IMAGE=python:3.11-slim"
    assert next(a for i, a in instructions if i == "FROM") == "${BASE_IMAGE}"

    workdirs = [a for i, a in instructions if i == "WORKDIR"]
    assert workdirs == ["/app"], f"WORKDIR must be /app, got {workdirs}"
    copied = {src for i, a in instructions if i == "COPY" for src in a.split()[:-1] if not src.startswith("--")}
    for needed in ("stamp_core", "pipeline", "jobs", "pyproject.toml", "README.md"):
        assert needed in copied, f"Dockerfile does not COPY {needed}"
        assert (REPO / needed).exists(), f"COPY source {needed} does not exist in the repository"

    runs = [a for i, a in instructions if i == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|;|$)", r) for r in runs), "the project must be installed with `pip install .`"
    assert any("TORCH_INDEX_URL" in r and "--index-url" in r for r in runs), "torch must come from TORCH_INDEX_URL"

    users = [a for i, a in instructions if i == "USER"]
    assert users, "the image must set a USER"
    final_user = users[-1].split(":")[0]
    resolved = {"${APP_UID}": "1000", "$APP_UID": "1000"}.get(final_user, final_user)
    assert resolved not in ("root", "0"), f"final USER {users[-1]} is root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER must follow the last RUN"
    uid_default = next(a for i, a in instructions if i == "ARG" and a.startswith("APP_UID="))
    assert uid_default.split("=", 1)[1] != "0"

    for i, a in instructions:
        if i == "ENV":
            assert not SECRET_NAME_RE.search(a), f"ENV sets a credential: {a}"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".stamp/credentials", ".stamp/stack.json", ".venv/bin/python", ".git/config",
                 "pipeline/__pycache__/config.cpython-311.pyc", "mlruns/0/meta.yaml"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker build context"
    for path in ("pyproject.toml", "README.md", "stamp_core/pruner.py", "pipeline/config.py", "jobs/meta_train.py",
                 "jobs/configs/meta_train_small.yaml"):
        assert not _dockerignored(path, patterns), f"{path} is excluded from the build context but the image needs it"


def test_readme_documents_the_submission_command() -> None:
    text = (INFRA / "README.md").read_text()
    assert "ray job submit --working-dir . -- python jobs/" in text
    for name in [*RAYJOB_FILES, "secret.example.yaml", "stamp-cluster.yaml", "Dockerfile"]:
        assert name in text, f"infra/README.md does not mention {name}"
