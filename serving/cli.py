"""The `seqrank` command: thin subcommands over training and serving; settings are parsed here and passed on."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


TOKEN_ENV = "SEQRANK_TOKEN"  # the client commands' bearer token when --token is not given


def add_train_commands(sub) -> None:
    train = sub.add_parser("train", help="train an encoder on a log; writes a run directory")
    train.add_argument("--data", default="", help="log file; omit to train on the built-in synthetic log")
    train.add_argument("--format", default=None, choices=["auto", "events", "s3rec", "sasrec"])
    train.add_argument("--attributes", default=None, help="item side information (JSON {item: [attributes]})")
    train.add_argument("--config", default=None, help="YAML config layered over training/configs/default.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--out", required=True, help="run directory to create")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="full-ranking evaluation of a run's best checkpoint")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--split", default="test", choices=["test", "valid"])
    evaluate.add_argument("--baseline", default="model", choices=["model", "popular"])
    evaluate.add_argument("--with", dest="with_runs", nargs="+", default=[], metavar="RUN",
                          help="more runs on the same data: their scores are added (what model.towers trains in one run)")
    evaluate.add_argument("--no-transitions", action="store_true",
                          help="leave out the item-to-item prior the run chose (the encoder alone)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_evaluate)

    prior = sub.add_parser("prior", help="fit a run's item-to-item transition prior afterwards (weight chosen on "
                                         "validation), as transitions.weights does inside training")
    prior.add_argument("--run", required=True)
    prior.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                       help="weights to try (default: %(default)s)")
    prior.set_defaults(func=cmd_prior)

    export = sub.add_parser("export", help="write the versioned serving artifact of a run")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--hnsw-m", type=int, default=32)
    export.add_argument("--ef-construction", type=int, default=200)
    export.add_argument("--ef-search", type=int, default=200)
    export.add_argument("--norm-augment", action="store_true",
                        help="index norm-augmented vectors: same inner products, higher recall@100 at wide beams "
                             "(raise --ef-search with it; BENCHMARKS.md, Scale out)")
    export.set_defaults(func=cmd_export)

    synth = sub.add_parser("synth", help="write a synthetic event log (CSV) and item attributes (JSON)")
    synth.add_argument("--out", required=True, help="directory")
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--zipf", type=float, default=None,
                       help="item popularity exponent (default 1.0; 0.5 lets a big catalogue appear in a modest log)")
    synth.set_defaults(func=cmd_synth)


def training_overrides(args) -> list[str]:
    overrides = []
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.attributes:
        overrides.append(f"data.attributes={json.dumps(args.attributes)}")
    return overrides + args.overrides


def cmd_train(args) -> int:
    from training.config import load_config
    from training.train import fit

    config = load_config(args.config, training_overrides(args))
    result = fit(config, args.out, progress=not args.quiet)
    print_metrics(result, f"test metrics of the best checkpoint (epoch {result['best_epoch']}), run {args.out}")
    return 0


def load_run_data(run_dir: Path, data=None):
    """A run's config and its data, checked against the fingerprint it was trained on (`data`: already loaded)."""
    from training.config import config_from_dict
    from training.data import load_sequences
    import yaml

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = data if data is not None else load_sequences(config.data)
    recorded = json.loads((run_dir / "data.json").read_text())["fingerprint"]
    if data.fingerprint != recorded:
        raise SystemExit(f"error: {config.data.path or 'synthetic data'} changed since run {run_dir} was trained "
                         f"(fingerprint {data.fingerprint[:12]} != {recorded[:12]})")
    return config, data


def cmd_evaluate(args) -> int:
    from training.evaluate import evaluate_model, evaluate_popularity
    from training.model import EncoderEnsemble, load_encoder_dir
    from training.train import final_evaluation_users, load_run_transitions

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    users = final_evaluation_users(data, config)  # eval.test_users: the subset the run's own test metrics used
    if args.baseline == "popular":
        report = evaluate_popularity(data, args.split, config.eval.ks, config.eval.batch_size, users)
    else:
        model = load_encoder_dir(run_dir)
        if args.with_runs:
            for other in args.with_runs:
                load_run_data(Path(other), data)
            model = EncoderEnsemble.of([model] + [load_encoder_dir(other) for other in args.with_runs])
        prior = None if args.no_transitions else load_run_transitions(run_dir)
        report = evaluate_model(model, data, args.split, config.eval.ks, config.eval.batch_size, users=users,
                                prior=prior)
    if args.json:
        print(json.dumps(report))
    else:
        print_metrics(report, f"{args.baseline} on {args.split} ({int(report['users'])} users, full ranking, seen items masked)")
    return 0


