"""Validate the Kubernetes manifests under a directory, offline (what `make lint` runs).

    python tools/k8s_lint.py k8s
    python tools/k8s_lint.py --import-crd CRD.yaml   # keep a CRD's schema in tests/k8s_schemas/

Built-in kinds are validated strictly (unknown fields are errors) against KUBERNETES_VERSION with the
schemas bundled in kubernetes-validate. Custom resources (Kubeflow Trainer v2's TrainJob and
TrainingRuntime, the legacy PyTorchJob) are validated against the OpenAPI schema of their CRD, kept in
tests/k8s_schemas/ (source, version and licence in its SOURCE.md), as strictly as the API server
applies it: types, enums, patterns and required fields, unknown fields, and unique keys in list-maps
(e.g. two volumeMounts named alike). The rules that live in admission webhooks and controllers rather
than in schemas are checked by hand: Trainer's (reserved PET_* variables, what runtimePatches may
touch, the runtime's `node` container) and Kubernetes' (podFailurePolicy needs restartPolicy Never
and names a real container). No cluster or network is needed. A kustomization.yaml must list files
that exist, and every manifest beside it. Prints one line per problem and exits 1 if there is any.

A development tool, not part of the cpt package or the image; kubernetes-validate (and the jsonschema it
brings) are lint dependencies (requirements-dev.txt).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33.0"
SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "k8s_schemas"

PYTORCHJOB_REPLICA_TYPES = {"Master", "Worker"}
PYTORCH_CONTAINER = "pytorch"  # the Training Operator finds the training container by this name

TRAINER_CONTAINER = "node"  # Trainer v2 finds the trainer's container (and sets PET_*) by this name
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
RESERVED_TORCH_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
NO_ENV_PATCH_CONTAINERS = {"node", "dataset-initializer", "model-initializer"}
# The stock runtimes a TrainJob may name without their manifest here: replicated job -> containers.
STOCK_CLUSTER_RUNTIMES = {"torch-distributed": {"node": {"node"}}}
# JobSet's webhook: the Job failure reasons a failurePolicy rule may name, and the rule name format.
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
}
FAILURE_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Resource = dict[str, Any]


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def dig(node: Any, dotted_keys: str) -> Any:
    """node["a"]["b"] for "a.b", with {} for anything missing or null on the way."""
    for key in dotted_keys.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return {} if node is None else node


def dotted(parts: Any) -> str:
    """spec.containers[0].name from a path of keys and indexes."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top level)"


# ---- built-in kinds ----------------------------------------------------------------------------------


def validate_builtin(resource: Resource) -> list[str]:
    """Schema errors of one built-in resource (empty when valid)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{dotted(error.path)}: {error.message}"]
    except SchemaNotFoundError as error:
        return [error.message]
    return []


def check_pod_failure_policy(job_spec: Resource, where: str) -> list[str]:
    """Kubernetes' own rules for a Job's podFailurePolicy (validation code, not schema)."""
    policy = job_spec.get("podFailurePolicy")
    if not policy:
        return []
    pod = (job_spec.get("template") or {}).get("spec") or {}
    found = []
    if pod.get("restartPolicy") != "Never":
        found.append(f"{where}.podFailurePolicy needs template.spec.restartPolicy: Never")
    containers = {container.get("name") for container in pod.get("containers") or []}
    for index, rule in enumerate(policy.get("rules") or []):
        name = (rule.get("onExitCodes") or {}).get("containerName")
        if name is not None and name not in containers:
            found.append(f"{where}.podFailurePolicy.rules[{index}]: no container named {name!r} in the pod template")
    return found


# ---- custom resources: the CRD's OpenAPI schema ------------------------------------------------------


def crd_schema(api_version: str, kind: str) -> Resource | None:
    """The stored openAPIV3Schema for apiVersion/kind, or None."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{kind}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["openAPIV3Schema"]


