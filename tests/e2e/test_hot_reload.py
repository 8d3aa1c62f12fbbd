"""Hot reload through the config path: a new artifact replaces model and index in the running replicas while
Rank traffic continues (one client in order; several clients against a different catalogue, every response
coherent); a broken artifact leaves the old version serving."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import pandas as pd
import pytest

from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.client.retry import NO_RETRY
from seqrank.serving.history import Event
from seqrank.serving.ops.deploy import submit, wait_until_running
from seqrank.training.artifact import IndexParams
from seqrank.training.export import export_run
from tests.conftest import TINY_OVERRIDES
from tests.e2e.load import OK, ClosedLoop

AFTER_SWAP_REQUESTS = 20
LOAD_WORKERS = 4
RENAMED_PREFIX = "v2-"  # odd-numbered items of the session log carry it in the second catalogue


def replica_ids(service) -> dict[str, set[str]]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()
    deployments = details["applications"][service.app_name]["deployments"]
    return {name: {replica["replica_id"] for replica in deployment["replicas"] if replica["state"] == "RUNNING"}
            for name, deployment in deployments.items()}


class Traffic:
    """Rank requests from a background thread; records (model_version or error) in order."""

    def __init__(self, service, events):
        self._client = service.client(timeout_s=60.0)
        self._events = events
        self.outcomes: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                response = self._client.rank("u-reload", recent_events=self._events, k=10)
                assert len(response.items) == 10
                self.outcomes.append(response.model_version)
            except (grpc.RpcError, AssertionError) as error:
                self.errors.append(repr(error))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()


@pytest.fixture(scope="module")
def second_artifact(tiny_run, tmp_path_factory):
    """The same run exported again: a new model_version, its index built from scratch."""
    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "v2", IndexParams(M=16, ef_construction=200,
                      ef_search=400), name="reloaded")


def model_version(artifact) -> str:
    return json.loads((artifact / "manifest.json").read_text())["model_version"]


def test_new_artifact_swaps_in_place_under_traffic(service, second_artifact, item_ids):
    old, new = model_version(service.artifact), model_version(second_artifact)
    events = [Event(item_ids[i], "pv") for i in (3, 17, 42)]
    replicas_before = replica_ids(service)
    try:
        with Traffic(service, events) as traffic:
            deadline = time.monotonic() + 60
            while len(traffic.outcomes) < 5 and not traffic.errors and time.monotonic() < deadline:
                time.sleep(0.05)  # traffic flows before the reload starts
            assert len(traffic.outcomes) >= 5, traffic.errors
            service.apply(service.with_artifact(second_artifact))
            swapped_at = len(traffic.outcomes)
            deadline = time.monotonic() + 60
            while len(traffic.outcomes) < swapped_at + AFTER_SWAP_REQUESTS and not traffic.errors:
                assert time.monotonic() < deadline, "traffic stalled after the reload"
                time.sleep(0.05)
        assert traffic.errors == []
        assert set(traffic.outcomes) <= {old, new} and traffic.outcomes[0] == old
        # the traffic thread sends one request at a time: the one in flight while apply() returned may still
        # finish on the old version (in-flight requests are unharmed); every later one must see the new version
        assert all(version == new for version in traffic.outcomes[swapped_at + 1:])
        first_new = traffic.outcomes.index(new)
        assert all(version == new for version in traffic.outcomes[first_new:])  # never back to the old one
        with service.client() as client:
            assert client.model_info().model_version == new
        assert replica_ids(service) == replicas_before  # reconfigured, not replaced
    finally:
        service.apply(service.config)  # back to the session's artifact for the other tests
    with service.client() as client:
        assert client.model_info().model_version == old


def test_broken_artifact_leaves_the_old_version_serving(service, tmp_path, item_ids):
    broken = tmp_path / "broken"
    shutil.copytree(service.artifact, broken)
    (broken / "encoder.safetensors").write_bytes(b"truncated")
    replicas_before = replica_ids(service)
    # Straight to Serve, past `preflight` (which refuses it): what a hand-edited serveConfigV2 would do.
    submit(service.with_artifact(broken), service.dashboard_url)
    wait_until_running(service.dashboard_url, service.app_name, timeout_s=120)
    try:
        with service.client() as client:
            response = client.rank("u-broken", recent_events=[Event(item_ids[5], "pv")], k=5)
            assert response.model_version == model_version(service.artifact) and len(response.items) == 5
            assert client.model_info().model_version == model_version(service.artifact)
        assert replica_ids(service) == replicas_before
    finally:
        service.apply(service.config)


@pytest.fixture(scope="module")
def renamed_catalogue_artifact(synthetic_dataset, tmp_path_factory):
    """A model trained on the session's log with every odd-numbered item renamed: the two catalogues share only
    the even-numbered items, so a response's items show which catalogue produced them."""
    from seqrank.training.config import load_config
    from seqrank.training.synthetic import SYNTHETIC_ITEM
    from seqrank.training.train import fit

    def rename(item_id: str) -> str:
        return RENAMED_PREFIX + item_id if int(SYNTHETIC_ITEM.fullmatch(item_id).group(1)) % 2 else item_id

    events_path, attributes_path = synthetic_dataset
    directory = tmp_path_factory.mktemp("renamed")
    events = pd.read_csv(events_path)
    events["item_id"] = events["item_id"].map(rename)
    events.to_csv(directory / "events.csv", index=False)
    attributes = json.loads(attributes_path.read_text())
    (directory / "attributes.json").write_text(json.dumps({rename(k): v for k, v in attributes.items()}))
    config = load_config(None, TINY_OVERRIDES + ["optim.max_epochs=2", f"data.path={directory / 'events.csv'}",
                                                 f"data.attributes={directory / 'attributes.json'}"])
    fit(config, directory / "run", progress=False)
    return export_run(directory / "run", directory / "artifact", IndexParams(M=16, ef_construction=200,
                      ef_search=400), name="renamed")


