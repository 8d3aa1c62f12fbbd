"""Events recorded through the real gRPC RecordEvents API come back out of the service's SQLite history through
`seqrank events export`, and the training loader reads them as recorded (oracle: the events this test sent)."""

from __future__ import annotations

from collections import Counter

from seqrank.serving.cli import main
from seqrank.serving.history import Event
from seqrank.serving.ops.serve_config_check import application
from seqrank.training.data import load_interactions

BASE_S = 1_600_000_000  # any time in the past is accepted


def test_events_recorded_over_grpc_are_exported_as_recorded(service, client, manifest, item_ids, tmp_path):
    behaviors = [""] + list(manifest["behavior_names"])
    item = lambda u, i: item_ids[1 + (u * 7 + i) % (len(item_ids) - 1)]  # noqa: E731
    sent = {f"u-export-{u}": [Event(item(u, i), behaviors[(u + i) % len(behaviors)], BASE_S + 60 * u + i)
                              for i in range(4)]
            for u in range(3)}
    client.record(sent)
    first = [(user, e.raw_item_id, e.timestamp_s, e.behavior or "pv") for user, events in sent.items() for e in events]
    url = application(service.config)["args"]["ingress"]["history"]["url"]
    out, cursor = tmp_path / "events.csv", tmp_path / "cursor.json"
    assert main(["events", "export", "--store", url, "--out", str(out), "--cursor", str(cursor)]) == 0
    more = {"u-export-0": [Event(item_ids[2], "", BASE_S - 5)]}  # later, with an older timestamp
    client.record(more)
    assert main(["events", "export", "--store", url, "--out", str(out), "--cursor", str(cursor)]) == 0

    loaded = load_interactions(out)
    ours = Counter((u, i, t, b) for u, i, t, b in zip(loaded.user_ids, loaded.item_ids, loaded.timestamps.tolist(),
                                                         loaded.behaviors) if u.startswith("u-export-"))
    assert ours == Counter(first + [("u-export-0", item_ids[2], BASE_S - 5, "pv")])
