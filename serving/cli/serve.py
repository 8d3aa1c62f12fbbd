"""`seqrank serve`, `seqrank quickstart` and `seqrank deploy`: run the service on this machine or apply a config."""

from __future__ import annotations

from pathlib import Path

from seqrank.serving.cli.render import format_response
from seqrank.serving.client.ranking_client import DEFAULT_GRPC_PORT
from seqrank.serving.config import SERVE_CONFIG_PATH


def add_serve_commands(sub) -> None:
    serve = sub.add_parser("serve", help="run the ranking service locally (Ray + Serve, gRPC) until interrupted")
    serve.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML (default: %(default)s)")
    serve.add_argument("--artifact", default=None, help="artifact directory; overrides the config's artifact_path")
    serve.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may schedule (default: all)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve without ingress.auth.tokens although Ray Serve's gRPC proxy listens on every "
                            "interface (a machine no one else can reach)")
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="apply a (changed) Serve config to a running service; a new artifact "
                                           "reloads in place")
    deploy.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML (default: %(default)s)")
    deploy.add_argument("--artifact", default=None, help="artifact directory; overrides the config's artifact_path")
    deploy.add_argument("--address", default=None,
                        help="Ray dashboard URL of a remote cluster (default: the local cluster of `seqrank serve`)")
    deploy.set_defaults(func=cmd_deploy)

    quickstart = sub.add_parser("quickstart", help="synthetic log → train → export → serve, then print ranked "
                                                   "lists fetched over gRPC; stays up until Ctrl-C")
    quickstart.add_argument("--out", default="runs/quickstart", help="working directory (default: %(default)s)")
    quickstart.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML")
    quickstart.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may schedule (default: all)")
    quickstart.add_argument("--exit", action="store_true", help="stop after printing the lists")
    quickstart.set_defaults(func=cmd_quickstart)


def load_serve_config(args):
    from seqrank.serving.ops.deploy import localize, read_serve_config

    return localize(read_serve_config(args.config), artifact_path=args.artifact)


def cmd_serve(args) -> int:
    config = load_serve_config(args)
    require_auth_on_every_interface(config, args.allow_unauthenticated)
    return serve_until_interrupted(config, args.config, args.num_cpus)


def require_auth_on_every_interface(config: dict, allow_unauthenticated: bool) -> None:
    """Ray Serve 2.60 binds its gRPC proxy to [::] (every interface; no setting changes it), so a local service
    is reachable from the network: without tokens anyone there could rank and write events. Refuse unless the
    caller says the machine is private."""
    from seqrank.serving.ops.serve_config_check import ConfigError, application

    tokens = (application(config).get("args") or {}).get("ingress", {}).get("auth", {}).get("tokens", "")
    if tokens:
        return
    if not allow_unauthenticated:
        raise ConfigError("applications[0].args.ingress.auth.tokens: empty, but the gRPC proxy listens on every "
                          "interface; set tokens (env:NAME or file:/path, see docs/api.md) or pass "
                          "--allow-unauthenticated on a machine no one else can reach")
    print("warning: serving WITHOUT authentication on every interface (--allow-unauthenticated)", flush=True)


def serve_until_interrupted(config: dict, config_path: str, num_cpus: float | None = None, on_ready=None,
                            stay_up: bool = True) -> int:
    """Start local Ray + Serve, apply the config, call `on_ready(grpc_target)`, then wait for Ctrl-C."""
    import signal
    import time

    import ray
    from ray import serve

    from seqrank.serving.ops.deploy import apply, preflight, start_local
    from seqrank.serving.ops.serve_config_check import application

    app_args = preflight(config)  # before starting anything
    dashboard_url = start_local(config, app_args, num_cpus=num_cpus)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM too
    try:
        print(f"deploying {application(config)['name']} (dashboard {dashboard_url}) ...", flush=True)
        apply(config, dashboard_url)
        grpc_port = config.get("grpc_options", {}).get("port", DEFAULT_GRPC_PORT)
        auth = "bearer token required" if app_args.ingress.auth.enabled else "NO authentication"
        print(f"serving gRPC on 127.0.0.1:{grpc_port} (every interface, {auth}), Prometheus metrics on "
              f"http://127.0.0.1:{app_args.local.metrics_export_port}/metrics", flush=True)
        if on_ready is not None:
            on_ready(f"127.0.0.1:{grpc_port}")
        print(f"hot reload: seqrank deploy --config {config_path} --artifact NEW_ARTIFACT; Ctrl-C stops", flush=True)
        while stay_up:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def cmd_quickstart(args) -> int:
    from seqrank.serving.ops.deploy import localize, read_serve_config
    from seqrank.serving.ops.quickstart import prepare_artifact, write_token

    out = Path(args.out)
    artifact, sample_histories = prepare_artifact(out, say=print)
    config = localize(read_serve_config(args.config), artifact_path=artifact)
    config["applications"][0]["logging_config"] = {"enable_access_log": False}  # keep the printed lists readable
    ingress = config["applications"][0]["args"]["ingress"]
    ingress["history"]["url"] = f"sqlite:///{(out / 'history.db').resolve()}"
    # The proxy listens on every interface, so even the demo requires a token: a fresh one, readable only by you.
    token_file, token = write_token(out)
    ingress["auth"] = {"tokens": f"file:{token_file}"}
    print(f"bearer token in {token_file}; from another shell: SEQRANK_TOKEN=$(cat {token_file}) seqrank rank "
          f"{next(iter(sample_histories))}")
    return serve_until_interrupted(config, args.config, args.num_cpus,
                                   on_ready=lambda target: show_ranked_lists(target, sample_histories, token),
                                   stay_up=not args.exit)


def cmd_deploy(args) -> int:
    from seqrank.serving.ops.deploy import apply_here_or_at
    from seqrank.serving.ops.serve_config_check import application

    config = load_serve_config(args)
    address = apply_here_or_at(config, args.address)
    print(f"applied {args.config} to {address}: {application(config)['name']} is RUNNING")
    return 0


def show_ranked_lists(target: str, samples: dict, token: str | None = None) -> None:
    """RecordEvents then Rank for each sample user, over real gRPC, printed as tables."""
    from seqrank.serving.client.ranking_client import RankingClient

    with RankingClient(target, token=token) as client:
        for user_id, events in samples.items():
            client.record({user_id: events}, idempotency_key=f"quickstart-{user_id}")
            recent = ", ".join(f"{e.raw_item_id}:{e.behavior}" for e in events[-4:])
            print(f"\nuser {user_id} (recent: … {recent})")
            print(format_response(client.rank(user_id, k=10)))