def structural_problems(value: Any, schema: Resource, path: tuple) -> Iterator[str]:
    """What the API server enforces beyond JSON Schema: unknown fields (kubectl's strict field
    validation) and unique keys in x-kubernetes-list-type map/set lists."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from structural_problems(item, properties[key], (*path, key))
            elif isinstance(extra, dict):
                yield from structural_problems(item, extra, (*path, key))
            elif properties is not None:
                yield f"{dotted((*path, key))}: unknown field"
    elif isinstance(value, list):
        items = schema.get("items") or {}
        for index, item in enumerate(value):
            yield from structural_problems(item, items, (*path, index))
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen: set[str] = set()
            for item in value:
                if list_type == "map" and isinstance(item, dict):
                    identity = ", ".join(f"{key}={item.get(key)}" for key in keys)
                else:
                    identity = json.dumps(item, sort_keys=True)
                if identity in seen:
                    yield f"{dotted(path)}: duplicate entry ({identity}); a {list_type} list needs unique keys"
                seen.add(identity)


def validate_custom(resource: Resource, schema: Resource) -> list[str]:
    """Schema errors of a custom resource against its CRD's openAPIV3Schema."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(resource), key=lambda error: [str(part) for part in error.absolute_path])
    found = [f"{dotted(error.absolute_path)}: {error.message}" for error in errors]
    return found + list(structural_problems(resource, schema, ()))


# ---- Kubeflow: the rules of the operators' webhooks ------------------------------------------------


def check_pytorchjob(job: Resource) -> list[str]:
    """Legacy kubeflow.org/v1 PyTorchJob: replica layout, container name; pod templates as core PodTemplates."""
    found = []
    spec = job.get("spec") or {}
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
        count = replica.get("replicas")
        if not isinstance(count, int) or count < 1 or (replica_type == "Master" and count != 1):
            found.append(f"{where}.replicas {count!r}: Master needs exactly 1, Worker at least 1")
        template = replica.get("template") or {}
        containers = (template.get("spec") or {}).get("containers") or []
        if PYTORCH_CONTAINER not in [container.get("name") for container in containers]:
            found.append(f"{where}.template: no container named {PYTORCH_CONTAINER!r}")
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        found += [f"{where}.{problem}" for problem in validate_builtin(pod_template)]
    return found


def runtime_containers(runtime: Resource) -> dict[str, set[str]]:
    """replicated job name -> its containers' names, of a (Cluster)TrainingRuntime."""
    jobs = dig(runtime, "spec.template.spec.replicatedJobs") or []
    return {
        job.get("name"): {container.get("name") for container in dig(job, "template.spec.template.spec.containers") or []}
        for job in jobs
    }


def check_training_runtime(runtime: Resource) -> list[str]:
    """Trainer's runtime webhook (the trainer job: one replica, a `node` container) and each Job template
    as a strict batch/v1 Job."""
    found = []
    jobset = dig(runtime, "spec.template.spec")
    rule_names = []
    for index, rule in enumerate((jobset.get("failurePolicy") or {}).get("rules") or []):
        where = f"spec.template.spec.failurePolicy.rules[{index}]"
        rule_names.append(rule.get("name"))
        if not FAILURE_RULE_NAME.match(rule.get("name") or "") or len(rule.get("name")) > 128:
            found.append(f"{where}.name {rule.get('name')!r}: letters, digits and _,: (a letter first), at most 128")
        for reason in sorted(set(rule.get("onJobFailureReasons") or []) - JOB_FAILURE_REASONS):
            known = ", ".join(sorted(JOB_FAILURE_REASONS))
            found.append(f"{where}.onJobFailureReasons: {reason!r} is not a Job failure reason ({known})")
        for pattern in rule.get("onJobFailureMessagePatterns") or []:
            try:
                re.compile(pattern)
            except re.error as error:
                found.append(f"{where}.onJobFailureMessagePatterns: {pattern!r} is not a regular expression: {error}")
    if len(rule_names) != len(set(rule_names)):
        found.append("spec.template.spec.failurePolicy.rules: rule names must be unique")
    jobs = jobset.get("replicatedJobs") or []
    for index, job in enumerate(jobs):
        where = f"spec.template.spec.replicatedJobs[{index}]"
        template = job.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if labels.get(ANCESTOR_LABEL) == "trainer":
            if job.get("replicas", 1) != 1:
                found.append(f"{where}.replicas must be 1 for the trainer job")
            if TRAINER_CONTAINER not in runtime_containers(runtime).get(job.get("name"), set()):
                found.append(f"{where}: the trainer job needs a container named {TRAINER_CONTAINER!r}")
        job_spec = template.get("spec") or {}
        found += check_pod_failure_policy(job_spec, f"{where}.template.spec")
        as_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "check"}, "spec": job_spec}
        found += [f"{where}.template.{problem}" for problem in validate_builtin(as_job)]
    return found


