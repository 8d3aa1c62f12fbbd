"""`seqrank quickstart`: the whole product on one machine, on the embedded defaults.

Generates the synthetic log, trains the default encoder on it, exports the artifact, then (once the service is up)
picks a few users' recent events, which the CLI then records over gRPC before it prints their ranked lists.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Callable

from seqrank.serving.history.events import Event

logger = logging.getLogger(__name__)

SAMPLE_USERS = 3
SAMPLE_EVENTS = 8  # recent events per sample user sent through RecordEvents
QUICK_TRAINING = ["optim.max_epochs=40", "optim.patience=5"]  # a couple of minutes on 2 CPU cores


def prepare_artifact(out_dir: Path, say: Callable[[str], None] = logger.info) -> tuple[Path, dict[str, list[Event]]]:
    """Synthetic log → trained run → artifact; returns the artifact and a few users' recent events. `say` reports
    each step (the CLI prints)."""
    from seqrank.training.artifact import load_artifact
    from seqrank.training.config import load_config
    from seqrank.training.data import load_interactions
    from seqrank.training.export import export_run
    from seqrank.training.synthetic import write_synthetic_dataset
    from seqrank.training.train import fit

    events_path, attributes_path = write_synthetic_dataset(out_dir / "data")
    say(f"synthetic log: {events_path}")
    config = load_config(None, [f"data.path={events_path}", f"data.attributes={attributes_path}", *QUICK_TRAINING])
    result = fit(config, out_dir / "run")
    say(f"trained: test NDCG@10 {result.test['NDCG@10']:.4f}, HR@10 {result.test['HR@10']:.4f} "
        f"(best epoch {result.best_epoch})")
    artifact_dir = export_run(out_dir / "run", out_dir / "artifact")
    say(f"artifact {load_artifact(artifact_dir).model_version} at {artifact_dir}")

    log = load_interactions(events_path)
    samples: dict[str, list[Event]] = {}
    for user_id in dict.fromkeys(log.user_ids[::-1]):  # users from the end of the log
        rows = (log.user_ids == user_id).nonzero()[0][-SAMPLE_EVENTS:]
        samples[user_id] = [Event(raw_item_id=log.item_ids[r], behavior=log.behaviors[r],
                                  timestamp_s=int(log.timestamps[r])) for r in rows]
        if len(samples) == SAMPLE_USERS:
            break
    return artifact_dir, samples


def write_token(out_dir: Path) -> tuple[Path, str]:
    """A fresh random bearer token in out_dir/token, readable by its owner only; returns (file, token)."""
    token = secrets.token_urlsafe(32)
    path = (out_dir / "token").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(token + "\n")
    return path, token