def cmd_prior(args) -> int:
    from training.model import load_encoder_dir
    from training.train import TRANSITIONS_RUN_FILE, fit_transition_prior

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    prior, _ = fit_transition_prior(load_encoder_dir(run_dir), data, config, args.weights, run_dir)
    scores = json.loads((run_dir / TRANSITIONS_RUN_FILE).read_text())
    print(json.dumps(scores))
    print(f"weight {prior.weight} kept in {run_dir}: `seqrank evaluate` and `seqrank export` use it")
    return 0


def cmd_export(args) -> int:
    from training.artifact import IndexParams
    from training.export import export_run

    params = IndexParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search,
                         norm_augmented=args.norm_augment)
    path = export_run(args.run, args.out, params)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"artifact {manifest['model_version']} written to {path} ({manifest['num_items']} items, dim {manifest['dim']})")
    return 0


def cmd_synth(args) -> int:
    from training.synthetic import write_synthetic_dataset

    from training.synthetic import ZIPF_EXPONENT

    paths = write_synthetic_dataset(args.out, num_users=args.users, num_items=args.items, seed=args.seed,
                                    zipf_exponent=ZIPF_EXPONENT if args.zipf is None else args.zipf)
    for path in paths:
        print(path)
    return 0


def print_metrics(report: dict, title: str) -> None:
    print(title)
    ks = sorted({int(key.split("@")[1]) for key in report if key.startswith("NDCG@")})
    names = [n for n in ("HR", "NDCG", "coverage", "ILD") if f"{n}@{ks[0]}" in report] if ks else []
    print("  K    " + "  ".join(f"{n:>9}" for n in names))
    for k in ks:
        print(f"  {k:<4} " + "  ".join(f"{report[f'{n}@{k}']:9.4f}" for n in names))
    if "MRR" in report:
        print(f"  MRR  {report['MRR']:.4f}")


