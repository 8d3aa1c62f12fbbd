"""The promotion gate: a candidate model replaces the serving one only when held-out events do not show it worse.

Both models rank the same held-out events. For each held-out user the target is one event of the holdout file
and the history is every event of that user before it in the file (the newest MAX_HISTORY_EVENTS, the service's
default inline and stored limit): with `since`, the user's first event at or after `since` whose item is new to the
user; without, the user's last event, if its item is new to the user. Targets already in the history are left out
because the service excludes seen items (exclude_seen), so neither model could ever rank them: they would only
add zeros to both columns. Each model ranks every item it knows minus the history (full ranking); NDCG@10 and
HR@10 per user, a 95 % percentile-bootstrap interval of each mean (training/bootstrap.py) and of the paired
difference candidate - serving over the same users.

  - An artifact is ranked here, exactly: its encoder, its item vectors and its transition prior, as evaluation
    ranks them. History items it does not know are dropped, and a history left empty gets its most-popular list,
    as the service does; a target it does not know is a miss.
  - HOST:PORT is ranked through the service's RankBatch over gRPC, with diversity 0 (MMR keeps relevance order)
    and the history inline (recent_events: neither read nor stored): what the service answers, HNSW retrieval
    and candidate pool included. Events naming items it refuses as unknown are dropped and the request re-sent.

The rule (docs/retraining.md, "The promotion gate"): refuse when fewer than `min_users` users were held out (no
evidence), or when the upper bound of the paired-difference interval of NDCG@10 is below -margin (the candidate
is worse, beyond the margin, at 95 % confidence); otherwise promote.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from seqrank.serving.client.ranking_client import RankingClient, rank_request
from seqrank.serving.history.events import Event
from seqrank.training.artifact import Artifact
from seqrank.training.bootstrap import Interval, bootstrap_interval, paired_difference
from seqrank.training.data import load_interactions
from seqrank.training.model import encode_histories, load_encoder
from seqrank.training.vocab import PAD_INDEX, UNSPECIFIED_BEHAVIOR

K = 10
GATE_METRIC = f"NDCG@{K}"
METRICS = (GATE_METRIC, f"HR@{K}")
MAX_HISTORY_EVENTS = 200  # the service's default limits.max_inline_events and history.max_events_per_user
DEFAULT_MARGIN = 0.0
DEFAULT_MIN_USERS = 100
CONFIDENCE = 0.95
RESAMPLES = 2000
RANK_BATCH = 100  # requests per RankBatch call: the service's default limits.max_batch_requests
EVAL_BATCH = 256
NO_BEHAVIOR_INDEX = 0  # a behaviour name the model does not know embeds as the padding row (serving/catalogue.py)
UNKNOWN_HISTORY_ITEM = re.compile(r"recent_events\[(\d+)\]\.item_id: unknown item id")
GRPC_OK = 0


class PromotionError(ValueError):
    """The gate cannot run: an unreadable holdout, a service answering errors; the message names the cause."""


@dataclass(frozen=True)
class HeldOutUser:
    user_id: str
    history: tuple[Event, ...]  # oldest first, at most MAX_HISTORY_EVENTS
    target: str  # raw item id


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # one line


@dataclass(frozen=True)
class Comparison:
    """Per-metric intervals of both models and of their paired difference, and the gate's decision."""

    users: int
    candidate: dict[str, Interval]
    against: dict[str, Interval]
    difference: dict[str, Interval]  # candidate - against, paired over the same users
    decision: Decision


# ------------------------------------------------------------------------------------------------ the holdout


