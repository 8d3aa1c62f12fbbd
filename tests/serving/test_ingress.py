"""The ingress's pure parts: history source and cold start, the fallback list, proto conversion."""

import pytest

from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.errors import NotFound
from seqrank.serving.history import HistoryConfig as HistoryConfig
from seqrank.serving.ingress import StageClock, choose_source, fallback_list, model_info, rank_response
from seqrank.serving.live_catalogue import LiveItems, build_view
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
    ranked = fallback_list(build_view(catalogue, LiveItems()),
                           query(catalogue, k=4, exclude_item_ids=["sku-2", "sku-4", "unknown"]))
    assert [item.item_id for item in ranked.items] == ["sku-1", "sku-3", "sku-5", "sku-6"]
    # Not personalised: scored by the items' share of the training events (the proto's words), not raw counts.
    total = float(catalogue.item_popularity.sum())
    assert [item.relevance for item in ranked.items] == pytest.approx([c / total for c in (12.0, 10.0, 8.0, 7.0)])
    assert [item.score for item in ranked.items] == [item.relevance for item in ranked.items]
    assert 0.0 < ranked.items[-1].relevance <= ranked.items[0].relevance <= 1.0
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
    info = model_info(build_view(catalogue, LiveItems()), Limits(), HistoryConfig())
    manifest = catalogue.manifest
    assert info.model_version == manifest["model_version"] and info.num_items == 12 and info.dim == 4
    assert (info.index.space, info.index.m, info.index.ef_search) == ("ip", 8, 50)
    assert list(info.behavior_names) == BEHAVIORS and info.max_history_length == 7
    assert dict(info.metrics) == {"NDCG@10": 0.5} and info.data_fingerprint == "f" * 64


def test_model_info_keeps_metrics_apart_from_training_bookkeeping(catalogue):
    import dataclasses

    recorded = {"NDCG@10": 0.5, "HR@10": 0.7, "MRR": 0.3, "coverage@20": 0.9, "ILD@5": 0.4, "users": 100,
                "best_epoch": 12, "epochs_run": 22, "seconds": 81.5, "seconds_to_best": 40.0, "workers": 1,
                "transition_weight": 1.0}
    manifest = {**catalogue.manifest, "metrics": recorded}
    info = model_info(build_view(dataclasses.replace(catalogue, manifest=manifest), LiveItems()), Limits(),
                      HistoryConfig())
    assert dict(info.metrics) == {"NDCG@10": 0.5, "HR@10": 0.7, "MRR": 0.3, "coverage@20": 0.9, "ILD@5": 0.4,
                                  "users": 100}
    assert dict(info.training_summary) == {"best_epoch": 12, "epochs_run": 22, "seconds": 81.5,
                                           "seconds_to_best": 40.0, "workers": 1, "transition_weight": 1.0}


def test_model_info_publishes_the_servers_limits_and_defaults(catalogue):
    limits = Limits(max_k=40, default_k=7, max_candidates=400, default_candidates=90, default_diversity=0.2,
                    max_inline_events=30, max_exclude_ids=20, max_events_per_call=60, max_users_per_call=6,
                    max_id_length=50, max_future_s=120)
    published = model_info(build_view(catalogue, LiveItems()), limits, HistoryConfig(catalogue_sync_ms=250)).limits
    assert (published.max_k, published.default_k, published.max_candidate_pool_size,
            published.default_candidate_pool_size, published.max_inline_events, published.max_exclude_item_ids,
            published.max_events_per_call, published.max_users_per_call, published.max_id_length,
            published.max_future_seconds, published.catalogue_sync_ms) == (40, 7, 400, 90, 30, 20, 60, 6, 50, 120, 250)
    assert published.default_diversity == pytest.approx(0.2)


# The RankingIngress class itself, outside Ray: downstream deployments replaced by fakes with `.method.remote()`.

import asyncio  # noqa: E402

import numpy as np  # noqa: E402

from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs  # noqa: E402
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


# Authentication on the ingress itself: with `ingress.auth.tokens` set, every RankingService method needs the bearer
# token (serving/config.py, docs/api.md); only the health Check is public, because probes carry no token.

from grpc_health.v1 import health_pb2  # noqa: E402

from seqrank.serving.auth import AuthConfig  # noqa: E402
from seqrank.serving.history import open_history_store  # noqa: E402

TOKEN = "ingress-test-token-0123456789"
TOKENS_VARIABLE = "SEQRANK_INGRESS_TEST_TOKENS"
# The service as the proto defines it, not as the ingress happens to decorate it: a new method is covered too.
RANKING_METHODS = [(method.name, method.input_type.name)
                   for method in pb.DESCRIPTOR.services_by_name["RankingService"].methods]


