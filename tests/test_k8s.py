"""k8s/: the manifests validate (the same check as `make lint`) and encode the job's contract."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt import k8s_lint
from cpt.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


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
    pytorchjob_text = (K8S / "multi-gpu" / "pytorchjob.yaml").read_text()
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
    assert kinds == {"Job", "ConfigMap", "PersistentVolumeClaim"}, "the PyTorchJob stays out of the default"


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
    pytorchjob = one(K8S / "multi-gpu" / "pytorchjob.yaml", "PyTorchJob")
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        for container in replica["template"]["spec"]["containers"]:
            assert container["image"] == f"cpt:{version}"


def test_pytorchjob_runs_torchrun_style_replicas() -> None:
    pytorchjob = one(K8S / "multi-gpu" / "pytorchjob.yaml", "PyTorchJob")
    spec = pytorchjob["spec"]
    assert pytorchjob["apiVersion"] == "kubeflow.org/v1"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] >= 1
    gpus_per_pod = {
        replica["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for replica in spec["pytorchReplicaSpecs"].values()
    }
    assert gpus_per_pod == {int(spec["nprocPerNode"])}, "one process per GPU"
