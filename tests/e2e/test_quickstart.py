"""`seqrank quickstart --exit`, README's first command, end to end on CPU: synthetic log, training, export, a real
local Ray Serve over real gRPC, events recorded into a real SQLite store, and ranked lists printed.

It runs the installed command in a child process, which starts its own Ray cluster (that is what the command does
for a user); the Serve config is the committed one with free ports so it cannot collide with the session's cluster.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from seqrank.serving.config import SERVE_CONFIG_PATH
from seqrank.serving.ops.quickstart import SAMPLE_EVENTS, SAMPLE_USERS
from seqrank.training.artifact import load_artifact
from seqrank.training.data import load_interactions
from tests.support import free_port

QUICKSTART_TIMEOUT_S = 900
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(-?\d+\.\d{4})\s+(-?\d+\.\d{4})\s")  # rank, item, score, relevance


@pytest.mark.slow
def test_quickstart_trains_serves_and_prints_ranked_lists(tmp_path):
    seqrank = shutil.which("seqrank") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "seqrank")
    config = yaml.safe_load(SERVE_CONFIG_PATH.read_text())
    grpc_port = free_port()
    config["grpc_options"]["port"] = grpc_port
    config["http_options"]["port"] = free_port()
    local = config["applications"][0]["args"]["local"]
    local["metrics_export_port"], local["dashboard_port"] = free_port(), free_port()
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "quickstart"

    result = subprocess.run([seqrank, "quickstart", "--exit", "--out", str(out), "--config", str(config_path),
                             "--num-cpus", "4"], capture_output=True, text=True, timeout=QUICKSTART_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert f"serving gRPC on 127.0.0.1:{grpc_port} (every interface, bearer token required)" in output
    token_file = out / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600  # the demo's own token, readable by its owner only
    assert len(token_file.read_text().strip()) >= 32

    artifact = load_artifact(out / "artifact")  # verified load: checksums, shapes
    catalogue = set(artifact.item_ids[1:])
    log = load_interactions(out / "data" / "events.csv")
    blocks = re.split(r"^user (\S+) \(recent: ", output, flags=re.MULTILINE)[1:]
    users = blocks[0::2]
    assert len(users) == SAMPLE_USERS, output
    with sqlite3.connect(out / "history.db") as db:
        for user_id, block in zip(users, blocks[1::2]):
            rows = [ROW.match(line) for line in block.splitlines()]
            rows = [row for row in rows if row]
            assert [int(row[1]) for row in rows] == list(range(1, 11)), block  # k=10, ranked 1..10
            items = [row[2] for row in rows]
            assert len(set(items)) == 10 and set(items) <= catalogue
            # The events the quickstart recorded are in the store (read back here with plain SQL), and the list
            # leaves them out (exclude_seen defaults to true).
            stored = {item for (item,) in db.execute("SELECT item_id FROM events WHERE user_id = ?", (user_id,))}
            rows_of_user = (log.user_ids == user_id).nonzero()[0][-SAMPLE_EVENTS:]
            assert stored == set(log.item_ids[rows_of_user])
            assert not set(items) & stored, (items, stored)
