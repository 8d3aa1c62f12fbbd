"""The retraining loop end to end on the session's service (docs/retraining.md): events recorded through
RecordEvents, exported with `seqrank events export`, a warm-started run on them (`seqrank train --init-from`),
then `seqrank promote` against the live service over gRPC. A candidate that never learned (learning rate 0) is
refused and the service keeps its model; the warm-started one is promoted with `--deploy local`, and the service
then answers with its model version. The promotion's hot reload runs under a closed-loop Rank load, and not one
call may fail."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from seqrank.serving.cli import main
from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.client.retry import NO_RETRY
from seqrank.serving.history import Event
from seqrank.serving.ops.serve_config_check import application
from seqrank.training.synthetic import generate_log
from tests.conftest import TINY_OVERRIDES
from tests.e2e.load import OK, ClosedLoop

NEW_USERS = 400  # users of the tiny run's synthetic world (same catalogue and seed) that it never saw
USER_PREFIX = "retrain-"
USERS_PER_CALL, EVENTS_PER_CALL = 100, 1000  # the service's default limits per RecordEvents call
LOAD_WORKERS = 4


def record_new_users(client) -> int:
    log = generate_log(NEW_USERS, 200, seed=0)
    frame = pd.DataFrame({"user": [USER_PREFIX + user for user in log.user_ids], "item": log.item_ids,
                          "t": log.timestamps, "b": log.behaviors})
    calls, batch, size = 0, {}, 0
    for user, rows in frame.groupby("user", sort=False):
        events = [Event(item, behavior, int(t)) for item, behavior, t in zip(rows["item"], rows["b"], rows["t"])]
        if batch and (len(batch) == USERS_PER_CALL or size + len(events) > EVENTS_PER_CALL):
            client.record(batch)
            calls, batch, size = calls + 1, {}, 0
        batch[user], size = events, size + len(events)
    client.record(batch)
    return len(frame)


def split_leave_last_out(exported, directory):
    """train.csv: every event of the new users but each one's last; holdout.csv: all of them (promote holds the
    last event out)."""
    events = pd.read_csv(exported, dtype={"user_id": str, "item_id": str})
    events = events[events["user_id"].str.startswith(USER_PREFIX)]
    events = events.sort_values("timestamp", kind="stable")
    last = events.groupby("user_id").tail(1).index
    train, holdout = directory / "train.csv", directory / "holdout.csv"
    events.drop(index=last).to_csv(train, index=False)
    events.to_csv(holdout, index=False)
    return train, holdout


def promote(service, candidate, holdout, out, config_path, capsys) -> tuple[int, str, str]:
    status = main(["promote", "--candidate", str(candidate), "--against", service.grpc_target, "--holdout",
                   str(holdout), "--out", str(out), "--deploy", "local", "--serve-config", str(config_path),
                   "--address", service.dashboard_url])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_record_export_warm_start_promote_and_serve(service, tiny_run, synthetic_dataset, tmp_path, capsys):
    _, attributes = synthetic_dataset
    with service.client(timeout_s=60.0) as client:
        old_version = client.model_info().model_version
        recorded = record_new_users(client)
    store = application(service.config)["args"]["ingress"]["history"]["url"]
    exported = tmp_path / "events.csv"
    assert main(["events", "export", "--store", store, "--out", str(exported)]) == 0
    train, holdout = split_leave_last_out(exported, tmp_path)
    assert len(pd.read_csv(holdout)) == recorded
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(service.config))  # the config the session's service runs
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    try:
        # a candidate that never learned: refused, nothing exported, the service unchanged
        assert main(["train", "--data", str(train), "--attributes", str(attributes), "--out", str(tmp_path / "bad"),
                     "--quiet", *sets, "--set", "optim.max_epochs=1", "--set", "optim.lr=0.0"]) == 0
        status, out, err = promote(service, tmp_path / "bad", holdout, tmp_path / "bad-artifact", config_path, capsys)
        assert status == 1, out + err
        assert len(err.strip().splitlines()) == 1 and err.startswith("refused: candidate worse"), err
        assert not (tmp_path / "bad-artifact").exists()
        with service.client() as client:
            assert client.model_info().model_version == old_version

        # warm start from the serving model's run on the new events: promoted and served
        assert main(["train", "--init-from", str(tiny_run), "--data", str(train), "--out", str(tmp_path / "warm"),
                     "--quiet", "--set", "optim.max_epochs=2", "--set", "optim.lr=0.001"]) == 0
        assert json.loads((tmp_path / "warm" / "parent.json").read_text())["path"] == str(tiny_run.resolve())
        def rank(client: RankingClient, worker: int, sequence: int):
            return client.rank(f"{USER_PREFIX}u{(worker + LOAD_WORKERS * sequence) % NEW_USERS}", k=10)

        new_client = lambda: RankingClient(service.grpc_target, timeout_s=60.0, retry=NO_RETRY)  # noqa: E731
        with ClosedLoop(new_client, rank, LOAD_WORKERS, max_s=300.0) as load:
            load.wait_until(lambda: load.count() >= 20, 120, "Rank load flowing before the promotion")
            status, out, err = promote(service, tmp_path / "warm", holdout, tmp_path / "warm-artifact", config_path,
                                       capsys)
            assert status == 0, out + err
            new_version = json.loads((tmp_path / "warm-artifact" / "manifest.json").read_text())["model_version"]
            load.wait_until(lambda: any(o.response is not None and o.response.model_version == new_version
                                        for o in load.snapshot()), 120, "Rank answered by the promoted model")
        outcomes = load.snapshot()
        assert [(o.code, o.details) for o in outcomes if o.code != OK] == []  # the reload dropped no request
        assert {o.response.model_version for o in outcomes} == {old_version, new_version}
        assert new_version != old_version and f"deployed {new_version}" in out
        with service.client() as client:
            assert client.model_info().model_version == new_version
            user = f"{USER_PREFIX}u0"
            assert client.rank(user, k=5).model_version == new_version  # the recorded history, the new model
    finally:
        service.apply(service.config)  # back to the session's artifact for the other tests
