"""The ingress's pure parts: history source and cold start, the fallback list, proto conversion."""

import pytest

from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.errors import NotFound
from seqrank.serving.ingress import StageClock, choose_source, fallback_list, model_info, rank_response
from seqrank.serving.messages import RankedItem, RankedList
from seqrank.serving.validation import Limits, validate_rank_request
from seqrank.training.artifact import load_artifact
from seqrank.v1 import ranking_pb2 as pb
from tests.serving.artifacts import BEHAVIORS, write_small_artifact


class RecordingMetrics:
    def __init__(self):
        self.stages = []

    def observe_stage(self, stage, ms):
        self.stages.append(stage)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    return Catalogue.from_artifact(load_artifact(write_small_artifact(tmp_path_factory.mktemp("a") / "v1")))


def query(catalogue, **fields):
    fields.setdefault("user_id", "u1")
    return validate_rank_request(pb.RankRequest(**fields), Limits(), catalogue.item_index_of, BEHAVIORS)


def test_a_history_with_a_known_item_keeps_its_source(catalogue):
    history = History(item_ids=("retired", "sku-3"), behaviors=("pv", "pv"))
    assert choose_source(history, pb.HISTORY_SOURCE_STORE, catalogue, "popular", "u1") == pb.HISTORY_SOURCE_STORE


@pytest.mark.parametrize("history", [History((), ()), History(("retired-1", "retired-2"), ("pv", "buy"))])
def test_no_usable_history_falls_back_to_popular(catalogue, history):
    assert choose_source(history, pb.HISTORY_SOURCE_STORE, catalogue, "popular", "u1") == pb.HISTORY_SOURCE_FALLBACK


def test_no_usable_history_is_not_found_naming_user_id_when_configured(catalogue):
    with pytest.raises(NotFound) as error:
        choose_source(History((), ()), pb.HISTORY_SOURCE_STORE, catalogue, "not_found", "u7")
    assert error.value.subject == "user_id" and "'u7'" in error.value.reason


def test_fallback_is_the_most_popular_minus_exclusions(catalogue):
    ranked = fallback_list(catalogue, query(catalogue, k=4, exclude_item_ids=["sku-2", "sku-4", "unknown"]))
    assert [item.item_id for item in ranked.items] == ["sku-1", "sku-3", "sku-5", "sku-6"]
    assert [item.score for item in ranked.items] == [12.0, 10.0, 8.0, 7.0]
    assert all(item.because_item_id == "" and item.explanation == "" for item in ranked.items)
    assert ranked.model_version == "small-v1"


def test_rank_response_lists_stages_in_order_then_total():
    metrics = RecordingMetrics()
    clock = StageClock(metrics)
    clock.add("history", 1.0)
    clock.add("encode", 2.0)
    ranked = RankedList("v1", (RankedItem("sku-1", 0.9, 3.0, "sku-2", "because you viewed sku-2"),), rerank_ms=0.1)
    response = rank_response(ranked, "req-1", pb.HISTORY_SOURCE_INLINE, clock)
    assert [t.stage for t in response.timings] == ["history", "encode", "total"]
    assert response.timings[-1].ms >= 0 and metrics.stages == ["history", "encode", "total"]
    assert response.items[0].because_item_id == "sku-2" and response.model_version == "v1"
    assert response.request_id == "req-1" and response.history_source == pb.HISTORY_SOURCE_INLINE


def test_model_info_reports_the_manifest(catalogue):
    info = model_info(catalogue)
    manifest = catalogue.manifest
    assert info.model_version == manifest["model_version"] and info.num_items == 12 and info.dim == 4
    assert (info.index.space, info.index.m, info.index.ef_search) == ("ip", 8, 50)
    assert list(info.behavior_names) == BEHAVIORS and info.max_history_length == 7
    assert dict(info.metrics) == {"NDCG@10": 0.5} and info.data_fingerprint == "f" * 64


# The RankingIngress class itself, outside Ray: downstream deployments replaced by fakes with `.method.remote()`.

import asyncio  # noqa: E402

import numpy as np  # noqa: E402

from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs  # noqa: E402
from seqrank.serving.history import HistoryConfig  # noqa: E402
from seqrank.serving.ingress import RankingIngress  # noqa: E402
from seqrank.serving.messages import CandidateSet, EncodedUser  # noqa: E402
from seqrank.serving.reload import VersionUnavailable  # noqa: E402
from tests.support import FakeContext  # noqa: E402


class Remote:
    """Stands in for `handle.method`: `.remote(...)` returns an awaitable, like a DeploymentResponse."""

    def __init__(self, function):
        self.function = function
        self.calls = []

    def remote(self, *args):
        self.calls.append(args)

        async def call():
            return self.function(*args)

        return call()


class FakeEncoder:
    """Has already reloaded to v2 and still holds v1."""

    def __init__(self):
        self.encode = Remote(lambda requests: [
            EncodedUser(np.ones(4, np.float32), request.model_version or "v2") for request in requests
        ])


class FakeRetrieval:
    """Still on v1 only: refuses v2 vectors the way a real replica does mid-rollout."""

    def __init__(self):
        self.rank = Remote(lambda requests: [self._rank(request) for request in requests])
        self.retrieve = Remote(lambda requests: [self._retrieve(request) for request in requests])

    @staticmethod
    def _check(request):
        if request.user.model_version != "v1":
            raise VersionUnavailable(request.user.model_version, ("v1",))

    def _rank(self, request):
        self._check(request)
        return RankedList("v1", (RankedItem("sku-9", 1.0, 2.0, "sku-1", "because you viewed sku-1"),), rerank_ms=0.2)

    def _retrieve(self, request):
        self._check(request)
        return CandidateSet("v1", np.array(["sku-9"], dtype=object), np.array([2.0]), np.ones((1, 4), np.float32),
                            request.history, np.ones((len(request.history), 4), np.float32))