def read_holdout(path: str | Path, since: int | None = None) -> list[HeldOutUser]:
    """Held-out users of an events file (any format `seqrank train --data` reads); see the module docstring."""
    events = load_interactions(path)
    behaviors = events.behaviors if events.behaviors is not None else np.full(len(events), UNSPECIFIED_BEHAVIOR)
    frame = pd.DataFrame({"user": events.user_ids, "item": events.item_ids, "t": events.timestamps,
                          "b": behaviors}).drop_duplicates()
    frame = frame.sort_values("t", kind="stable").sort_values("user", kind="stable")  # by (user, time), file order
    users = []
    for user, rows in frame.groupby("user", sort=False):
        items, stamps, names = rows["item"].tolist(), rows["t"].to_numpy(), rows["b"].tolist()
        target = _target_position(items, stamps, since)
        if target is None:
            continue
        start = max(0, target - MAX_HISTORY_EVENTS)
        history = tuple(Event(item, name) for item, name in zip(items[start:target], names[start:target]))
        users.append(HeldOutUser(str(user), history, items[target]))
    return users


def _target_position(items: list[str], stamps: np.ndarray, since: int | None) -> int | None:
    """The held-out event's position in a user's time-ordered events, or None (no history, or a repeat)."""
    if since is None:
        position = len(items) - 1
        return position if position > 0 and items[position] not in set(items[:position]) else None
    seen = set()
    for position, (item, stamp) in enumerate(zip(items, stamps)):
        if stamp >= since and position > 0 and item not in seen:
            return position
        seen.add(item)
    return None


# ------------------------------------------------------------------------------------------------ ranking


