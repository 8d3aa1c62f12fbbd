"""The one Serve config and its preflight: what `seqrank serve` / `seqrank deploy` refuse before submitting."""

import copy
from pathlib import Path

import pytest

from seqrank.serving.ops.deploy import localize, preflight, read_serve_config
from seqrank.serving.ops.serve_config_check import MODEL_DEPLOYMENTS, ConfigError, application, bound_deployments
from seqrank.serving.servicers import HEALTH_SERVICER_FUNCTION, RANKING_SERVICER_FUNCTION
from seqrank.training.artifact import ArtifactError
from tests.serving.artifacts import write_small_artifact
from tests.topology import with_deployment_pools


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return write_small_artifact(tmp_path_factory.mktemp("artifacts") / "v1")


@pytest.fixture
def config(artifact) -> dict:
    return localize(read_serve_config(), artifact_path=artifact)


@pytest.fixture
def pool_config(config) -> dict:
    """The committed config with the Encoder and Retrieval deployments of the Kubernetes topology."""
    return with_deployment_pools(config)


def deployments(config) -> dict:
    return {d["name"]: d for d in application(config)["deployments"]}


def test_committed_config_serves_both_grpc_services_with_a_route_prefix():
    config = read_serve_config()
    servicers = config["grpc_options"]["grpc_servicer_functions"]
    assert HEALTH_SERVICER_FUNCTION in servicers
    assert RANKING_SERVICER_FUNCTION in servicers
    assert config["grpc_options"]["port"] == 9000 and config["grpc_options"]["enable_reflection"] is True
    app = application(config)
    assert app["route_prefix"] and app["import_path"] == "seqrank.serving.app:build_app"
    by_name = deployments(config)
    assert set(by_name) == {"RankingIngress"}  # encoder, retrieval and MMR run inside the ingress
    assert all(d["max_ongoing_requests"] > 5 and d["max_queued_requests"] > 0 for d in by_name.values())
    args = app["args"]
    assert (args["encoder"]["placement"], args["retrieval"]["placement"], args["rerank"]["placement"]) == (
        "ingress", "ingress", "retrieval")


def test_the_kubernetes_pools_pass_preflight_with_an_autoscaled_encoder(pool_config):
    args = preflight(pool_config)
    assert bound_deployments(args) == ("RankingIngress", "Encoder", "Retrieval")
    autoscaling = deployments(pool_config)["Encoder"]["autoscaling_config"]
    assert autoscaling["max_replicas"] >= autoscaling["min_replicas"] >= 1


def test_committed_config_passes_preflight_with_a_real_artifact(config):
    args = preflight(config)
    assert args.rerank.placement == "retrieval"


def test_localize_points_every_model_deployment_at_one_absolute_artifact(tmp_path):
    original = read_serve_config()
    before = copy.deepcopy(original)
    config = localize(original, artifact_path="relative/artifact", base_dir=tmp_path)
    assert original == before  # a copy is returned
    for name in set(MODEL_DEPLOYMENTS) & set(deployments(config)):
        assert deployments(config)[name]["user_config"]["artifact_path"] == str(tmp_path / "relative" / "artifact")
    assert application(config)["args"]["ingress"]["history"]["url"] == f"sqlite:///{tmp_path}/seqrank-history.db"
    kept = localize(read_serve_config(), base_dir=tmp_path)  # no override: the config's own path, made absolute
    kept_path = deployments(kept)["RankingIngress"]["user_config"]["artifact_path"]
    assert kept_path == str(tmp_path / "artifacts" / "current")


def test_absolute_sqlite_urls_are_kept(tmp_path):
    config = read_serve_config()
    application(config)["args"]["ingress"]["history"]["url"] = "sqlite:////var/lib/seqrank.db"
    assert application(localize(config, base_dir=tmp_path))["args"]["ingress"]["history"]["url"] == (
        "sqlite:////var/lib/seqrank.db")


def test_unknown_serve_keys_are_refused(pool_config):
    deployments(pool_config)["Encoder"]["max_ongoing_request"] = 10  # Ray's schema would silently drop it
    deployments(pool_config)["Encoder"]["ray_actor_options"]["num_gpu"] = 1
    with pytest.raises(ConfigError) as error:
        preflight(pool_config)
    for key in ("deployments[1].max_ongoing_request", "deployments[1].ray_actor_options.num_gpu"):
        assert key in str(error.value)


def test_bad_autoscaling_values_are_refused(pool_config):
    deployments(pool_config)["Encoder"]["autoscaling_config"]["max_replicas"] = 0  # Ray's schema does not check it
    with pytest.raises(ConfigError, match="max_replicas"):
        preflight(pool_config)


def test_unknown_app_args_are_refused(config):
    application(config)["args"]["encoder"]["batch_size"] = 8
    with pytest.raises(ConfigError, match="batch_size"):
        preflight(config)


def test_model_deployments_must_name_the_same_artifact(pool_config, tmp_path):
    deployments(pool_config)["Retrieval"]["user_config"]["artifact_path"] = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="one artifact"):
        preflight(pool_config)


def test_missing_user_config_is_refused(pool_config):
    del deployments(pool_config)["Encoder"]["user_config"]
    with pytest.raises(ConfigError, match=r"deployments\[Encoder\].user_config"):
        preflight(pool_config)


def test_corrupted_artifact_is_refused_before_submitting(config, artifact, tmp_path):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifact, corrupt)
    (corrupt / "index.hnsw").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="index.hnsw"):
        preflight(localize(config, artifact_path=corrupt))


def test_topology_decides_which_deployments_the_config_may_list(pool_config):
    config = pool_config
    application(config)["deployments"].append({"name": "Reranker", "max_ongoing_requests": 32})
    with pytest.raises(ConfigError, match=r"deployments\[Reranker\]"):
        preflight(config)
    application(config)["args"]["rerank"] = {"placement": "deployment"}
    assert bound_deployments(preflight(config)) == ("RankingIngress", "Encoder", "Retrieval", "Reranker")
    application(config)["args"]["retrieval"]["placement"] = "ingress"
    with pytest.raises(ConfigError, match=r"deployments\[Retrieval\]"):  # no longer bound
        preflight(config)
    application(config)["deployments"] = [d for d in application(config)["deployments"] if d["name"] != "Retrieval"]
    assert bound_deployments(preflight(config)) == ("RankingIngress", "Encoder", "Reranker")
    application(config)["args"]["encoder"]["placement"] = "ingress"
    with pytest.raises(ConfigError, match=r"deployments\[Encoder\]: not part of the app with encoder.placement"):
        preflight(config)
    application(config)["deployments"] = [d for d in application(config)["deployments"] if d["name"] != "Encoder"]
    assert bound_deployments(preflight(config)) == ("RankingIngress", "Reranker")


def test_retrieval_deployment_needs_the_artifact_too(pool_config):
    del deployments(pool_config)["Retrieval"]["user_config"]
    with pytest.raises(ConfigError, match=r"deployments\[Retrieval\].user_config"):
        preflight(pool_config)


def test_ingress_queue_limit_must_not_cap_its_batches(config):
    deployments(config)["RankingIngress"]["max_ongoing_requests"] = 8  # below ingress.max_batch_size = 16
    with pytest.raises(ConfigError, match=r"deployments\[RankingIngress\].max_ongoing_requests"):
        preflight(config)


def test_an_ingress_batch_must_fit_every_downstream_batch(config):
    application(config)["args"]["retrieval"]["max_batch_size"] = 8  # below ingress.max_batch_size = 16
    with pytest.raises(ConfigError, match="args.retrieval.max_batch_size"):
        preflight(config)
