"""k8s/: the manifests validate (the same check as `make lint`) and encode the job's contract."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
MULTI_NODE = K8S / "multi-node"
LEGACY_PYTORCHJOB = MULTI_NODE / "legacy" / "pytorchjob.yaml"


def _load_k8s_lint():
    """tools/k8s_lint.py, a development tool outside the cpt package."""
    spec = importlib.util.spec_from_file_location("k8s_lint", REPO / "tools" / "k8s_lint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


k8s_lint = _load_k8s_lint()


def resources(path: Path) -> list[dict[str, Any]]:
    return k8s_lint.load_documents(path)


def one(path: Path, kind: str) -> dict[str, Any]:
    [resource] = [document for document in resources(path) if document["kind"] == kind]
    return resource


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return one(K8S / "job.yaml", "Job")


@pytest.fixture(scope="module")
def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def test_manifests_validate_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("k8s validation must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert k8s_lint.lint_dir(K8S) == []
    assert k8s_lint.main([str(K8S)]) == 0


def test_linter_reports_problems(tmp_path: Path) -> None:
    job_text = (K8S / "job.yaml").read_text().replace("backoffLimit: 3", "backoffLimit: 3\n  retries: 5")
    (tmp_path / "job.yaml").write_text(job_text)
    pytorchjob_text = LEGACY_PYTORCHJOB.read_text()
    (tmp_path / "pytorchjob.yaml").write_text(
        pytorchjob_text.replace("- name: pytorch\n", "- name: trainer\n").replace("Worker:", "Workers:")
    )
    problems = k8s_lint.lint_dir(tmp_path)
    assert any("job.yaml: Job/cpt" in problem and "retries" in problem for problem in problems), problems
    assert any("no container named 'pytorch'" in problem for problem in problems), problems
    assert any("Workers: unknown replica type" in problem for problem in problems), problems
    assert k8s_lint.main([str(tmp_path)]) == 1


def test_kustomization_lists_the_single_gpu_resources() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    kinds = {document["kind"] for name in kustomization["resources"] for document in resources(K8S / name)}
    assert kinds == {"Job", "ConfigMap", "PersistentVolumeClaim"}, "the multi-node jobs stay out of the default"


def test_pod_failure_policy_follows_the_exit_codes(job: dict[str, Any], pod: dict[str, Any]) -> None:
    assert pod["restartPolicy"] == "Never", "podFailurePolicy requires restartPolicy: Never"
    actions_by_code: dict[int, str] = {}
    disruption_action = None
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In"
            assert rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
            for code in rule["onExitCodes"]["values"]:
                actions_by_code[code] = rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] == "DisruptionTarget":
                disruption_action = rule["action"]
    assert actions_by_code[EXIT_BAD_INPUT] == "FailJob"
    assert actions_by_code[EXIT_USAGE] == "FailJob"
    assert actions_by_code[EXIT_INTERRUPTED] == "Ignore", "an interrupted run resumes on retry"
    assert disruption_action == "Ignore", "eviction/preemption must not use up backoffLimit"
    assert 1 not in actions_by_code, "a crash counts toward backoffLimit"
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert job["spec"][key] > 0


def test_job_pod_is_a_locked_down_single_gpu_pod(pod: dict[str, Any]) -> None:
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for path in ("/data/corpus", "/models/base"):
        assert mounts[path].get("readOnly") is True
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert not mounts["/output"].get("readOnly")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a read-only root needs a writable /tmp"

    claims = {one_claim["metadata"]["name"] for one_claim in resources(K8S / "pvc.yaml")}
    used = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume}
    assert used <= claims


def test_job_runs_as_the_image_user(pod: dict[str, Any]) -> None:
    [user] = re.findall(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user


def test_configmap_keys_are_cli_env_vars(pod: dict[str, Any]) -> None:
    from cpt.cli import env_vars

    configmap = one(K8S / "configmap.yaml", "ConfigMap")
    assert set(configmap["data"]) <= set(env_vars()), "every ConfigMap key must be a variable the CLI reads"
    assert all(isinstance(value, str) for value in configmap["data"].values()), "ConfigMap values must be strings"
    assert configmap["data"]["CPT_CORPUS"] == "/data/corpus"
    assert configmap["data"]["CPT_BASE_MODEL"] == "/models/base"
    assert configmap["data"]["CPT_OUTPUT"] == "/output"
    [container] = pod["containers"]
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]


def test_image_tags_follow_the_package_version() -> None:
    [version] = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [image["newTag"] for image in kustomization["images"] if image["name"] == "cpt"] == [version]
    pytorchjob = one(LEGACY_PYTORCHJOB, "PyTorchJob")
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        for container in replica["template"]["spec"]["containers"]:
            assert container["image"] == f"cpt:{version}"


def test_pytorchjob_runs_torchrun_style_replicas() -> None:
    pytorchjob = one(LEGACY_PYTORCHJOB, "PyTorchJob")
    spec = pytorchjob["spec"]
    assert pytorchjob["apiVersion"] == "kubeflow.org/v1"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] >= 1
    gpus_per_pod = {
        replica["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for replica in spec["pytorchReplicaSpecs"].values()
    }
    assert gpus_per_pod == {int(spec["nprocPerNode"])}, "one process per GPU"


def test_pytorchjob_is_labelled_legacy() -> None:
    pytorchjob = one(LEGACY_PYTORCHJOB, "PyTorchJob")
    assert pytorchjob["metadata"]["labels"]["cpt/legacy"] == "true"
    assert "LEGACY" in LEGACY_PYTORCHJOB.read_text().splitlines()[0]


# ---- Kubeflow Trainer v2: the TrainJob and its runtime -----------------------------------------------


@pytest.fixture(scope="module")
def trainjob() -> dict[str, Any]:
    return one(MULTI_NODE / "trainjob.yaml", "TrainJob")


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    return one(MULTI_NODE / "runtime.yaml", "TrainingRuntime")


@pytest.fixture(scope="module")
def runtime_job(runtime: dict[str, Any]) -> dict[str, Any]:
    [job] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job


@pytest.fixture(scope="module")
def node_patch(trainjob: dict[str, Any]) -> dict[str, Any]:
    """The pod spec the TrainJob's runtimePatches put on every node."""
    [patch] = trainjob["spec"]["runtimePatches"]
    [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]["spec"]