def add_serving_commands(sub) -> None:
    from serving.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
    from serving.config import SERVE_CONFIG_PATH
    from serving.retry import RetryPolicy

    serve = sub.add_parser("serve", help="run the ranking service locally (Ray + Serve, gRPC) until interrupted")
    serve.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML (default: %(default)s)")
    serve.add_argument("--artifact", default=None, help="artifact directory; overrides the config's artifact_path")
    serve.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may schedule (default: all)")
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="apply a (changed) Serve config to a running service; a new artifact "
                                           "reloads in place")
    deploy.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML (default: %(default)s)")
    deploy.add_argument("--artifact", default=None, help="artifact directory; overrides the config's artifact_path")
    deploy.add_argument("--address", default=None,
                        help="Ray dashboard URL of a remote cluster (default: the local cluster of `seqrank serve`)")
    deploy.set_defaults(func=cmd_deploy)

    def client_arguments(parser) -> None:
        parser.add_argument("--target", default=DEFAULT_TARGET, help="gRPC host:port (default: %(default)s)")
        parser.add_argument("--json", action="store_true", help="print the response as JSON")
        parser.add_argument("--token", default=None,
                            help=f"bearer token (default: ${TOKEN_ENV}); sent as 'authorization: Bearer <token>'")
        parser.add_argument("--tls", action="store_true", help="TLS to a gateway or mesh in front of the service")
        parser.add_argument("--ca-cert", default=None, help="PEM roots for --tls (default: the system's)")
        parser.add_argument("--client-cert", default=None, help="PEM client certificate for mTLS (with --client-key)")
        parser.add_argument("--client-key", default=None, help="PEM private key of --client-cert")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                            help="deadline of each attempt in seconds (default: %(default)s)")
        parser.add_argument("--retries", type=int, default=RetryPolicy().max_attempts - 1,
                            help="retries on UNAVAILABLE/RESOURCE_EXHAUSTED, with backoff (default: %(default)s)")

    rank = sub.add_parser("rank", help="top-k items for a user")
    rank.add_argument("user_id")
    rank.add_argument("-k", type=int, default=None, help="items to return (default: the server's)")
    rank.add_argument("--diversity", type=float, default=None, help="MMR lambda in [0, 1] (default: the server's)")
    rank.add_argument("--exclude", nargs="*", default=[], metavar="ITEM", help="item ids never to return")
    rank.add_argument("--events", nargs="*", default=[], metavar="ITEM[:BEHAVIOR]",
                      help="recent events, oldest first, used instead of the stored history (not stored)")
    rank.add_argument("--include-seen", action="store_true", help="allow items from the history")
    client_arguments(rank)
    rank.set_defaults(func=cmd_rank)

    record = sub.add_parser("record", help="append events to a user's stored history")
    record.add_argument("user_id")
    record.add_argument("events", nargs="+", metavar="ITEM[:BEHAVIOR[:UNIX_SECONDS]]", help="oldest first")
    record.add_argument("--idempotency-key", default=None,
                        help="default: a generated key, the same on every retry ('' = none, then never retried)")
    client_arguments(record)
    record.set_defaults(func=cmd_record)

    quickstart = sub.add_parser("quickstart", help="synthetic log → train → export → serve, then print ranked "
                                                   "lists fetched over gRPC; stays up until Ctrl-C")
    quickstart.add_argument("--out", default="runs/quickstart", help="working directory (default: %(default)s)")
    quickstart.add_argument("--config", default=str(SERVE_CONFIG_PATH), help="Serve config YAML")
    quickstart.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may schedule (default: all)")
    quickstart.add_argument("--exit", action="store_true", help="stop after printing the lists")
    quickstart.set_defaults(func=cmd_quickstart)

    info = sub.add_parser("info", help="the serving model: version, sizes, index, offline metrics")
    client_arguments(info)
    info.set_defaults(func=cmd_info)


def load_serve_config(args):
    from serving.deploy import localize, read_serve_config

    return localize(read_serve_config(args.config), artifact_path=args.artifact)


def cmd_serve(args) -> int:
    return serve_until_interrupted(load_serve_config(args), args.config, args.num_cpus)


def serve_until_interrupted(config: dict, config_path: str, num_cpus: float | None = None, on_ready=None,
                            stay_up: bool = True) -> int:
    """Start local Ray + Serve, apply the config, call `on_ready(grpc_target)`, then wait for Ctrl-C."""
    import signal
    import time

    import ray
    from ray import serve

    from serving.deploy import application, apply, preflight, start_local

    app_args = preflight(config)  # before starting anything
    dashboard_url = start_local(config, app_args, num_cpus=num_cpus)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM too
    try:
        print(f"deploying {application(config)['name']} (dashboard {dashboard_url}) ...", flush=True)
        apply(config, dashboard_url)
        grpc_port = config.get("grpc_options", {}).get("port", 9000)
        print(f"serving gRPC on 127.0.0.1:{grpc_port}, Prometheus metrics on "
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
    from serving.quickstart import prepare_artifact, show_ranked_lists
    from serving.deploy import localize, read_serve_config

    artifact, sample_histories = prepare_artifact(Path(args.out))
    config = localize(read_serve_config(args.config), artifact_path=artifact)
    config["applications"][0]["logging_config"] = {"enable_access_log": False}  # keep the printed lists readable
    history = config["applications"][0]["args"]["ingress"]["history"]
    history["url"] = f"sqlite:///{(Path(args.out) / 'history.db').resolve()}"
    return serve_until_interrupted(config, args.config, args.num_cpus,
                                   on_ready=lambda target: show_ranked_lists(target, sample_histories),
                                   stay_up=not args.exit)


def cmd_deploy(args) -> int:
    from serving.deploy import application, apply

    config = load_serve_config(args)
    if args.address:
        apply(config, args.address)  # a remote cluster: Ray's RAY_AUTH_MODE / RAY_AUTH_TOKEN settings apply
        address = args.address
    else:
        import ray

        # Attaching to the local cluster (`seqrank serve`) finds its dashboard and loads its auth token.
        address = "http://" + ray.init(address="auto", logging_level=logging.WARNING).dashboard_url
        try:
            apply(config, address)
        finally:
            ray.shutdown()  # detaches; the cluster keeps running
    print(f"applied {args.config} to {address}: {application(config)['name']} is RUNNING")
    return 0


def parse_event(text: str):
    from serving.history import Event

    item_id, behavior, timestamp = (text.split(":") + ["", ""])[:3]
    try:
        return Event(raw_item_id=item_id, behavior=behavior, timestamp_s=int(timestamp) if timestamp else None)
    except ValueError:
        raise ValueError(f"event {text!r}: the timestamp must be integer Unix seconds") from None


def client_of(args, environ=None):
    """The RankingClient the client flags describe; the token falls back to $SEQRANK_TOKEN (read here, the edge)."""
    import os

    from serving.client import RankingClient, TlsConfig
    from serving.retry import RetryPolicy

    if args.retries < 0:
        raise ValueError(f"--retries: must be >= 0, got {args.retries}")
    if not args.tls and (args.ca_cert or args.client_cert or args.client_key):
        raise ValueError("--ca-cert, --client-cert and --client-key need --tls")
    token = args.token if args.token is not None else (os.environ if environ is None else environ).get(TOKEN_ENV)
    tls = TlsConfig(args.ca_cert, args.client_cert, args.client_key) if args.tls else None
    return RankingClient(args.target, timeout_s=args.timeout, token=token or None, tls=tls,
                         retry=RetryPolicy(max_attempts=args.retries + 1))


def call_service(args, call) -> int:
    """Runs `call(client)` and prints its response (table or JSON); gRPC errors print code and details."""
    import grpc

    from serving.client import as_dict

    with client_of(args) as client:
        try:
            response = call(client)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(as_dict(response), indent=2) if args.json else format_response(response))
    return 0