def per_user_metrics(ranks: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """0-based target ranks (a miss: any rank >= k) → per-user NDCG@k = 1/log2(rank + 2) inside the top k, HR@k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    inside = ranks < k
    return {f"NDCG@{k}": np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0.0) + 2.0), 0.0),
            f"HR@{k}": inside.astype(np.float64)}


@torch.no_grad()
def artifact_ranks(artifact: Artifact, users: list[HeldOutUser]) -> np.ndarray:
    """(U,) 0-based rank of each target among the artifact's items minus the history; `num_items` = a miss."""
    model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    item_vectors = torch.from_numpy(artifact.item_vectors)  # (I+1, D)
    behavior_of = {name: index for index, name in enumerate(artifact.behavior_names, start=1)}
    if artifact.behavior_names:
        behavior_of[UNSPECIFIED_BEHAVIOR] = 1  # the service reads "" as the first type
    popularity = torch.from_numpy(artifact.item_popularity.astype(np.float32))
    miss = artifact.num_items
    ranks = np.full(len(users), miss, dtype=np.int64)
    for start in range(0, len(users), EVAL_BATCH):
        batch = users[start:start + EVAL_BATCH]
        known = [[(artifact.item_index_of[e.raw_item_id], behavior_of.get(e.behavior, NO_BEHAVIOR_INDEX))
                  for e in user.history if e.raw_item_id in artifact.item_index_of] for user in batch]
        scores = popularity.repeat(len(batch), 1)  # (B, I+1): the cold-start list where no history is known
        personal = [row for row, pairs in enumerate(known) if pairs]
        if personal:
            histories = [np.array([i for i, _ in known[row]]) for row in personal]
            behaviors = [np.array([b for _, b in known[row]]) for row in personal]
            user_vectors = torch.from_numpy(encode_histories(model, histories, behaviors))
            personal_scores = user_vectors @ item_vectors.T
            if artifact.transitions is not None and artifact.transitions.weight:
                newest = np.array([history[-1] for history in histories])
                personal_scores += torch.from_numpy(artifact.transitions.dense_rows(newest))
            scores[personal] = personal_scores
        for row, user in enumerate(batch):
            target = artifact.item_index_of.get(user.target)
            if target is None or target == PAD_INDEX:
                continue
            row_scores = scores[row].clone()
            row_scores[[i for i, _ in known[row]] + [PAD_INDEX]] = float("-inf")  # seen items and padding
            above = (row_scores > row_scores[target]).sum()
            ties = (row_scores[:target] == row_scores[target]).sum()  # ties broken by item index, as evaluation does
            ranks[start + row] = int(above + ties)
    return ranks


def service_ranks(client: RankingClient, users: list[HeldOutUser]) -> np.ndarray:
    """(U,) position of each target in the service's top K (diversity 0, seen items excluded); K = a miss."""
    ranks = np.full(len(users), K, dtype=np.int64)
    refused: set[str] = set()  # history items the service answered as unknown: dropped from every history
    pending = list(range(len(users)))
    while pending:
        retry = []
        for start in range(0, len(pending), RANK_BATCH):
            chunk = pending[start:start + RANK_BATCH]
            sent = [[e for e in users[u].history if e.raw_item_id not in refused] for u in chunk]
            requests = [rank_request(f"holdout-{users[u].user_id}", recent_events=events, k=K, diversity=0.0,
                                     exclude_seen=True) for u, events in zip(chunk, sent)]
            results = client.rank_batch(requests).results
            for u, events, result in zip(chunk, sent, results):
                if result.status_code == GRPC_OK:
                    listed = [item.item_id for item in result.response.items]
                    if users[u].target in listed:
                        ranks[u] = listed.index(users[u].target)
                    continue
                unknown = UNKNOWN_HISTORY_ITEM.search(result.status_message)
                if unknown is None:
                    raise PromotionError(f"the service answered status {result.status_code} for held-out user "
                                         f"{users[u].user_id!r}: {result.status_message}")
                refused.add(events[int(unknown.group(1))].raw_item_id)
                retry.append(u)
        pending = retry
    return ranks


# ------------------------------------------------------------------------------------------------ the rule


def decide(candidate: np.ndarray, against: np.ndarray, difference: Interval, *, margin: float = DEFAULT_MARGIN,
           min_users: int = DEFAULT_MIN_USERS) -> Decision:
    """The gate on per-user NDCG@10 (`difference`: the paired interval of candidate - against)."""
    users = len(candidate)
    if users < min_users:
        return Decision(False, f"refused: {users} held-out users, fewer than min_users={min_users}: not enough "
                               f"evidence either way")
    shown = (f"{GATE_METRIC} candidate {float(np.mean(candidate)):.4f} vs serving {float(np.mean(against)):.4f}, "
             f"paired difference {difference.mean:+.4f} (95% CI {difference.low:+.4f} to {difference.high:+.4f}) "
             f"over {users} users")
    if difference.high < -margin:
        return Decision(False, f"refused: candidate worse beyond the margin {margin:g}: {shown}")
    return Decision(True, f"promoted: not worse beyond the margin {margin:g}: {shown}")


def compare(candidate_ranks: np.ndarray, against_ranks: np.ndarray, *, margin: float = DEFAULT_MARGIN,
            min_users: int = DEFAULT_MIN_USERS, seed: int = 0) -> Comparison:
    """Intervals of both models and of their paired difference per metric, and the decision on NDCG@10."""
    candidate, against = per_user_metrics(candidate_ranks), per_user_metrics(against_ranks)
    if not len(candidate_ranks):
        return Comparison(0, {}, {}, {}, decide(np.zeros(0), np.zeros(0), Interval(0.0, 0.0, 0.0), margin=margin,
                                                min_users=min_users))
    options = {"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": seed}
    intervals = [{name: bootstrap_interval(values[name], **options) for name in METRICS}
                 for values in (candidate, against)]
    difference = {name: paired_difference(candidate[name], against[name], **options) for name in METRICS}
    decision = decide(candidate[GATE_METRIC], against[GATE_METRIC], difference[GATE_METRIC], margin=margin,
                      min_users=min_users)
    return Comparison(len(candidate_ranks), intervals[0], intervals[1], difference, decision)


def comparison_table(comparison: Comparison, candidate_name: str, against_name: str) -> str:
    """Plain-text table: each metric's mean and 95 % interval for both models and their paired difference."""
    def cell(interval: Interval, signed: bool = False) -> str:
        form = "+.4f" if signed else ".4f"
        return f"{interval.mean:{form}} [{interval.low:{form}}, {interval.high:{form}}]"

    header = ("metric", f"candidate {candidate_name}", f"serving {against_name}", "difference (paired)")
    rows = [(name, cell(comparison.candidate[name]), cell(comparison.against[name]),
             cell(comparison.difference[name], signed=True)) for name in comparison.candidate]
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(4)]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"{comparison.users} held-out users; 95 % percentile bootstrap over users ({RESAMPLES} resamples)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ deployment