def guarded_ingress(tmp_path, artifact_dir, monkeypatch):
    """An ingress whose tokens come from an environment variable, as from a Kubernetes Secret."""
    monkeypatch.setenv(TOKENS_VARIABLE, TOKEN)
    args = IngressArgs(history=HistoryConfig(url=f"sqlite:///{tmp_path / 'history.db'}"),
                       auth=AuthConfig(tokens=f"env:{TOKENS_VARIABLE}"))
    ingress = RankingIngress.func_or_class(args, EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="deployment"), FakeEncoder(), FakeRetrieval(), None)
    ingress.reconfigure({"artifact_path": str(artifact_dir)})
    return ingress, args


def call(ingress, method, request, metadata=()):
    context = FakeContext(metadata)
    response = asyncio.run(getattr(ingress, method)(request, grpc_context=context))
    return response, context


@pytest.mark.parametrize("method, request_type", RANKING_METHODS, ids=[name for name, _ in RANKING_METHODS])
def test_every_ranking_service_method_refuses_a_call_without_the_token(tmp_path, artifact_dir, monkeypatch, method,
                                                                      request_type):
    """RecordEvents included: it writes users' histories, so a method marked public would let anyone do it."""
    ingress, _ = guarded_ingress(tmp_path, artifact_dir, monkeypatch)
    _, context = call(ingress, method, getattr(pb, request_type)())
    assert context.code is not None and context.code.name == "UNAUTHENTICATED"
    assert context.details.startswith("authorization: ")


def test_record_events_stores_nothing_without_a_valid_token_and_stores_with_it(tmp_path, artifact_dir, monkeypatch):
    """No token, a wrong token, the token without its scheme: UNAUTHENTICATED and the store untouched; then the
    same request with `authorization: Bearer <token>` is stored."""
    ingress, args = guarded_ingress(tmp_path, artifact_dir, monkeypatch)
    request = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u-auth", events=[pb.Event(item_id="sku-3",
                                                                                               behavior="pv")])])
    for metadata in ((), [("authorization", "Bearer " + "x" * len(TOKEN))], [("authorization", TOKEN)]):
        _, context = call(ingress, "RecordEvents", request, metadata)
        assert context.code is not None and context.code.name == "UNAUTHENTICATED", metadata
    store = open_history_store(args.history)
    try:
        assert store.recent("u-auth", 10) == []
        response, context = call(ingress, "RecordEvents", request, [("authorization", f"Bearer {TOKEN}")])
        assert context.code is None and response.accepted == 1
        assert [event.raw_item_id for event in store.recent("u-auth", 10)] == ["sku-3"]
    finally:
        store.close()


def test_the_health_check_answers_without_a_token(tmp_path, artifact_dir, monkeypatch):
    """The one public method, so the refusals above are about the token and not a broken ingress."""
    ingress, _ = guarded_ingress(tmp_path, artifact_dir, monkeypatch)
    response, context = call(ingress, "Check", health_pb2.HealthCheckRequest())
    assert context.code is None and response.status == health_pb2.HealthCheckResponse.SERVING


def test_every_excluded_id_is_kept_out_of_the_ranking_wherever_it_stands(tmp_path, artifact_dir):
    """Rank through the ingress with its own index: the list is the exact top-5 of the catalogue minus the seen
    item and ALL excluded ids, the best items excluded second and later in the list, after an unknown id."""
    user_vector = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    encoder = FakeEncoder()
    encoder.encode = Remote(lambda requests: [EncodedUser(user_vector, "small-v1") for _ in requests])
    args = IngressArgs(history=HistoryConfig(url=f"sqlite:///{tmp_path / 'history.db'}"))
    ingress = RankingIngress.func_or_class(args, EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="ingress"), encoder, None, None)
    ingress.reconfigure({"artifact_path": str(artifact_dir)})
    item_vectors = np.load(artifact_dir / "item_vectors.npy")
    order = [f"sku-{i}" for i in np.argsort(-(item_vectors[1:] @ user_vector), kind="stable") + 1]
    unseen = [item for item in order if item != "sku-1"]  # sku-1 is the inline history (rank_many)
    excluded = ["not-in-the-model", unseen[-1], unseen[0], "gone", unseen[2], unseen[1]]
    response, context = rank(ingress, k=5, diversity=0.0, exclude_item_ids=excluded)
    assert context.code is None
    assert [item.item_id for item in response.items] == [item for item in unseen if item not in excluded][:5]