def cmd_rank(args) -> int:
    events = [parse_event(text) for text in args.events]
    return call_service(args, lambda client: client.rank(
        args.user_id, k=args.k, diversity=args.diversity, exclude_item_ids=args.exclude, recent_events=events,
        exclude_seen=False if args.include_seen else None,
    ))


def cmd_record(args) -> int:
    events = [parse_event(text) for text in args.events]
    return call_service(args, lambda client: client.record({args.user_id: events}, args.idempotency_key))


def cmd_info(args) -> int:
    return call_service(args, lambda client: client.model_info())


def format_response(response) -> str:
    from serving.generated.seqrank.v1 import ranking_pb2

    if isinstance(response, ranking_pb2.RankResponse):
        source = ranking_pb2.HistorySource.Name(response.history_source).removeprefix("HISTORY_SOURCE_").lower()
        timings = ", ".join(f"{t.stage} {t.ms:.1f}" for t in response.timings)
        lines = [f"model {response.model_version}, history {source}, request {response.request_id}",
                 f"ms: {timings}", f"{'#':>3}  {'item':<20} {'score':>8} {'relevance':>10}  explanation"]
        lines += [f"{rank:>3}  {item.item_id:<20} {item.score:8.4f} {item.relevance:10.4f}  {item.explanation}"
                  for rank, item in enumerate(response.items, start=1)]
        return "\n".join(lines)
    if isinstance(response, ranking_pb2.RecordEventsResponse):
        replay = " (idempotent replay: nothing written)" if response.idempotent_replay else ""
        return (f"accepted {response.accepted}, stored {response.stored}, "
                f"duplicates ignored {response.duplicates_ignored}{replay}")
    rows = [("model_version", response.model_version), ("created_at", response.created_at),
            ("items", response.num_items), ("dim", response.dim),
            ("index", f"{response.index.space} M={response.index.m} ef_construction={response.index.ef_construction} "
                      f"ef_search={response.index.ef_search}"),
            ("behaviours", ", ".join(response.behavior_names) or "-"),
            ("max_history_length", response.max_history_length),
            ("data_fingerprint", response.data_fingerprint)]
    rows += [(f"metric {name}", f"{value:.4f}") for name, value in sorted(response.metrics.items())]
    return "\n".join(f"{name:<20} {value}" for name, value in rows)