def catalogue(artifact) -> set[str]:
    return set(json.loads((artifact / "item_ids.json").read_text())[1:])  # [0] is the padding entry


@pytest.mark.slow  # trains a second small model
def test_swap_to_another_catalogue_under_concurrent_load_keeps_every_response_coherent(
    service, renamed_catalogue_artifact
):
    old, new = model_version(service.artifact), model_version(renamed_catalogue_artifact)
    catalogues = {old: catalogue(service.artifact), new: catalogue(renamed_catalogue_artifact)}
    shared = sorted(catalogues[old] & catalogues[new])
    assert catalogues[old] - catalogues[new] and catalogues[new] - catalogues[old]  # each has items of its own
    histories = [[Event(shared[(7 * n + 5 * i) % len(shared)], "pv") for i in range(6)] for n in range(8)]

    def rank(client: RankingClient, worker: int, sequence: int):
        return client.rank(f"u-swap-{worker}", recent_events=histories[(worker + sequence) % 8], k=10)

    new_client = lambda: RankingClient(service.grpc_target, timeout_s=60.0, retry=NO_RETRY)  # noqa: E731
    try:
        with ClosedLoop(new_client, rank, LOAD_WORKERS, max_s=240.0) as load:
            load.wait_until(lambda: load.count() >= 20, 120, "Rank load flowing before the swap")
            service.apply(service.with_artifact(renamed_catalogue_artifact))
            swapped_at = time.monotonic()
            load.wait_until(lambda: load.count(after=swapped_at) >= AFTER_SWAP_REQUESTS, 120,
                            "Rank answered after the swap")
        outcomes = load.snapshot()
        assert [o for o in outcomes if o.code != OK] == []
        for outcome in outcomes:
            version = outcome.response.model_version
            items = [item.item_id for item in outcome.response.items]
            assert version in catalogues and len(items) == 10, (version, items)
            assert set(items) <= catalogues[version], (version, sorted(set(items) - catalogues[version]))
        assert {o.response.model_version for o in outcomes if o.started > swapped_at} == {new}
        assert {o.response.model_version for o in outcomes} == {old, new}
    finally:
        service.apply(service.config)
