"""Rendered kustomizations and validators built from KubeRay's CRDs (../shared/k8s-schemas, pinned by sha256)."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.k8s.kustomize import build

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
SCHEMA_DIR = REPO_ROOT.parent / "shared" / "k8s-schemas"
KUSTOMIZATIONS = ("base", "overlays/dev-cpu", "overlays/prod-gpu")


def crd_schema(file_name: str, version: str = "v1") -> dict:
    """openAPIV3Schema of a CRD in ../shared/k8s-schemas, after checking the file's sha256 against PROVENANCE.md."""
    path = SCHEMA_DIR / file_name
    if not path.exists():
        pytest.skip(f"{path} not present (the KubeRay CRDs live in ../shared/k8s-schemas on the project's machines)")
    provenance = (SCHEMA_DIR / "PROVENANCE.md").read_text()
    pinned = re.search(rf"\| {re.escape(file_name)} \|.*\| ([0-9a-f]{{64}}) \|", provenance)
    assert pinned, f"{file_name} has no sha256 in PROVENANCE.md"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pinned.group(1), f"{file_name} differs from PROVENANCE.md"
    crd = yaml.safe_load(path.read_text())
    (found,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def closed(schema: dict) -> dict:
    """A copy where every object that declares `properties` and no `additionalProperties` rejects unknown keys.

    Kubernetes prunes unknown fields of a CRD object silently (or rejects them with kubectl --validate=strict);
    closing the schema turns a misspelled key into a validation error here.
    """
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def validation_errors(validator: Draft7Validator, instance: object) -> list[str]:
    """Readable errors, each with the path of the offending value."""
    return sorted(
        f"{'/'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(instance)
    )


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    return closed(crd_schema("ray.io_rayservices.yaml"))


@pytest.fixture(scope="session")
def rayservice_validator(rayservice_schema) -> Draft7Validator:
    return Draft7Validator(rayservice_schema)


@pytest.fixture(scope="session")
def raycluster_spec_validator() -> Draft7Validator:
    return Draft7Validator(closed(crd_schema("ray.io_rayclusters.yaml"))["properties"]["spec"])


@pytest.fixture(scope="session")
def core_validators(rayservice_schema) -> dict[str, Draft7Validator]:
    """Validators for core objects, from the core/v1 schemas KubeRay's CRD embeds (no cluster needed)."""
    cluster = rayservice_schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    pod_template = cluster["headGroupSpec"]["properties"]["template"]
    volume = pod_template["properties"]["spec"]["properties"]["volumes"]["items"]
    pvc_template = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]
    service = rayservice_schema["properties"]["spec"]["properties"]["serveService"]
    return {
        "pod_template": Draft7Validator(pod_template),
        "pvc_spec": Draft7Validator(pvc_template["properties"]["spec"]),
        "service": Draft7Validator(service),
    }


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every kustomization's output, by directory relative to k8s/."""
    return {name: build(K8S_DIR / name) for name in KUSTOMIZATIONS}


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [obj for obj in objects if obj["kind"] == kind and name in (None, obj["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]
