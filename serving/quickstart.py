"""`seqrank quickstart`: the whole product on one machine, on the embedded defaults.

Generates the synthetic log, trains the default encoder on it, exports the artifact, then (once the service is up)
records a few users' recent events over gRPC and prints the ranked lists the service returns for them.
"""

from __future__ import annotations

from pathlib import Path

from serving.history import Event

SAMPLE_USERS = 3
SAMPLE_EVENTS = 8  # recent events per sample user sent through RecordEvents
QUICK_TRAINING = ["optim.max_epochs=40", "optim.patience=5"]  # a couple of minutes on 2 CPU cores


def prepare_artifact(out_dir: Path) -> tuple[Path, dict[str, list[Event]]]:
    """Synthetic log → trained run → artifact; returns the artifact and a few users' recent events."""
    from training.artifact import load_artifact
    from training.config import load_config
    from training.data import load_interactions
    from training.export import export_run
    from training.synthetic import write_synthetic_dataset
    from training.train import fit

    events_path, attributes_path = write_synthetic_dataset(out_dir / "data")
    print(f"synthetic log: {events_path}")
    config = load_config(None, [f"data.path={events_path}", f"data.attributes={attributes_path}", *QUICK_TRAINING])
    result = fit(config, out_dir / "run")
    print(f"trained: test NDCG@10 {result['NDCG@10']:.4f}, HR@10 {result['HR@10']:.4f} (best epoch {result['best_epoch']})")
    artifact_dir = export_run(out_dir / "run", out_dir / "artifact")
    print(f"artifact {load_artifact(artifact_dir).model_version} at {artifact_dir}")

    log = load_interactions(events_path)
    samples: dict[str, list[Event]] = {}
    for user_id in dict.fromkeys(log.user_ids[::-1]):  # users from the end of the log
        rows = (log.user_ids == user_id).nonzero()[0][-SAMPLE_EVENTS:]
        samples[user_id] = [Event(raw_item_id=log.item_ids[r], behavior=log.behaviors[r],
                                  timestamp_s=int(log.timestamps[r])) for r in rows]
        if len(samples) == SAMPLE_USERS:
            break
    return artifact_dir, samples


def show_ranked_lists(target: str, samples: dict[str, list[Event]]) -> None:
    """RecordEvents then Rank for each sample user, over real gRPC, printed as tables."""
    from serving.cli import format_response
    from serving.client import RankingClient

    with RankingClient(target) as client:
        for user_id, events in samples.items():
            client.record({user_id: events}, idempotency_key=f"quickstart-{user_id}")
            recent = ", ".join(f"{e.raw_item_id}:{e.behavior}" for e in events[-4:])
            print(f"\nuser {user_id} (recent: … {recent})")
            print(format_response(client.rank(user_id, k=10)))
