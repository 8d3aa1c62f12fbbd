"""A minimal `kustomize build` in Python, for the subset k8s/ uses, so the manifest tests run without kubectl.

Supported: `resources` (files and directories), `configMapGenerator` (files, disableNameSuffixHash), `patches`
(a file with a whole object: JSON merge patch semantics, which is what kustomize applies to custom resources it
has no schema for, so lists are replaced whole; or `target` + JSON 6902 test/add/remove/replace), and `images`.
Anything else raises, so a kustomization cannot silently use a feature this renderer ignores.
test_manifests.py compares this renderer with `kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator"}


def build(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` outputs (order aside)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise NotImplementedError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unsupported)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += build(path) if path.is_dir() else [obj for obj in yaml.safe_load_all(path.read_text()) if obj]
    objects += [_config_map(directory, generator) for generator in kustomization.get("configMapGenerator", [])]
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _config_map(directory: Path, generator: dict) -> dict:
    options = generator.get("options", {})
    if set(generator) - {"name", "files", "options"} or set(options) - {"disableNameSuffixHash", "labels"}:
        raise NotImplementedError(f"configMapGenerator {generator['name']}: only files, labels, no name hash")
    if options.get("disableNameSuffixHash") is not True:
        raise NotImplementedError(f"configMapGenerator {generator['name']}: set disableNameSuffixHash: true")
    data = {}
    for entry in generator["files"]:
        key, _, source = entry.rpartition("=")
        data[key or Path(source).name] = (directory / source).read_text()
    metadata: dict[str, Any] = {"name": generator["name"]}
    if "labels" in options:
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _apply_patch(directory: Path, patch: dict, objects: list[dict]) -> None:
    if set(patch) - {"path", "target"}:
        raise NotImplementedError(f"patch {patch}: only `path` and `target` are supported")
    content = yaml.safe_load((directory / patch["path"]).read_text())
    if "target" in patch:
        targets = [obj for obj in objects if _matches(obj, patch["target"])]
        if not targets:
            raise ValueError(f"{directory}/{patch['path']}: target {patch['target']} matches no object")
        for obj in targets:
            for operation in content:
                _json6902(obj, operation)
        return
    selector = {"kind": content["kind"], "name": content["metadata"]["name"]}
    targets = [obj for obj in objects if _matches(obj, selector)]
    if len(targets) != 1:
        raise ValueError(f"{directory}/{patch['path']}: {selector} matches {len(targets)} objects, not 1")
    merged = _merge_patch(targets[0], content)
    targets[0].clear()
    targets[0].update(merged)


def _matches(obj: dict, target: dict) -> bool:
    if set(target) - {"kind", "name", "group", "version"}:
        raise NotImplementedError(f"patch target {target}: only kind, name, group, version")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
    return all(actual[key] == value for key, value in target.items())


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes a key, everything else (lists included) replaces."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(target.get(key), value)
    return merged


def _json6902(obj: dict, operation: dict) -> None:
    op, path = operation["op"], operation["path"]
    if op not in ("test", "add", "remove", "replace"):
        raise NotImplementedError(f"JSON 6902 op {op!r}: only test, add, remove, replace")
    tokens = [token.replace("~1", "/").replace("~0", "~") for token in path.lstrip("/").split("/")]
    parent = obj
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    if op == "test":
        actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)
        if actual != operation["value"]:
            raise ValueError(f"JSON 6902 test {path}: expected {operation['value']!r}, found {actual!r}")
        return
    if isinstance(parent, list):
        if op == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(operation["value"]))
        elif op == "remove":
            del parent[int(last)]
        else:
            parent[int(last)] = copy.deepcopy(operation["value"])
        return
    if op in ("remove", "replace") and last not in parent:
        raise ValueError(f"JSON 6902 {op} {path}: no such key")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(operation["value"])


def _set_image(node: Any, image: dict) -> None:
    """kustomize `images`: every containers[]/initContainers[] image named image['name'], at any depth."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag = _split_image(container.get("image", ""))
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        _set_image(value, image)


def _split_image(reference: str) -> tuple[str, str]:
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:  # no tag, or the colon belonged to a registry port
        return reference, "latest"
    return name, tag