def add_bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    serve = bench.add_parser("serve", help="closed-loop gRPC load on a local Ray + Serve: Rank against an echo "
                                           "app behind the same proxy (the floor)")
    serve.add_argument("--artifact", default=None, help="artifact directory (default: train a tiny model)")
    serve.add_argument("--config", default=None, help="Serve config YAML (default: serving/serve_config.yaml)")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="default: %(default)s")
    serve.add_argument("--seconds", type=float, default=10.0, help="per target and concurrency")
    serve.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    serve.set_defaults(func=cmd_bench_serve)

    ann = bench.add_parser("ann", help="HNSW (hnswlib, Faiss) against exact inner-product search: recall@10/100, "
                                       "queries/s on one thread, build time, index memory; table, JSON and PNG")
    ann.add_argument("--artifact", default=None, help="use the artifact's trained item vectors (queries: its "
                                                      "encoder's user vectors) instead of a generated catalogue")
    ann.add_argument("--num-items", type=int, default=1_000_000, help="generated catalogue size (default: %(default)s)")
    ann.add_argument("--dim", type=int, default=64, help="generated vector dimension (default: %(default)s)")
    ann.add_argument("--queries", type=int, default=1000, help="held-out queries (default: %(default)s)")
    ann.add_argument("--methods", nargs="+", default=["hnswlib", "hnswlib-aug", "faiss", "faiss-aug"],
                     help="hnswlib, faiss; -aug: on norm-augmented vectors (default: %(default)s)")
    ann.add_argument("--m", type=int, nargs="+", default=[16, 32, 48], help="HNSW M values (default: %(default)s)")
    ann.add_argument("--ef-construction", type=int, default=200, help="(default: %(default)s)")
    ann.add_argument("--ef", type=int, nargs="+", default=[100, 200, 400, 800, 1600],
                     help="query beams; values below k are raised to k (default: %(default)s)")
    ann.add_argument("-k", type=int, default=100, help="neighbours per query (default: %(default)s)")
    ann.add_argument("--build-threads", type=int, default=1, help="threads for index builds (default: %(default)s);"
                                                                  " searches always use one")
    ann.add_argument("--repeats", type=int, default=3, help="timed passes, best kept (default: %(default)s)")
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--out", default="runs/bench-ann", help="directory for ann.json and ann.png (default: %(default)s)")
    ann.set_defaults(func=cmd_bench_ann)

    mmr = bench.add_parser("mmr", help="MMR re-ranking time on one thread: C candidates down to k")
    mmr.add_argument("--candidates", type=int, default=1000, help="(default: %(default)s)")
    mmr.add_argument("-k", type=int, default=50, help="(default: %(default)s)")
    mmr.add_argument("--dim", type=int, default=64, help="(default: %(default)s)")
    mmr.add_argument("--diversity", type=float, nargs="+", default=[0.0, 0.3, 1.0], help="(default: %(default)s)")
    mmr.add_argument("--repeats", type=int, default=2000, help="timed calls per diversity (default: %(default)s)")
    mmr.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    mmr.set_defaults(func=cmd_bench_mmr)

    train = bench.add_parser("train", help="training speed: seconds per epoch and sequences/s of `fit` on the "
                                           "synthetic log and, with --data, on a real file")
    train.add_argument("--data", default="", help="also measure on this log file")
    train.add_argument("--format", default=None, choices=["auto", "events", "s3rec", "sasrec"])
    train.add_argument("--attributes", default=None, help="item side information for --data")
    train.add_argument("--config", default=None, help="YAML config layered over training/configs/default.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--epochs", type=int, default=3, help="epochs per data set; the first is warm-up")
    train.add_argument("--no-synthetic", action="store_true", help="measure --data only")
    train.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    train.set_defaults(func=cmd_bench_train)

    encoder = bench.add_parser("encoder", help="encode_histories latency and sequences/s per batch size, model, "
                                               "device and dtype, with FLOPs per sequence")
    encoder.add_argument("--models", nargs="+", default=["default", "large"], choices=["default", "large"])
    encoder.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                         help="default: cpu, and cuda when torch sees a GPU")
    encoder.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "bf16w"],
                         help="fp32; bf16 autocast over fp32 weights; bf16w: weights cast to bf16, no autocast")
    encoder.add_argument("--compile", default="", choices=["", "default", "reduce-overhead",
                                                           "max-autotune-no-cudagraphs"],
                         help="torch.compile mode for the encoder's forward (default: eager)")
    encoder.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    encoder.add_argument("--seconds", type=float, default=2.0, help="timed seconds per cell (at least 3 calls)")
    encoder.add_argument("--max-call-seconds", type=float, default=5.0,
                         help="skip a cell whose estimated single call takes longer (default: %(default)s)")
    encoder.add_argument("--matmul-peak", action="store_true",
                         help="also time a large square matmul per device and dtype: the achieved peak rate")
    encoder.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    encoder.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    encoder.set_defaults(func=cmd_bench_encoder)


