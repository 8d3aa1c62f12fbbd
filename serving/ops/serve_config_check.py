"""Strict checks of a Serve config, shared by the local deploy (`deploy.py`) and the Kubernetes render
(`k8s_render.py`).

Ray's `ServeDeploySchema` ignores unknown keys and does not validate `autoscaling_config` values, so a typo would
deploy silently with defaults; here every key is checked at any depth, the app's `args` and `user_config` go through
`AppArgs` and `ModelUserConfig`, and the listed deployments must be exactly those the topology binds.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from seqrank.serving.config import OWN_DEPLOYMENT, AppArgs, ModelUserConfig
from seqrank.serving.shards import SHARD_DEPLOYMENT_PREFIX, shard_deployment_name

APP_IMPORT_PATH = "seqrank.serving.app:build_app"  # applications built by this package: their args and user_config are ours
INGRESS_DEPLOYMENT = "RankingIngress"
ENCODER_DEPLOYMENT = "Encoder"
RETRIEVAL_DEPLOYMENT = "Retrieval"
RERANKER_DEPLOYMENT = "Reranker"
MODEL_DEPLOYMENTS = (INGRESS_DEPLOYMENT, ENCODER_DEPLOYMENT, RETRIEVAL_DEPLOYMENT)  # these load the artifact
DOWNSTREAM_BATCH_SECTIONS = ("encoder", "retrieval", "rerank")  # args sections with a max_batch_size


class ConfigError(ValueError):
    """The Serve config cannot be applied; the message names the key."""


def application(config: dict) -> dict:
    """The config's one application (seqrank deploys exactly one)."""
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"applications: expected exactly one application, got {len(apps)}")
    return apps[0]


def is_model_deployment(name: str | None) -> bool:
    """Deployments that load the artifact: MODEL_DEPLOYMENTS and the retrieval shards."""
    return name in MODEL_DEPLOYMENTS or (name or "").startswith(SHARD_DEPLOYMENT_PREFIX)


def _models_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(container, model) pairs in a field's type: container '' = the value is the model, 'list', 'dict' = of it."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin is Annotated:
        return _models_in(args[0])
    if origin in (Union, types.UnionType):
        return [found for arg in args for found in _models_in(arg)]
    if origin in (list, tuple) and args:
        return [("list", model) for container, model in _models_in(args[0]) if container == ""]
    if origin is dict and len(args) == 2:
        return [("dict", model) for container, model in _models_in(args[1]) if container == ""]
    return []


def unknown_keys(value: Any, model: type[BaseModel], where: str) -> list[str]:
    """Every key of `value` (recursively) that `model` does not declare; pydantic would drop them silently."""
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {field.alias for field in fields.values() if field.alias}
    problems = [
        f"{where}.{key}: unknown key for {model.__name__} (known: {', '.join(sorted(known))})"
        for key in value
        if key not in known
    ]
    for name, field in fields.items():
        if name not in value:
            continue
        for container, inner in _models_in(field.annotation):
            item = value[name]
            if container == "" and isinstance(item, dict):
                problems += unknown_keys(item, inner, f"{where}.{name}")
            elif container == "list" and isinstance(item, list):
                for index, entry in enumerate(item):
                    problems += unknown_keys(entry, inner, f"{where}.{name}[{index}]")
            elif container == "dict" and isinstance(item, dict):
                for key, entry in item.items():
                    problems += unknown_keys(entry, inner, f"{where}.{name}.{key}")
    return problems


def check_serve_config(config: dict) -> None:
    """Raises ValueError listing every unknown key, or whatever Ray's schema, AppArgs or ModelUserConfig reject."""
    problems = unknown_keys(config, ServeDeploySchema, "serve_config")
    if problems:
        raise ValueError("unknown keys in the Serve config:\n  " + "\n  ".join(problems))
    ServeDeploySchema.model_validate(config)  # types and values; AutoscalingConfig values are not checked there
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []):
            if isinstance(deployment.get("autoscaling_config"), dict):
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        AppArgs.parse(app.get("args", {}))  # pydantic's errors name the key; unknown keys are errors there
        for deployment in app.get("deployments", []):
            if "user_config" in deployment:
                ModelUserConfig.parse(deployment["user_config"])


def check_topology(app: dict, args: AppArgs, where: str = "") -> tuple[str, ...]:
    """The deployments `args` bind; ConfigError naming any deployment the app lists beyond them (a deployment of
    another topology, or a misspelled name). A bound deployment the app does not list runs on its defaults."""
    bound = bound_deployments(args)
    for name in [d.get("name") for d in app.get("deployments", [])]:
        if name not in bound:
            raise ConfigError(f"{where}deployments[{name}]: not part of the app with encoder.placement "
                              f"{args.encoder.placement!r}, retrieval.placement {args.retrieval.placement!r} and "
                              f"rerank.placement {args.rerank.placement!r} (deployments: {list(bound)})")
    return bound


def bound_deployments(args: AppArgs) -> tuple[str, ...]:
    """The deployments build_app binds for these args (the topology)."""
    names = [INGRESS_DEPLOYMENT]
    if args.encoder.placement == OWN_DEPLOYMENT:
        names.append(ENCODER_DEPLOYMENT)
    if args.retrieval.placement == OWN_DEPLOYMENT:
        names.append(RETRIEVAL_DEPLOYMENT)
    if args.retrieval.num_shards > 1:
        names += [shard_deployment_name(shard) for shard in range(args.retrieval.num_shards)]
    if args.rerank.placement == OWN_DEPLOYMENT:
        names.append(RERANKER_DEPLOYMENT)
    return tuple(names)
