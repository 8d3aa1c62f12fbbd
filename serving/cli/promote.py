"""`seqrank promote`: the gate between a retrained model and the service (serving/ops/promote.py, docs/retraining.md).

Exit status 0: promoted (and deployed when asked); 1: refused, with the reason as one line on stderr; 2: the gate
could not run (bad arguments, unreadable files).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from seqrank.serving.config import SERVE_CONFIG_PATH

REFUSED = 1


def add_promote_commands(sub) -> None:
    promote = sub.add_parser("promote", help="compare a candidate with the serving model on held-out events; "
                                             "export and deploy it unless it is worse beyond a margin")
    promote.add_argument("--candidate", required=True, help="run directory (exported to --out) or artifact")
    promote.add_argument("--against", required=True, metavar="ARTIFACT|HOST:PORT",
                         help="the serving model: its artifact, or the service itself over gRPC")
    promote.add_argument("--holdout", required=True, metavar="EVENTS_CSV",
                         help="events neither model trained on, with the history before them (seqrank events export)")
    promote.add_argument("--since", type=int, default=None, metavar="UNIX_SECONDS",
                         help="held-out targets: each user's first new item at or after this time, history before "
                              "it (default: each user's last event)")
    promote.add_argument("--margin", type=float, default=None,
                         help="refuse when the candidate's NDCG@10 is worse by more than this at 95%% confidence "
                              "(default: 0.0)")
    promote.add_argument("--min-users", type=int, default=None, help="fewer held-out users: refuse (default: 100)")
    promote.add_argument("--out", default=None, help="where a run candidate's artifact is exported (must not exist)")
    promote.add_argument("--deploy", default="none", choices=["none", "local", "k8s"],
                         help="local: reconfigure the running Serve app (as seqrank deploy); k8s: write the "
                              "artifact path into --overlay and re-render its serveConfigV2")
    promote.add_argument("--serve-config", default=str(SERVE_CONFIG_PATH),
                         help="--deploy local: the Serve config the service runs (default: %(default)s)")
    promote.add_argument("--address", default=None,
                         help="--deploy local: Ray dashboard URL (default: the local cluster of `seqrank serve`)")
    promote.add_argument("--overlay", default=None, help="--deploy k8s: e.g. k8s/overlays/prod-gpu")
    promote.add_argument("--artifact-ref", default=None,
                         help="--deploy k8s: the artifact's path in the Ray pods (default: /artifacts/<--out name>)")
    promote.add_argument("--token", default=None, help="bearer token for HOST:PORT (default: $SEQRANK_TOKEN)")
    promote.add_argument("--json", default=None, metavar="OUT", help="also write the comparison as JSON")
    promote.set_defaults(func=cmd_promote)


def is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def candidate_artifact(args) -> tuple[Path, bool]:
    """(artifact directory, whether this command exported it)."""
    if is_artifact(args.candidate):
        return Path(args.candidate), False
    if args.out is None:
        raise ValueError("--out: required when --candidate is a run directory (its artifact is exported there)")
    if Path(args.out).exists():
        raise ValueError(f"--out: {args.out} exists; give a new directory (an artifact in use must never be "
                         "overwritten)")
    from seqrank.training.export import export_run

    return export_run(args.candidate, args.out), True


def against_ranks(args, users):
    """(ranks of the held-out targets by the serving model, its name): an artifact ranked here, or HOST:PORT."""
    import os

    from seqrank.serving.ops.promote import artifact_ranks, service_ranks
    from seqrank.training.artifact import load_artifact

    if is_artifact(args.against):
        artifact = load_artifact(args.against)
        return artifact_ranks(artifact, users), artifact.model_version
    if Path(args.against).exists() or ":" not in args.against:
        raise ValueError(f"--against: {args.against} is neither an artifact directory (manifest.json) nor HOST:PORT")
    from seqrank.serving.client.ranking_client import RankingClient

    with RankingClient(args.against, timeout_s=60.0, token=args.token or os.environ.get("SEQRANK_TOKEN")) as client:
        version = client.model_info().model_version
        return service_ranks(client, users), f"{version} at {args.against}"


def deploy(args, artifact: Path, version: str) -> str:
    """Applies the promoted artifact as --deploy asks; returns what was done."""
    if args.deploy == "local":
        from seqrank.serving.ops.deploy import apply_here_or_at, localize, read_serve_config

        apply_here_or_at(localize(read_serve_config(args.serve_config), artifact_path=artifact), args.address)
        return f"deployed {version} to the running service (reloaded in place)"
    if args.deploy == "k8s":
        from seqrank.serving.ops.promote import write_k8s_artifact

        if args.overlay is None:
            raise ValueError("--overlay: required with --deploy k8s (e.g. k8s/overlays/prod-gpu)")
        reference = args.artifact_ref or f"/artifacts/{artifact.name}"
        written = write_k8s_artifact(args.overlay, reference)
        return (f"wrote artifact_path {reference} into {', '.join(map(str, written))}; copy {artifact} there and "
                f"apply: kubectl apply -k {args.overlay}")
    return f"artifact {artifact} ready (no --deploy)"


def cmd_promote(args) -> int:
    from seqrank.serving.ops.promote import (
        DEFAULT_MARGIN,
        DEFAULT_MIN_USERS,
        artifact_ranks,
        compare,
        comparison_table,
        discard,
        read_holdout,
    )
    from seqrank.training.artifact import load_artifact

    if args.deploy == "k8s" and args.overlay is None:
        raise ValueError("--overlay: required with --deploy k8s (e.g. k8s/overlays/prod-gpu)")
    users = read_holdout(args.holdout, args.since)
    path, exported = candidate_artifact(args)
    try:
        candidate = load_artifact(path)
        candidate_ranks = artifact_ranks(candidate, users)
        ranks, against_name = against_ranks(args, users)
        comparison = compare(candidate_ranks, ranks,
                             margin=DEFAULT_MARGIN if args.margin is None else args.margin,
                             min_users=DEFAULT_MIN_USERS if args.min_users is None else args.min_users)
    except BaseException:
        if exported:
            discard(path)
        raise
    if comparison.users:
        print(comparison_table(comparison, candidate.model_version, against_name))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "candidate_version": candidate.model_version, "against_name": against_name, "users": comparison.users,
            "promote": comparison.decision.promote, "reason": comparison.decision.reason,
            **{part: {name: asdict(interval) for name, interval in getattr(comparison, part).items()}
               for part in ("candidate", "against", "difference")}}, indent=2))
    if not comparison.decision.promote:
        if exported:
            discard(path)
        print(comparison.decision.reason, file=sys.stderr)
        return REFUSED
    print(comparison.decision.reason)
    print(deploy(args, path, candidate.model_version))
    return 0