def write_k8s_artifact(overlay: str | Path, artifact_ref: str) -> list[Path]:
    """Point a kustomization's Serve config (k8s/base or an overlay with a serve-overrides.yaml that
    serving/ops/k8s_render.py renders) at `artifact_ref`, the artifact's path inside the Ray pods, and re-render
    the serveConfigV2 patches. Edits the overrides file's text in place (comments kept): an existing
    `artifact_path:` value is replaced; otherwise a `user_config: {artifact_path: ...}` line is added under each
    model deployment listed. Returns the files written; nothing is written when the result would not render with
    the new path on every model deployment."""
    from seqrank.serving.ops.k8s_render import OVERRIDES_FILE, RENDER_TARGETS, render_patch, render_serve_config
    from seqrank.serving.ops.serve_config_check import application, is_model_deployment

    overlay = Path(overlay)
    target = next((t for t in RENDER_TARGETS if overlay.resolve().as_posix().endswith("/" + t.directory)), None)
    if target is None:
        raise PromotionError(f"--overlay: {overlay} is none of the kustomizations with a serveConfigV2 patch "
                             f"({', '.join(t.directory for t in RENDER_TARGETS)} under k8s/)")
    k8s_dir = overlay.resolve()
    for _ in Path(target.directory).parts:
        k8s_dir = k8s_dir.parent
    overrides_path = overlay / OVERRIDES_FILE
    original = overrides_path.read_text()
    updated = _set_artifact_path(original, artifact_ref)
    overrides_path.write_text(updated)
    try:
        written = []
        for each in RENDER_TARGETS:  # an edited base changes the overlays built on it
            if target.directory not in each.override_dirs:
                continue
            config = render_serve_config(each, k8s_dir=k8s_dir)
            paths = {d.get("user_config", {}).get("artifact_path") for d in application(config)["deployments"]
                     if is_model_deployment(d.get("name"))}
            if each == target and paths != {artifact_ref}:
                raise PromotionError(f"{overrides_path}: could not set artifact_path on every model deployment "
                                     f"(rendered {sorted(map(str, paths))})")
            written.append((k8s_dir / each.directory / "serve-config-v2.yaml", render_patch(config)))
    except BaseException:
        overrides_path.write_text(original)
        raise
    for path, text in written:
        path.write_text(text)
    return [overrides_path, *(path for path, _ in written)]


ARTIFACT_PATH_VALUE = re.compile(r"(?<![\w-])(artifact_path:\s*)([^\s,}#]+)")  # not canary_artifact_path
DEPLOYMENT_ENTRY = re.compile(r"^(\s*)- name: (\S+)\s*(#.*)?$")


def _set_artifact_path(text: str, artifact_ref: str) -> str:
    from seqrank.serving.ops.serve_config_check import is_model_deployment

    if ARTIFACT_PATH_VALUE.search(text):
        return ARTIFACT_PATH_VALUE.sub(lambda match: match.group(1) + artifact_ref, text)
    in_deployments, lines = False, []
    for line in text.splitlines(keepends=True):
        lines.append(line)
        if re.match(r"^\s*deployments:\s*(#.*)?$", line):
            in_deployments = True
        entry = DEPLOYMENT_ENTRY.match(line.rstrip("\n"))
        if in_deployments and entry and is_model_deployment(entry.group(2)):
            indent = entry.group(1) + "  "
            lines.append(f"{indent}user_config: {{artifact_path: {yaml.safe_dump(artifact_ref).splitlines()[0]}}}\n")
    return "".join(lines)


def discard(path: Path) -> None:
    """Remove an artifact this gate exported for a candidate it refused."""
    shutil.rmtree(path, ignore_errors=True)