def domain_prefixed_path(value: str) -> bool:
    """apimachinery's IsDomainPrefixedPath: host/path with a DNS-1123 subdomain host."""
    host, _, path = value.partition("/")
    host_ok = bool(host) and len(host) <= 253 and DNS1123_SUBDOMAIN.match(host) is not None
    return host_ok and re.match(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$", path) is not None


def check_trainjob(job: Resource, runtimes: dict[tuple[str, str], Resource]) -> list[str]:
    """Trainer's TrainJob webhook: name, reserved torchrun variables, what runtimePatches may touch."""
    found = []
    name = (job.get("metadata") or {}).get("name", "")
    if not RFC1035_LABEL.match(name) or len(name) > 63:
        found.append(f"metadata.name {name!r} must be an RFC 1035 label of at most 63 characters")
    spec = job.get("spec") or {}
    reserved = sorted({env.get("name") for env in (spec.get("trainer") or {}).get("env") or []} & RESERVED_TORCH_ENV)
    if reserved:
        found.append(f"spec.trainer.env: {', '.join(reserved)} are reserved: the torch runtime sets them")

    ref = spec.get("runtimeRef") or {}
    kind = ref.get("kind", "ClusterTrainingRuntime")
    runtime = runtimes.get((kind, ref.get("name")))
    if runtime is not None:
        containers = runtime_containers(runtime)
    elif kind == "ClusterTrainingRuntime" and ref.get("name") in STOCK_CLUSTER_RUNTIMES:
        containers = STOCK_CLUSTER_RUNTIMES[ref["name"]]
    else:
        found.append(f"spec.runtimeRef: no {kind} named {ref.get('name')!r} among these manifests")
        containers = None

    for index, patch in enumerate(spec.get("runtimePatches") or []):
        where = f"spec.runtimePatches[{index}]"
        if not domain_prefixed_path(patch.get("manager", "")):
            found.append(f"{where}.manager {patch.get('manager')!r} must be a domain-prefixed path (such as acme.io/foo)")
        template = dig(patch, "trainingRuntimeSpec.template.spec")
        for job_index, job_patch in enumerate(template.get("replicatedJobs") or []):
            job_where = f"{where}.trainingRuntimeSpec.template.spec.replicatedJobs[{job_index}]"
            if containers is not None and job_patch.get("name") not in containers:
                found.append(f"{job_where}: the runtime has no replicated job {job_patch.get('name')!r}")
                continue
            pod = dig(job_patch, "template.spec.template.spec")
            for field in ("initContainers", "containers"):
                for container in pod.get(field) or []:
                    if containers is not None and container.get("name") not in containers[job_patch.get("name")]:
                        found.append(f"{job_where}: {field} {container.get('name')!r} is not in the runtime's job")
                    if container.get("env") and container.get("name") in NO_ENV_PATCH_CONTAINERS:
                        found.append(f"{job_where}: env of container {container.get('name')!r} goes in spec.trainer.env")
            volumes = {volume.get("name") for volume in pod.get("volumes") or []}
            for container in pod.get("containers") or []:
                for mount in container.get("volumeMounts") or []:
                    if mount.get("name") not in volumes:
                        found.append(f"{job_where}: volumeMount {mount.get('name')!r} has no volume in this patch")
    return found


# ---- files --------------------------------------------------------------------------------------------


def check_kustomization(path: Path, kustomization: Resource) -> list[str]:
    """Listed resources exist, and every manifest next to kustomization.yaml is listed."""
    listed = kustomization.get("resources") or []
    found = [f"resources: {name} does not exist" for name in listed if not (path.parent / name).exists()]
    for manifest in sorted(path.parent.glob("*.y*ml")):
        if manifest.name not in listed and manifest != path:
            found.append(f"{manifest.name} is not listed in resources")
    return found


def check_resource(path: Path, document: Resource, runtimes: dict[tuple[str, str], Resource]) -> list[str]:
    kind = document.get("kind", "?")
    if kind == "Kustomization":
        return check_kustomization(path, document)
    group = document.get("apiVersion", "").rpartition("/")[0]
    if "." not in group or group.endswith(".k8s.io"):  # core, batch, apps, ..., networking.k8s.io
        problems = validate_builtin(document)
        if kind == "Job":
            problems += check_pod_failure_policy(document.get("spec") or {}, "spec")
        return problems
    schema = crd_schema(document.get("apiVersion", ""), kind)
    if schema is None:
        return [f"no schema for {document.get('apiVersion')} {kind} in {SCHEMAS}; add its CRD with --import-crd"]
    problems = validate_custom(document, schema)
    if kind == "PyTorchJob":
        problems += check_pytorchjob(document)
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        problems += check_training_runtime(document)
    elif kind == "TrainJob":
        problems += check_trainjob(document, runtimes)
    return problems


def lint_paths(paths: list[Path]) -> list[str]:
    """Problems of these manifest files, each prefixed with the file and resource. A TrainJob's runtime
    is looked up among all of them."""
    documents: list[tuple[Path, Resource]] = []
    found = []
    for path in paths:
        try:
            documents += [(path, document) for document in load_documents(path)]
        except yaml.YAMLError as error:
            found.append(f"{path}: not valid YAML: {error}")
    runtimes = {
        (document["kind"], (document.get("metadata") or {}).get("name")): document
        for _, document in documents
        if document.get("kind") in ("TrainingRuntime", "ClusterTrainingRuntime")
    }
    for path, document in documents:
        kind = document.get("kind", "?")
        name = (document.get("metadata") or {}).get("name", "")
        label = f"{path}: {kind}/{name}" if name else f"{path}: {kind}"
        found += [f"{label}: {problem}" for problem in check_resource(path, document, runtimes)]
    return found


def lint_dir(root: Path) -> list[str]:
    """Problems of every *.yaml / *.yml under root (recursively)."""
    paths = sorted(path for path in root.rglob("*") if path.suffix in (".yaml", ".yml"))
    if not paths:
        return [f"{root}: no manifests found"]
    return lint_paths(paths)


# ---- storing a CRD's schema -------------------------------------------------------------------------


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def import_crd(crd_path: Path, schemas: Path = SCHEMAS) -> Path:
    """Store the storage version's openAPIV3Schema of a CRD (descriptions dropped) as
    schemas/GROUP_VERSION_KIND.json, the file validation looks for."""
    [crd] = [document for document in load_documents(crd_path) if document.get("kind") == "CustomResourceDefinition"]
    [version] = [version for version in crd["spec"]["versions"] if version.get("storage")]
    kind = crd["spec"]["names"]["kind"]
    out = schemas / f"{crd['spec']['group']}_{version['name']}_{kind}.json"
    stored = {
        "group": crd["spec"]["group"],
        "kind": kind,
        "version": version["name"],
        "openAPIV3Schema": without_descriptions(version["schema"]["openAPIV3Schema"]),
    }
    out.write_text(json.dumps(stored, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--import-crd"]:
        for crd_path in args[1:]:
            print(f"stored {import_crd(Path(crd_path))}")
        return 0
    roots = [Path(arg) for arg in args] or [Path("k8s")]
    problems = [problem for root in roots for problem in lint_dir(root)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(
        f"k8s manifests valid against Kubernetes {KUBERNETES_VERSION} and the CRDs in "
        f"{SCHEMAS.relative_to(Path.cwd()) if SCHEMAS.is_relative_to(Path.cwd()) else SCHEMAS}: {', '.join(map(str, roots))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
