"""The client commands: event parsing, readable output, JSON output, and gRPC errors as code + details."""

import json
import socket

import pytest

from seqrank.serving.cli import build_parser, main
from seqrank.serving.cli.client import parse_event
from seqrank.serving.cli.render import format_response
from seqrank.serving.client.ranking_client import as_dict
from seqrank.serving.history import Event
from seqrank.v1 import ranking_pb2 as pb


def test_parse_event_reads_item_behaviour_and_timestamp():
    assert parse_event("sku-1") == Event("sku-1", "", None)
    assert parse_event("sku-1:cart") == Event("sku-1", "cart", None)
    assert parse_event("sku-1:buy:1700000000") == Event("sku-1", "buy", 1_700_000_000)
    with pytest.raises(ValueError, match="timestamp"):
        parse_event("sku-1:buy:yesterday")


def rank_response():
    return pb.RankResponse(
        items=[pb.RankedItem(item_id="sku-7", score=0.9, relevance=3.25, because_item_id="sku-1",
                             explanation="because you viewed sku-1")],
        model_version="v1", timings=[pb.StageTiming(stage="encode", ms=1.5), pb.StageTiming(stage="total", ms=4.0)],
        request_id="r1", history_source=pb.HISTORY_SOURCE_STORE,
    )


def test_rank_table_shows_items_timings_and_source():
    text = format_response(rank_response())
    assert "model v1, history store, request r1" in text and "encode 1.5" in text
    assert "sku-7" in text and "3.2500" in text and "because you viewed sku-1" in text


def test_record_and_info_tables():
    assert format_response(pb.RecordEventsResponse(accepted=3, stored=2, duplicates_ignored=1)) == (
        "accepted 3, stored 2, duplicates ignored 1")
    info = pb.GetModelInfoResponse(model_version="v1", num_items=200, dim=32, behavior_names=["pv", "buy"],
                                   index=pb.IndexParams(space="ip", m=16, ef_construction=200, ef_search=400),
                                   metrics={"NDCG@10": 0.46})
    text = format_response(info)
    assert "v1" in text and "M=16" in text and "ef_search=400" in text and "pv, buy" in text and "0.4600" in text


def test_json_output_uses_proto_field_names_and_numbers():
    data = as_dict(pb.GetModelInfoResponse(model_version="v1", num_items=200))
    assert data["num_items"] == 200 and data["model_version"] == "v1" and "behavior_names" in data
    assert json.loads(json.dumps(as_dict(rank_response())))["items"][0]["because_item_id"] == "sku-1"


def test_client_commands_parse_their_flags():
    args = build_parser().parse_args(["rank", "u1", "-k", "5", "--diversity", "0.4", "--exclude", "a", "b",
                                      "--target", "h:1", "--json"])
    assert (args.user_id, args.k, args.diversity, args.exclude, args.target, args.json) == (
        "u1", 5, 0.4, ["a", "b"], "h:1", True)


def test_unreachable_service_is_a_clear_error(capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["info", "--target", f"127.0.0.1:{port}"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE:")


def test_serve_refuses_to_listen_on_every_interface_without_tokens(tmp_path, capsys):
    # Ray Serve's gRPC proxy binds [::]: without tokens anyone on the network could rank and write. Refused
    # before anything starts (no Ray here), naming the setting and the way out.
    assert main(["serve", "--artifact", str(tmp_path / "absent")]) == 2
    error = capsys.readouterr().err
    assert "applications[0].args.ingress.auth.tokens: empty" in error and "--allow-unauthenticated" in error


def test_serve_accepts_a_config_with_tokens_or_an_explicit_opt_out():
    from seqrank.serving.cli.serve import require_auth_on_every_interface

    with_tokens = {"applications": [{"args": {"ingress": {"auth": {"tokens": "env:SEQRANK_TOKENS"}}}}]}
    require_auth_on_every_interface(with_tokens, allow_unauthenticated=False)  # nothing to refuse
    require_auth_on_every_interface({"applications": [{"args": {}}]}, allow_unauthenticated=True)