def write_json_report(path: str | None, payload) -> None:
    """The bench commands' --json FILE: the printed table's numbers, machine-readable."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def cmd_bench_serve(args) -> int:
    from serving.config import SERVE_CONFIG_PATH
    from serving.deploy import read_serve_config
    from serving.loadgen import bench_serve, format_report

    config = read_serve_config(args.config or SERVE_CONFIG_PATH)
    report = bench_serve(config, args.artifact, args.concurrency, args.seconds)
    print(format_report(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_train(args) -> int:
    from training.bench import bench_train, format_train_table
    from training.config import load_config

    runs = [] if args.no_synthetic else [("synthetic", load_config(args.config, args.overrides))]
    if args.data:
        runs.append((Path(args.data).name, load_config(args.config, training_overrides(args))))
    if not runs:
        raise ValueError("--no-synthetic needs --data")
    rows = [bench_train(config, args.epochs, label) for label, config in runs]
    print(format_train_table(rows))
    write_json_report(args.json, rows)
    return 0


def cmd_bench_encoder(args) -> int:
    from dataclasses import asdict

    import torch

    from training.bench import DTYPES, bench_encoder, format_encoder_table, matmul_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise ValueError("--devices cuda: torch.cuda.is_available() is False")
    matmul_dtypes = {DTYPES[t]: t for t in reversed(args.dtypes)}.values()  # bf16w's matmuls are bf16's (first name kept)
    peaks = {(d, t): matmul_peak(d, t) for d in devices for t in matmul_dtypes} if args.matmul_peak else {}
    rows = bench_encoder(args.models, devices, args.dtypes, args.batch_sizes, args.seconds, args.max_call_seconds,
                         peaks, compile_mode=args.compile)
    print(format_encoder_table(rows, peaks))
    if args.json:
        report = {"rows": [asdict(r) for r in rows],
                  "matmul_peak_tflops": [{"device": d, "dtype": t, "tflops": v} for (d, t), v in peaks.items()],
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        write_json_report(args.json, report)
    return 0


def cmd_bench_ann(args) -> int:
    from serving.bench_ann import Row, bench_ann, format_table

    report = bench_ann(artifact=args.artifact, num_items=args.num_items, dim=args.dim, num_queries=args.queries,
                       methods=args.methods, ms=args.m, ef_construction=args.ef_construction, efs=args.ef, k=args.k,
                       build_threads=args.build_threads, repeats=args.repeats, seed=args.seed, out_dir=Path(args.out))
    print(f"{report['vectors']}; {report['queries']} queries; searches on one thread, builds on "
          f"{report['build_threads']}")
    print(format_table([Row(**row) for row in report["rows"]]))
    print("\n".join(report["target"]))
    print(f"wrote {Path(args.out) / 'ann.json'} and {Path(args.out) / 'ann.png'}")
    return 0


def cmd_bench_mmr(args) -> int:
    from serving.bench_mmr import bench_mmr, format_mmr

    report = bench_mmr(args.candidates, args.k, args.dim, args.diversity, args.repeats)
    print(format_mmr(report))
    write_json_report(args.json, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    try:
        add_serving_commands(sub)
    except ImportError as missing:  # a training-only environment (a GPU box without the gRPC/Ray stack)
        parser.epilog = f"serve, rank, client and loadgen commands unavailable: {missing}"
    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # DataError, ConfigError, ArtifactError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
