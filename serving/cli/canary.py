"""`seqrank canary`: serve a second model version to a share of the users, then promote or roll it back.

Each step reads the config the running service was last given (Serve's REST API), edits the canary fields of every
model deployment's user_config (serving/canary.py) and applies it as `seqrank deploy` does: a hot reload in place,
no request dropped. On Kubernetes edit `serveConfigV2` instead (docs/rollout.md).
"""

from __future__ import annotations

import logging


def add_canary_commands(sub) -> None:
    canary = sub.add_parser("canary", help="canary rollout: set PERCENT --artifact DIR | promote | rollback | status")
    canary.add_argument("--address", default=None,
                        help="Ray dashboard URL (default: the local cluster of `seqrank serve`)")
    steps = canary.add_subparsers(dest="step", required=True)
    set_step = steps.add_parser("set", help="serve the canary artifact to PERCENT of the users (0-100), chosen by "
                                            "a stable hash of the user id")
    set_step.add_argument("percent", type=float)
    set_step.add_argument("--artifact", default=None, help="canary artifact directory (default: the one set)")
    steps.add_parser("promote", help="make the canary the current version for everyone")
    steps.add_parser("rollback", help="drop the canary: everyone on the current version")
    steps.add_parser("status", help="print the current and canary artifacts and the share")
    canary.set_defaults(func=cmd_canary)


def edited_config(step: str, config: dict, percent: float | None = None, artifact: str | None = None) -> dict:
    from pathlib import Path

    from seqrank.serving.canary import promoted, rolled_back, with_canary
    from seqrank.serving.ops.serve_config_check import is_model_deployment

    if step == "set":
        path = str(Path(artifact).resolve()) if artifact is not None else None  # replicas do not share the cwd
        return with_canary(config, is_model_deployment, percent, path)
    if step == "promote":
        return promoted(config, is_model_deployment)
    return rolled_back(config, is_model_deployment)


def cmd_canary(args) -> int:
    from seqrank.serving.canary import canary_state
    from seqrank.serving.ops.deploy import apply, deployed_config
    from seqrank.serving.ops.serve_config_check import is_model_deployment

    address, attached = args.address, False
    if address is None:
        import ray

        # Attaching to the local cluster (`seqrank serve`) finds its dashboard and loads its auth token.
        address, attached = "http://" + ray.init(address="auto", logging_level=logging.WARNING).dashboard_url, True
    try:
        config = deployed_config(address)
        if args.step != "status":
            config = edited_config(args.step, config, getattr(args, "percent", None), getattr(args, "artifact", None))
            apply(config, address)
        state = canary_state(config, is_model_deployment)
    finally:
        if attached:
            import ray

            ray.shutdown()  # detaches; the cluster keeps running
    print(f"current artifact  {state.artifact_path}")
    print(f"canary artifact   {state.canary_artifact_path or '-'}")
    print(f"canary share      {state.canary_percent:g} % of users")
    return 0
