"""The committed generated code matches the .proto, imports from the package, and round-trips over gRPC."""

from concurrent import futures
from pathlib import Path

import grpc
import pytest

from seqrank.serving.ops import protogen
from seqrank.v1 import ranking_pb2, ranking_pb2_grpc

CHECKOUT = Path(__file__).resolve().parents[2]


def test_committed_generated_code_matches_a_fresh_generation(tmp_path):
    fresh_files = protogen.generate(tmp_path / "generated", proto_root=CHECKOUT / protogen.PROTO_ROOT)
    committed_dir = CHECKOUT / protogen.GENERATED_DIR
    fresh = {path.relative_to(tmp_path / "generated"): path.read_bytes() for path in fresh_files}
    committed = {
        path.relative_to(committed_dir): path.read_bytes()
        for path in committed_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sorted(map(str, committed)) == sorted(map(str, fresh)), "run `python -m seqrank.serving.ops.protogen`"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh generation: run `python -m seqrank.serving.ops.protogen`"


def test_grpc_module_imports_its_messages_through_the_package():
    # Ray Serve proxies import the servicer module by its installed name, seqrank.v1, which is protoc's own.
    assert ranking_pb2_grpc.seqrank_dot_v1_dot_ranking__pb2 is ranking_pb2
    assert ranking_pb2.DESCRIPTOR.name == "seqrank/v1/ranking.proto"


def test_generate_fails_loudly_and_keeps_old_output_on_a_bad_proto(tmp_path):
    protos = tmp_path / "protos" / "seqrank" / "v1"
    protos.mkdir(parents=True)
    (protos / "ranking.proto").write_text('syntax = "proto3";\nmessage Broken { int32 = 1; }\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep_pb2.py").write_text("old")
    with pytest.raises(RuntimeError, match="protoc failed"):
        protogen.generate(out, proto_root=tmp_path / "protos")
    assert (out / "keep_pb2.py").read_text() == "old"


@pytest.mark.parametrize("field", ["k", "candidate_pool_size", "diversity", "exclude_seen"])
def test_knobs_distinguish_unset_from_zero(field):
    assert not ranking_pb2.RankRequest().HasField(field)
    assert ranking_pb2.RankRequest(**{field: 0}).HasField(field)


def test_stub_and_servicer_round_trip_over_real_grpc():
    class Servicer(ranking_pb2_grpc.RankingServiceServicer):
        def Rank(self, request, context):
            return ranking_pb2.RankResponse(
                request_id=request.request_id,
                items=[ranking_pb2.RankedItem(item_id=e.item_id) for e in request.recent_events],
                history_source=ranking_pb2.HISTORY_SOURCE_INLINE,
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            request = ranking_pb2.RankRequest(
                user_id="u1", request_id="r-7", recent_events=[ranking_pb2.Event(item_id="sku-1", behavior="pv")]
            )
            response = stub.Rank(request, timeout=10)
            with pytest.raises(grpc.RpcError) as unimplemented:
                stub.GetModelInfo(ranking_pb2.GetModelInfoRequest(), timeout=10)
    finally:
        server.stop(grace=None)
    assert response.request_id == "r-7"
    assert [item.item_id for item in response.items] == ["sku-1"]
    assert response.history_source == ranking_pb2.HISTORY_SOURCE_INLINE
    assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
