"""AppArgs: the committed Serve config parses; unknown keys, wrong types and broken invariants are errors."""

import pytest
import yaml
from pydantic import ValidationError

from serving.config import SERVE_CONFIG_PATH, AppArgs, ModelUserConfig


def committed_args() -> dict:
    return yaml.safe_load(SERVE_CONFIG_PATH.read_text())["applications"][0]["args"]


def test_committed_config_parses_to_its_stated_values():
    args = AppArgs.parse(committed_args())
    assert args.rerank.placement == "retrieval"
    assert args.ingress.cold_start == "popular"
    assert args.ingress.limits.max_k == 100 and args.ingress.history.max_events_per_user == 200
    assert args.retrieval.ef is None
    assert args.local.metrics_export_port == 8080


def test_empty_args_take_the_documented_defaults():
    assert AppArgs.parse({}) == AppArgs()


@pytest.mark.parametrize(
    "args, where",
    [
        ({"encoder": {"max_batch_sise": 8}}, "encoder.max_batch_sise"),
        ({"ingress": {"limits": {"max_kk": 5}}}, "ingress.limits.max_kk"),
        ({"ingress": {"history": {"uri": "sqlite:///x.db"}}}, "ingress.history.uri"),
        ({"retrieval": {"ef": "64"}}, "retrieval.ef"),  # strict: no str -> int coercion
        ({"encoder": {"max_batch_size": 0}}, "encoder.max_batch_size"),
        ({"rerank": {"placement": "elsewhere"}}, "rerank.placement"),
        ({"ingress": {"cold_start": "random"}}, "ingress.cold_start"),
        ({"ingress": {"limits": {"max_k": 5, "default_k": 10}}}, "limits.default_k"),  # Limits.__post_init__
        ({"surprise": {}}, "surprise"),
    ],
)
def test_bad_args_are_rejected_naming_the_key(args, where):
    with pytest.raises(ValidationError) as error:
        AppArgs.parse(args)
    assert where.split(".")[-1] in str(error.value)


def test_dataclass_sections_become_their_dataclasses():
    args = AppArgs.parse({"ingress": {"limits": {"max_k": 20, "default_k": 5}, "history": {"busy_timeout_s": 2}}})
    assert args.ingress.limits.max_k == 20 and args.ingress.limits.default_k == 5
    assert args.ingress.history.busy_timeout_s == 2.0


def test_model_user_config_requires_exactly_an_artifact_path():
    assert ModelUserConfig.parse({"artifact_path": "/a"}).artifact_path == "/a"
    for bad in ({}, {"artifact_path": ""}, {"artifact_path": "/a", "ef": 3}, {"artifact_path": 3}):
        with pytest.raises(ValidationError):
            ModelUserConfig.parse(bad)
    with pytest.raises(ValueError, match="user_config"):
        ModelUserConfig.parse(None)
