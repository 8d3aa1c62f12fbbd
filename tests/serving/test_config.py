"""AppArgs: the committed Serve config parses; unknown keys, wrong types and broken invariants are errors."""

import pytest
import yaml
from pydantic import ValidationError

from seqrank.serving.config import SERVE_CONFIG_PATH, AppArgs, ModelUserConfig


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


def test_the_largest_request_the_limits_allow_fits_the_proxy_message_limit():
    """local.grpc_max_message_bytes must never refuse a valid request: ids at max_id_length of 4-byte characters."""
    from seqrank.v1 import ranking_pb2 as pb

    args = AppArgs.parse(committed_args())
    limits, widest = args.ingress.limits, "🙂" * args.ingress.limits.max_id_length
    event = pb.Event(item_id=widest, behavior="add-to-cart-long", timestamp=4_102_444_800)
    rank = pb.RankRequest(user_id=widest, recent_events=[event] * limits.max_inline_events, k=limits.max_k,
                          candidate_pool_size=limits.max_candidates, diversity=0.5, exclude_seen=True,
                          exclude_item_ids=[widest] * limits.max_exclude_ids, request_id=widest)
    per_user = limits.max_events_per_call // limits.max_users_per_call
    record = pb.RecordEventsRequest(idempotency_key=widest, users=[
        pb.UserEvents(user_id=widest, events=[event] * per_user) for _ in range(limits.max_users_per_call)])
    largest = max(rank.ByteSize(), record.ByteSize())
    assert largest <= args.local.grpc_max_message_bytes
    assert largest > args.local.grpc_max_message_bytes / 4  # and the limit is not far above what is needed