class FakeReranker:
    def __init__(self):
        self.rerank = Remote(lambda requests: [
            RankedList(request.candidates.model_version,
                       (RankedItem(str(request.candidates.item_ids[0]), 0.5, 2.0, "", ""),), rerank_ms=0.3)
            for request in requests
        ])


def make_ingress(tmp_path, artifact_dir, reranker=None, max_concurrent_batches=2):
    """An ingress whose retrieval is a (fake) deployment, as with retrieval.placement: deployment."""
    args = IngressArgs(history=HistoryConfig(url=f"sqlite:///{tmp_path / 'history.db'}"),
                       max_concurrent_batches=max_concurrent_batches)
    encoder, retrieval = FakeEncoder(), FakeRetrieval()
    ingress = RankingIngress.func_or_class(args, EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="deployment"), encoder, retrieval, reranker)
    ingress.reconfigure({"artifact_path": str(artifact_dir)})
    return ingress, encoder, retrieval


def rank(ingress, **fields):
    return rank_many(ingress, [fields])[0]


def rank_many(ingress, requests_fields):
    """Concurrent Rank calls on one event loop, so they can share the ingress's batch."""

    async def run():
        calls = []
        for fields in requests_fields:
            context = FakeContext()
            request = pb.RankRequest(user_id="u1", recent_events=[pb.Event(item_id="sku-1", behavior="pv")], **fields)
            calls.append((ingress.Rank(request, grpc_context=context), context))
        responses = await asyncio.gather(*(call for call, _ in calls))
        return [(response, context) for response, (_, context) in zip(responses, calls)]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return write_small_artifact(tmp_path_factory.mktemp("artifact") / "v1")


def test_encoder_ahead_of_retrieval_is_re_encoded_once_with_the_version_retrieval_holds(tmp_path, artifact_dir):
    ingress, encoder, retrieval = make_ingress(tmp_path, artifact_dir)
    response, context = rank(ingress)
    assert context.code is None and response.model_version == "v1"
    assert [[r.model_version for r in call[0]] for call in encoder.encode.calls] == [[None], ["v1"]]
    assert [[r.user.model_version for r in call[0]] for call in retrieval.rank.calls] == [["v2"], ["v1"]]
    assert [t.stage for t in response.timings] == ["history", "encode", "retrieve", "encode", "retrieve", "rerank",
                                                  "total"]


def test_requests_arriving_while_a_batch_runs_share_one_call_per_stage(tmp_path, artifact_dir):
    ingress, encoder, retrieval = make_ingress(tmp_path, artifact_dir, max_concurrent_batches=1)
    results = rank_many(ingress, [{"k": 1}, {"k": 2}, {"k": 3}, {"k": 4}])
    assert all(context.code is None for _, context in results)
    # The first request finds the slot free and leaves alone; the other three queue behind it and leave together
    # (each batch is tried with v2, refused by the v1-only retrieval, and re-encoded once).
    assert [len(call[0]) for call in encoder.encode.calls] == [1, 1, 3, 3]
    assert [[request.k for request in call[0]] for call in retrieval.rank.calls] == [[1], [1], [2, 3, 4], [2, 3, 4]]


def test_own_reranker_deployment_receives_the_candidates(tmp_path, artifact_dir):
    reranker = FakeReranker()
    ingress, _, retrieval = make_ingress(tmp_path, artifact_dir, reranker)
    response, context = rank(ingress, k=1, diversity=0.4)
    assert context.code is None and [item.item_id for item in response.items] == ["sku-9"]
    assert retrieval.rank.calls == [] and len(retrieval.retrieve.calls) == 2  # v2 refused, then v1
    ((request,),), = reranker.rerank.calls
    assert (request.k, request.diversity, request.candidates.model_version) == (1, 0.4, "v1")


def test_validation_errors_never_reach_the_downstream_deployments(tmp_path, artifact_dir):
    ingress, encoder, retrieval = make_ingress(tmp_path, artifact_dir)
    _, context = rank(ingress, k=0)
    assert context.code.name == "INVALID_ARGUMENT" and context.details.startswith("k: ")
    assert encoder.encode.calls == [] and retrieval.rank.calls == []


def test_retrieval_inside_the_ingress_ranks_against_its_own_index(tmp_path, artifact_dir):
    """The default topology: the ingress searches its own copy of the index; MMR at lambda 0 is exact top-k."""
    user_vector = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    encoder = FakeEncoder()
    encoder.encode = Remote(lambda requests: [EncodedUser(user_vector, "small-v1") for _ in requests])
    args = IngressArgs(history=HistoryConfig(url=f"sqlite:///{tmp_path / 'history.db'}"))
    ingress = RankingIngress.func_or_class(args, EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="ingress"), encoder, None, None)
    ingress.reconfigure({"artifact_path": str(artifact_dir)})
    response, context = rank(ingress, k=5, diversity=0.0, exclude_item_ids=["sku-2"])
    assert context.code is None and response.model_version == "small-v1"
    item_vectors = np.load(artifact_dir / "item_vectors.npy")
    order = [f"sku-{i}" for i in np.argsort(-(item_vectors[1:] @ user_vector)) + 1]
    expected = [item for item in order if item not in ("sku-1", "sku-2")][:5]  # sku-1 is seen, sku-2 excluded
    assert [item.item_id for item in response.items] == expected
    assert all(item.because_item_id == "sku-1" for item in response.items)