def test_trainjob_runs_on_the_stock_torch_runtime_shape(trainjob: dict[str, Any], runtime: dict[str, Any], runtime_job) -> None:
    assert trainjob["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    ref = trainjob["spec"]["runtimeRef"]
    assert (ref["apiGroup"], ref["kind"], ref["name"]) == ("trainer.kubeflow.org", "TrainingRuntime", runtime["metadata"]["name"])
    # What the stock torch-distributed ClusterTrainingRuntime (v2.2) has: the torch ML policy (which sets
    # PET_*), one replicated job `node` marked as the trainer step, whose container is `node`.
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert runtime_job["name"] == "node"
    assert runtime_job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    [container] = runtime_job["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node"
    assert trainjob["spec"]["trainer"]["numNodes"] >= 2
    assert "numProcPerNode" not in trainjob["spec"]["trainer"], "auto: one process per GPU of resourcesPerNode"
    gpus = trainjob["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert trainjob["spec"]["trainer"]["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == gpus >= 1


def job_failure_message(exit_code: int | None, rule_index: int) -> str:
    """The Failed condition message of a Job whose podFailurePolicy matched (Kubernetes' job controller,
    pkg/controller/job/pod_failure_policy.go)."""
    if exit_code is None:
        return f"Pod ns/cpt-multi-node-0-1-abcde has condition DisruptionTarget matching FailJob rule at index {rule_index}"
    pod = "ns/cpt-multi-node-0-1-abcde"
    return f"Container node for pod {pod} failed with exit code {exit_code} matching FailJob rule at index {rule_index}"


def jobset_action(runtime: dict[str, Any], reason: str, message: str) -> str:
    """What JobSet does with a failed child Job: the first rule whose reasons and message patterns match,
    else RestartJobSet (counted toward maxRestarts)."""
    for rule in runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]:
        reasons = rule.get("onJobFailureReasons") or [reason]
        patterns = rule.get("onJobFailureMessagePatterns") or [".*"]
        if reason in reasons and any(re.search(pattern, message) for pattern in patterns):
            return rule["action"]
    return "RestartJobSet"


def test_trainjob_failure_policy_follows_the_exit_codes(runtime: dict[str, Any], runtime_job: dict[str, Any]) -> None:
    job_spec = runtime_job["template"]["spec"]
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "podFailurePolicy requires restartPolicy: Never"
    assert job_spec["backoffLimit"] == 0, "a static torchrun world cannot go on without a failed node"

    def pod_failure(exit_code: int | None) -> tuple[str, int] | None:
        """(action, rule index) of the Job's podFailurePolicy for an exit code (None: evicted)."""
        for index, rule in enumerate(job_spec["podFailurePolicy"]["rules"]):
            codes = rule.get("onExitCodes")
            if codes and exit_code is not None and exit_code in codes["values"]:
                assert codes["operator"] == "In" and codes["containerName"] == pod["containers"][0]["name"]
                return rule["action"], index
            conditions = rule.get("onPodConditions", [])
            if exit_code is None and {"type": "DisruptionTarget", "status": "True"} in conditions:
                return rule["action"], index
        return None

    def outcome(exit_code: int | None) -> str:
        matched = pod_failure(exit_code)
        if matched is None:  # counted toward backoffLimit 0: the Job fails with BackoffLimitExceeded
            return jobset_action(runtime, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        action, index = matched
        assert action == "FailJob"
        return jobset_action(runtime, "PodFailurePolicy", job_failure_message(exit_code, index))

    assert outcome(EXIT_BAD_INPUT) == "FailJobSet", "bad input: retrying cannot help"
    assert outcome(EXIT_USAGE) == "FailJobSet"
    assert outcome(EXIT_INTERRUPTED) == "RestartJobSetAndIgnoreMaxRestarts", "an interrupted run resumes, not counted"
    assert outcome(None) == "RestartJobSetAndIgnoreMaxRestarts", "eviction/preemption must not use up maxRestarts"
    assert outcome(EXIT_CRASH) == "RestartJobSet", "a crash is retried and counted"
    assert outcome(137) == "RestartJobSet", "an OOM kill is retried and counted"
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] > 0


def test_trainjob_pods_are_set_up_like_the_single_gpu_job(
    trainjob: dict[str, Any], runtime_job: dict[str, Any], node_patch: dict[str, Any], pod: dict[str, Any]
) -> None:
    """Same volumes, mounts, security context, ConfigMap and grace period as k8s/job.yaml."""
    [job_container] = pod["containers"]
    [patch_container] = node_patch["containers"]
    assert patch_container["name"] == "node" and "env" not in patch_container, "Trainer's webhook: env goes in trainer.env"

    assert node_patch["securityContext"] == pod["securityContext"]
    assert patch_container["securityContext"] == job_container["securityContext"]
    assert node_patch["tolerations"] == pod["tolerations"]

    def mounts(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
        by_name = {volume["name"]: volume for volume in volumes}
        return {
            mount["mountPath"]: (mount.get("readOnly", False), {k: v for k, v in by_name[mount["name"]].items() if k != "name"})
            for mount in container["volumeMounts"]
        }

    patched, single = mounts(patch_container, node_patch["volumes"]), mounts(job_container, pod["volumes"])
    assert set(patched) == set(single)
    for path in ("/data/corpus", "/models/base", "/output"):
        assert patched[path] == single[path], path
    assert patched["/dev/shm"][1]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in patched["/tmp"][1] and "emptyDir" in patched["/home/cpt"][1]

    runtime_pod = runtime_job["template"]["spec"]["template"]["spec"]
    [runtime_container] = runtime_pod["containers"]
    assert runtime_pod["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert runtime_container["envFrom"] == job_container["envFrom"]
    env = {variable["name"]: variable["value"] for variable in trainjob["spec"]["trainer"]["env"]}
    assert env["CPT_REQUIRE_GPU"] == "1"
    grace_seconds = runtime_pod["terminationGracePeriodSeconds"]
    assert int(env["PET_SHUTDOWN_TIMEOUT"]) < grace_seconds, "torchrun must give up before the kubelet kills"
    assert not set(env) & k8s_lint.RESERVED_TORCH_ENV
    assert trainjob["spec"]["activeDeadlineSeconds"] > 0


def test_trainjob_images_follow_the_package_version(trainjob: dict[str, Any], runtime_job: dict[str, Any]) -> None:
    [version] = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert trainjob["spec"]["trainer"]["image"] == f"cpt:{version}"
    assert runtime_job["template"]["spec"]["template"]["spec"]["containers"][0]["image"] == f"cpt:{version}"


def test_linter_knows_trainer_v2_rules(tmp_path: Path) -> None:
    """What Trainer v2.2's CRD schema and webhooks (and Kubernetes' Job validation) reject, the linter reports."""

    def trainer(job):
        return job["spec"]["trainer"]

    def node_pod(job):
        return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
            "spec"
        ]["template"]["spec"]

    def runtime_pod(runtime):
        return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]

    def rules(runtime):
        return runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]

    trainjob_cases = {  # v2.1's fields, v2.3's, and what the webhook refuses
        "numProcPerNode: 'auto' is not of type 'integer'": lambda job: trainer(job).update(numProcPerNode="auto"),
        "podTemplateOverrides: unknown field": lambda job: job["spec"].update(podTemplateOverrides=[]),
        "terminationGracePeriodSeconds: unknown field": lambda job: node_pod(job).update(terminationGracePeriodSeconds=300),
        "duplicate entry (name=tmp)": lambda job: node_pod(job)["containers"][0]["volumeMounts"][-1].update(name="tmp"),
        "PET_NNODES are reserved": lambda job: trainer(job)["env"].append({"name": "PET_NNODES", "value": "2"}),
        "domain-prefixed": lambda job: job["spec"]["runtimePatches"][0].update(manager="cpt"),
        "goes in spec.trainer.env": lambda job: node_pod(job)["containers"][0].update(env=[{"name": "X", "value": "y"}]),
        "no TrainingRuntime named 'other'": lambda job: job["spec"]["runtimeRef"].update(name="other"),
    }
    runtime_cases = {
        "needs template.spec.restartPolicy: Never": lambda runtime: runtime_pod(runtime).update(restartPolicy="OnFailure"),
        "'PodFailed' is not a Job failure reason": lambda runtime: rules(runtime)[1].update(onJobFailureReasons=["PodFailed"]),
        "rule names must be unique": lambda runtime: rules(runtime)[1].update(name=rules(runtime)[0]["name"]),
        "no container named 'cpt'": lambda runtime: runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
            "podFailurePolicy"
        ]["rules"][0]["onExitCodes"].update(containerName="cpt"),
        "needs a container named 'node'": lambda runtime: runtime_pod(runtime)["containers"][0].update(name="cpt"),
    }
    for expected, breaks in [*trainjob_cases.items(), *runtime_cases.items()]:
        case = tmp_path / re.sub(r"\W+", "-", expected)
        case.mkdir()
        for name, kind in (("trainjob.yaml", "TrainJob"), ("runtime.yaml", "TrainingRuntime")):
            resource = one(MULTI_NODE / name, kind)
            if (expected in trainjob_cases) == (kind == "TrainJob"):
                breaks(resource)
            (case / name).write_text(yaml.safe_dump(resource))
        problems = k8s_lint.lint_dir(case)
        assert any(expected in problem for problem in problems), (expected, problems)


def test_crd_schemas_name_their_source() -> None:
    schemas = REPO / "tests" / "k8s_schemas"
    source = (schemas / "SOURCE.md").read_text()
    assert "Apache License 2.0" in source and (schemas / "LICENSE").read_text().lstrip().startswith("Apache License")
    for schema in schemas.glob("*.json"):
        assert f"`{schema.name}`" in source, f"SOURCE.md does not say where {schema.name} comes from"
    kinds = {(resource["apiVersion"], resource["kind"]) for path in K8S.rglob("*.yaml") for resource in resources(path)}
    for api_version, kind in kinds:
        if "." in api_version.split("/")[0] and not api_version.split("/")[0].endswith("k8s.io"):
            assert k8s_lint.crd_schema(api_version, kind) is not None, f"no stored schema for {api_version} {kind}"
