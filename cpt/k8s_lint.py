"""Validate the Kubernetes manifests under a directory, offline (what `make lint` runs).

    python -m cpt.k8s_lint k8s

Built-in kinds are validated strictly (unknown fields are errors) against KUBERNETES_VERSION with the
schemas bundled in kubernetes-validate, so no cluster or network is needed. The Kubeflow PyTorchJob
has no schema there: its own fields are checked for structure, and each replica's pod template is
validated as a core PodTemplateSpec. A kustomization.yaml must list files that exist, and every
manifest beside it. Prints one line per problem and exits 1 if there is any.

kubernetes-validate is a test/lint dependency (requirements-dev.txt), not part of the image.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33.0"

PYTORCHJOB_SPEC_KEYS = {"pytorchReplicaSpecs", "runPolicy", "elasticPolicy", "nprocPerNode"}
PYTORCHJOB_REPLICA_TYPES = {"Master", "Worker"}
REPLICA_SPEC_KEYS = {"replicas", "restartPolicy", "template"}
REPLICA_RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
RUN_POLICY_KEYS = {
    "cleanPodPolicy",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "schedulingPolicy",
    "suspend",
    "managedBy",
}
PYTORCH_CONTAINER = "pytorch"  # the operator finds the training container by this name


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def validate_builtin(resource: dict[str, Any]) -> list[str]:
    """Schema errors of one built-in resource (empty when valid)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path) or "(top level)"
        return [f"{where}: {error.message}"]
    except SchemaNotFoundError as error:
        return [error.message]
    return []


def check_pytorchjob(job: dict[str, Any]) -> list[str]:
    """Structure of a kubeflow.org/v1 PyTorchJob; each replica's pod template is schema-validated."""
    found = []
    if job.get("apiVersion") != "kubeflow.org/v1":
        found.append(f"apiVersion {job.get('apiVersion')!r}: use kubeflow.org/v1")
    if not job.get("metadata", {}).get("name"):
        found.append("metadata.name is missing")
    spec = job.get("spec") or {}
    found += [f"spec.{key}: unknown field" for key in sorted(set(spec) - PYTORCHJOB_SPEC_KEYS)]
    found += [f"spec.runPolicy.{key}: unknown field" for key in sorted(set(spec.get("runPolicy") or {}) - RUN_POLICY_KEYS)]
    if "nprocPerNode" in spec and not isinstance(spec["nprocPerNode"], str):
        found.append('spec.nprocPerNode must be a string (e.g. "8" or "auto")')
    if "runPolicy" not in spec:
        found.append("spec.runPolicy is missing (backoffLimit, activeDeadlineSeconds, ...)")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in replicas:
        found.append("spec.pytorchReplicaSpecs.Master is missing")
    for replica_type, replica in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{replica_type}"
        if replica_type not in PYTORCHJOB_REPLICA_TYPES:
            found.append(f"{where}: unknown replica type; use Master and Worker")
            continue
        found += [f"{where}.{key}: unknown field" for key in sorted(set(replica) - REPLICA_SPEC_KEYS)]
        count = replica.get("replicas")
        if not isinstance(count, int) or count < 1 or (replica_type == "Master" and count != 1):
            found.append(f"{where}.replicas {count!r}: Master needs exactly 1, Worker at least 1")
        if replica.get("restartPolicy") not in REPLICA_RESTART_POLICIES:
            found.append(
                f"{where}.restartPolicy {replica.get('restartPolicy')!r}: use one of "
                f"{', '.join(sorted(REPLICA_RESTART_POLICIES))}"
            )
        template = replica.get("template") or {}
        containers = (template.get("spec") or {}).get("containers") or []
        if PYTORCH_CONTAINER not in [container.get("name") for container in containers]:
            found.append(f"{where}.template: no container named {PYTORCH_CONTAINER!r}")
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        found += [f"{where}.{problem}" for problem in validate_builtin(pod_template)]
    return found


def check_kustomization(path: Path, kustomization: dict[str, Any]) -> list[str]:
    """Listed resources exist, and every manifest next to kustomization.yaml is listed."""
    listed = kustomization.get("resources") or []
    found = [f"resources: {name} does not exist" for name in listed if not (path.parent / name).exists()]
    for manifest in sorted(path.parent.glob("*.y*ml")):
        if manifest.name not in listed and manifest != path:
            found.append(f"{manifest.name} is not listed in resources")
    return found


def lint_file(path: Path) -> list[str]:
    """Problems of one manifest file, each prefixed with the file and resource."""
    try:
        documents = load_documents(path)
    except yaml.YAMLError as error:
        return [f"{path}: not valid YAML: {error}"]
    found = []
    for document in documents:
        kind = document.get("kind", "?")
        name = (document.get("metadata") or {}).get("name", "")
        label = f"{path}: {kind}/{name}" if name else f"{path}: {kind}"
        if kind == "Kustomization":
            problems = check_kustomization(path, document)
        elif kind == "PyTorchJob":
            problems = check_pytorchjob(document)
        else:
            problems = validate_builtin(document)
        found += [f"{label}: {problem}" for problem in problems]
    return found


def lint_dir(root: Path) -> list[str]:
    """Problems of every *.yaml / *.yml under root (recursively)."""
    paths = sorted(path for path in root.rglob("*") if path.suffix in (".yaml", ".yml"))
    if not paths:
        return [f"{root}: no manifests found"]
    return [problem for path in paths for problem in lint_file(path)]


def main(argv: list[str] | None = None) -> int:
    roots = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)] or [Path("k8s")]
    problems = [problem for root in roots for problem in lint_dir(root)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"k8s manifests valid against Kubernetes {KUBERNETES_VERSION}: {', '.join(map(str, roots))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
