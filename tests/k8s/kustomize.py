"""A minimal `kustomize build` in Python, for the subset k8s/ uses, so the manifest tests run without kubectl.

Supported: `resources` (files and directories), `configMapGenerator` (files or literals, labels, annotations,
disableNameSuffixHash), `patches` (a file with a whole object: JSON merge patch semantics, which is what kustomize
applies to custom resources it has no schema for, so lists are replaced whole; `$patch: delete` removes the object;
or `target` + JSON 6902 test/add/remove/replace), `images` (newName, newTag or digest), and `replacements` (a source field copied into target fields selected by kind and
name; `*` over list items, which skips items without the field; options create, delimiter + index). Objects
annotated `config.kubernetes.io/local-config: "true"` are inputs only: visible to overlays, left out of the output.
Anything else raises, so a kustomization cannot silently use a feature this renderer ignores.
test_manifests.py compares this renderer with `kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator", "replacements"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"


def build(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` outputs (order aside)."""
    return [obj for obj in _build(directory)
            if obj.get("metadata", {}).get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def _build(directory: Path) -> list[dict]:
    """Every object of the kustomization, local-config ones included (an overlay may use them as sources)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise NotImplementedError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unsupported)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += _build(path) if path.is_dir() else [obj for obj in yaml.safe_load_all(path.read_text()) if obj]
    objects += [_config_map(directory, generator) for generator in kustomization.get("configMapGenerator", [])]
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    for replacement in kustomization.get("replacements", []):
        _replace(directory, replacement, objects)
    return objects


def _config_map(directory: Path, generator: dict) -> dict:
    options = generator.get("options", {})
    if (set(generator) - {"name", "files", "literals", "options"}
            or set(options) - {"disableNameSuffixHash", "labels", "annotations"}):
        raise NotImplementedError(f"configMapGenerator {generator['name']}: only files, literals, labels, "
                                  "annotations, no name hash")
    if options.get("disableNameSuffixHash") is not True:
        raise NotImplementedError(f"configMapGenerator {generator['name']}: set disableNameSuffixHash: true")
    data = {}
    for entry in generator.get("files", []):
        key, _, source = entry.rpartition("=")
        data[key or Path(source).name] = (directory / source).read_text()
    for entry in generator.get("literals", []):
        key, separator, value = entry.partition("=")
        if not separator or not key:
            raise ValueError(f"configMapGenerator {generator['name']}: literal {entry!r} is not KEY=VALUE")
        data[key] = value
    metadata: dict[str, Any] = {"name": generator["name"]}
    for field in ("labels", "annotations"):
        if field in options:
            metadata[field] = {key: str(value) for key, value in options[field].items()}
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
    if content.get("$patch") == "delete":
        objects.remove(targets[0])
        return
    if "$patch" in content:
        raise NotImplementedError(f"{directory}/{patch['path']}: only `$patch: delete`")
    merged = _merge_patch(targets[0], content)
    targets[0].clear()
    targets[0].update(merged)


def _replace(directory: Path, replacement: dict, objects: list[dict]) -> None:
    """kustomize `replacements`: the source field's value into every target field (see the module docstring)."""
    where = f"{directory}/kustomization.yaml replacements"
    if set(replacement) - {"source", "targets"} or set(replacement["source"]) - {"kind", "name", "fieldPath"}:
        raise NotImplementedError(f"{where}: only source (kind, name, fieldPath) and targets")
    source = replacement["source"]
    sources = [obj for obj in objects if _matches(obj, {key: source[key] for key in ("kind", "name") if key in source})]
    if len(sources) != 1:
        raise ValueError(f"{where}: source {source} matches {len(sources)} objects, not 1")
    (value,) = _field_values(sources[0], source["fieldPath"].split("."), where)
    for target in replacement["targets"]:
        options = target.get("options", {})
        if set(target) - {"select", "fieldPaths", "options"} or set(options) - {"create", "delimiter", "index"}:
            raise NotImplementedError(f"{where}: target {target}: only select, fieldPaths, options create/delimiter/index")
        selected = [obj for obj in objects if _matches(obj, target["select"])]
        if not selected:
            raise ValueError(f"{where}: select {target['select']} matches no object")
        for obj in selected:
            for field_path in target["fieldPaths"]:
                _set_field(obj, field_path.split("."), value, options, where)


def _field_values(node: Any, path: list[str], where: str) -> list[Any]:
    for part in path:
        if "[" in part or "=" in part:
            raise NotImplementedError(f"{where}: field path part {part!r}: only plain keys and *")
    if not path:
        return [node]
    head, rest = path[0], path[1:]
    if head == "*":
        if not isinstance(node, list):
            raise NotImplementedError(f"{where}: * over a map")
        return [value for item in node for value in _field_values(item, rest, where)]
    if not isinstance(node, dict) or head not in node:
        raise ValueError(f"{where}: no field {head!r}")
    return _field_values(node[head], rest, where)


def _set_field(node: Any, path: list[str], value: Any, options: dict, where: str, wildcard: bool = False) -> None:
    """Sets node[path] to value. Under a `*`, an item without the field is skipped (as kustomize does)."""
    head, rest = path[0], path[1:]
    if "[" in head or "=" in head:
        raise NotImplementedError(f"{where}: field path part {head!r}: only plain keys and *")
    if head == "*":
        if not isinstance(node, list) or options.get("create"):
            raise NotImplementedError(f"{where}: * only over lists, without create")
        for item in node:
            _set_field(item, rest, value, options, where, wildcard=True)
        return
    if not isinstance(node, dict):
        raise TypeError(f"{where}: {head!r} under a non-map")
    if head not in node:
        if wildcard:
            return
        if not options.get("create"):
            raise ValueError(f"{where}: no field {head!r} (set options.create)")
        node[head] = {} if rest else None
    if rest:
        _set_field(node[head], rest, value, options, where, wildcard)
        return
    if "delimiter" in options:
        parts = str(node[head]).split(options["delimiter"])
        index = options.get("index", 0)
        if not 0 <= index < len(parts):
            raise NotImplementedError(f"{where}: index {index} outside {node[head]!r}")
        parts[index] = str(value)
        node[head] = options["delimiter"].join(parts)
    else:
        node[head] = copy.deepcopy(value)


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
                    if set(image) - {"name", "newName", "newTag", "digest"} or {"newTag", "digest"} <= set(image):
                        raise NotImplementedError(f"images entry {image}: name, newName and newTag or digest")
                    new_name = image.get("newName", name)
                    container["image"] = (f"{new_name}@{image['digest']}" if "digest" in image
                                          else f"{new_name}:{image.get('newTag', tag)}")
        _set_image(value, image)


def _split_image(reference: str) -> tuple[str, str]:
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:  # no tag, or the colon belonged to a registry port
        return reference, "latest"
    return name, tag
