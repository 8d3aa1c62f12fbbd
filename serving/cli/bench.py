"""`seqrank bench ...`: the benchmarks, each printing a table (and optionally writing JSON)."""

from __future__ import annotations

from pathlib import Path

from seqrank.serving.cli.render import write_json_report
from seqrank.serving.cli.train import training_overrides

COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile modes; "" = eager


def add_bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    serve = bench.add_parser("serve", help="closed-loop gRPC load on a local Ray + Serve: Rank against an echo "
                                           "app behind the same proxy (the floor)")
    serve.add_argument("--artifact", default=None, help="artifact directory (default: train a tiny model)")
    serve.add_argument("--config", default=None, help="Serve config YAML (default: serving/serve_config.yaml)")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="default: %(default)s")
    serve.add_argument("--seconds", type=float, default=10.0, help="per target and concurrency")
    serve.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    serve.add_argument("--canary-artifact", default=None,
                       help="also measure Rank with this second version served as a canary and attribution on, "
                            "in the same cluster after the baseline (which then runs with attribution off)")
    serve.add_argument("--canary-percent", type=float, default=50.0, help="with --canary-artifact (default: 50)")
    serve.add_argument("--relay", action="store_true",
                       help="also measure the relay echo: the echo's replica first calls another deployment twice in "
                            "turn, the floor of the Kubernetes topology (ingress -> Encoder, ingress -> Retrieval)")
    serve.set_defaults(func=cmd_bench_serve)

    catalogue = bench.add_parser("catalogue", help="live catalogue freshness across two ingress replicas, and "
                                                   "RankBatch against single Rank calls (users per second)")
    catalogue.add_argument("--artifact", default=None, help="artifact directory (default: train a tiny model)")
    catalogue.add_argument("--config", default=None, help="Serve config YAML (default: serving/serve_config.yaml)")
    catalogue.add_argument("--changes", type=int, default=100, help="hide/restore changes timed (default: %(default)s)")
    catalogue.add_argument("--users", type=int, default=400, help="users ranked both ways (default: %(default)s)")
    catalogue.add_argument("--batch-size", type=int, default=100, help="requests per RankBatch (default: %(default)s)")
    catalogue.add_argument("--concurrency", type=int, default=16, help="single Rank clients (default: %(default)s)")
    catalogue.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    catalogue.set_defaults(func=cmd_bench_catalogue)

    search = bench.add_parser("search", help="personalised search on a real log: each test user's candidates are "
                                             "the items of its target's first attribute value; the service's "
                                             "re-ranking against most popular and the given order")
    search.add_argument("--artifact", required=True, help="artifact trained on --data")
    search.add_argument("--data", required=True, help="the log the artifact was trained on")
    search.add_argument("--attributes", required=True, help="the item attribute file (JSON {item: [values]})")
    search.add_argument("--max-users", type=int, default=0, help="a random subset of test users (default: all)")
    search.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    search.set_defaults(func=cmd_bench_search)

    new_items = bench.add_parser("new-items", help="items the model never trained on, upserted with their "
                                                   "attributes: prepare the log without them, then rank")
    steps = new_items.add_subparsers(dest="new_items_step", required=True)
    prepare = steps.add_parser("prepare", help="choose the new items and write the log without their events")
    prepare.add_argument("--data", required=True, help="an S3-Rec `user item item ...` log (e.g. Beauty.txt)")
    prepare.add_argument("--out", required=True, help="folder for the log without them and new_items.json")
    prepare.add_argument("--fraction", type=float, default=0.1, help="share of items made new (default: %(default)s)")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=cmd_bench_new_items_prepare)
    run = steps.add_parser("run", help="rank every test user against trained + upserted items")
    run.add_argument("--artifact-without", required=True, help="trained on the prepared log")
    run.add_argument("--artifact-with", required=True, help="trained on the whole log (the upper bound)")
    run.add_argument("--data", required=True, help="the whole log")
    run.add_argument("--attributes", required=True, help="the item attribute file")
    run.add_argument("--new-items", required=True, help="new_items.json from prepare")
    run.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    run.set_defaults(func=cmd_bench_new_items_run)

    retraining = bench.add_parser("retraining", help="daily warm starts (train --init-from on the newest day) "
                                                     "against full retrains: time and next-day NDCG@10")
    retraining.add_argument("--data", required=True, help="a Taobao UserBehavior file (user,item,category,behavior,"
                                                          "timestamp), e.g. the prefix in ../shared/data")
    retraining.add_argument("--out", default="runs/retraining", help="work directory (default: %(default)s)")
    retraining.add_argument("--days", type=int, default=3, help="last days evaluated (default: %(default)s)")
    retraining.add_argument("--min-item-events", type=int, default=3,
                            help="drop items with fewer events in the whole log first (default: %(default)s)")
    retraining.add_argument("--window-days", type=int, default=1,
                            help="days of events a warm start trains on (default: %(default)s)")
    retraining.add_argument("--set", dest="recipe", action="append", default=[], metavar="SECTION.KEY=VALUE",
                            help="added to both arms' recipe (serving/bench/retraining.py RECIPE)")
    retraining.add_argument("--warm-set", dest="warm", action="append", default=[], metavar="SECTION.KEY=VALUE",
                            help="added to the warm starts' settings (WARM)")
    retraining.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    retraining.set_defaults(func=cmd_bench_retraining)

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

    exact = bench.add_parser("exact", help="serving's exact search against its hnswlib index by catalogue size: ms "
                                           "per query one at a time and batched, recall@100, what "
                                           "retrieval.search: auto picks; the transition prior's cost")
    exact.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 8000, 12000, 50000, 200000],
                       help="generated catalogue sizes (default: %(default)s)")
    exact.add_argument("--dim", type=int, default=256, help="(default: %(default)s, the committed recipe's)")
    exact.add_argument("--artifact", default=None, help="also measure this artifact's item vectors with its "
                                                        "encoder's user vectors (and its prior, if any)")
    exact.add_argument("--artifact-sizes", type=int, nargs="*", default=[1000, 2000, 5000, 8000],
                       help="with --artifact: also random subsets of its items of these sizes, each with an index "
                            "built like the export's (default: %(default)s)")
    exact.add_argument("--queries", type=int, default=1000, help="held-out queries (default: %(default)s)")
    exact.add_argument("-k", type=int, default=200, help="items asked for: retrieval's fetch (default: %(default)s,"
                                                         " the default candidate pool)")
    exact.add_argument("--batch", type=int, default=16, help="queries per batched call (default: %(default)s, "
                                                             "ingress.max_batch_size)")
    exact.add_argument("--m", type=int, default=32, help="HNSW M (default: %(default)s, the export's)")
    exact.add_argument("--ef-construction", type=int, default=200, help="(default: %(default)s)")
    exact.add_argument("--ef", type=int, default=200, help="query beam (default: %(default)s, the export's)")
    exact.add_argument("--transition-candidates", type=int, default=50, help="(default: %(default)s)")
    exact.add_argument("--build-threads", type=int, default=1, help="threads for index builds (default: "
                                                                    "%(default)s); searches always use one")
    exact.add_argument("--repeats", type=int, default=3, help="timed passes, best kept (default: %(default)s)")
    exact.add_argument("--seed", type=int, default=0)
    exact.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON (rewritten "
                                                                   "after each row)")
    exact.set_defaults(func=cmd_bench_exact)

    filtered = bench.add_parser("filtered", help="filtered top-k (exact for narrow filters, filtered HNSW for wide "
                                                 "ones) against exact filtered search: recall@10, ms per query on "
                                                 "one thread, × unfiltered HNSW, the policy's choice")
    filtered.add_argument("--num-items", type=int, default=100_000, help="generated catalogue size (default: "
                                                                         "%(default)s)")
    filtered.add_argument("--dim", type=int, default=64, help="(default: %(default)s)")
    filtered.add_argument("--queries", type=int, default=200, help="held-out queries, each timed as its own call "
                                                                   "(default: %(default)s)")
    filtered.add_argument("-k", type=int, default=10, help="(default: %(default)s)")
    filtered.add_argument("--ef", type=int, default=200, help="hnswlib beam before the filter widens it "
                                                              "(default: %(default)s, the export's ef_search)")
    filtered.add_argument("--m", type=int, default=16, help="HNSW M (default: %(default)s)")
    filtered.add_argument("--ef-construction", type=int, default=200, help="(default: %(default)s)")
    filtered.add_argument("--build-threads", type=int, default=1, help="threads for index builds (default: "
                                                                       "%(default)s); searches always use one")
    filtered.add_argument("--selectivities", type=float, nargs="+", default=[0.5, 0.05, 0.005],
                          help="allowed share of the catalogue per mask (default: %(default)s)")
    filtered.add_argument("--masks", nargs="+", default=["random", "cluster"], choices=["random", "cluster"],
                          help="random items, or whole mixture clusters (correlated) (default: %(default)s)")
    filtered.add_argument("--index", nargs="+", default=["plain", "aug"], choices=["plain", "aug"],
                          help="hnswlib over raw vectors, or norm-augmented ones (default: %(default)s)")
    filtered.add_argument("--exact-max-items", type=int, default=None, help="policy override (default: "
                                                                            "FilterPolicy's)")
    filtered.add_argument("--exact-max-fraction", type=float, default=None, help="policy override")
    filtered.add_argument("--beam-factor", type=float, default=None, help="policy override")
    filtered.add_argument("--no-compare", action="store_true", help="measure only the policy's choice, not both "
                                                                    "strategies forced")
    filtered.add_argument("--repeats", type=int, default=2, help="timed passes, best kept (default: %(default)s)")
    filtered.add_argument("--seed", type=int, default=0)
    filtered.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON (rewritten "
                                                                      "after each row)")
    filtered.set_defaults(func=cmd_bench_filtered)

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
                                               "device and dtype, with FLOPs per sequence; with --paths: the "
                                               "serving inference paths side by side")
    encoder.add_argument("--models", nargs="+", default=["default", "large"], choices=["default", "large"])
    encoder.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                         help="default: cpu, and cuda when torch sees a GPU")
    encoder.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "bf16w"],
                         help="fp32; bf16 autocast over fp32 weights; bf16w: weights cast to bf16, no autocast")
    encoder.add_argument("--compile", default="", choices=COMPILE_MODES,
                         help="torch.compile mode for the encoder's forward (default: eager)")
    encoder.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                         help="default: 1 8 64 256 1024; with --paths: 1 16 (the ingress batch at 16 clients)")
    encoder.add_argument("--seconds", type=float, default=2.0, help="timed seconds per cell (at least 3 calls)")
    encoder.add_argument("--max-call-seconds", type=float, default=5.0,
                         help="skip a cell whose estimated single call takes longer (default: %(default)s)")
    encoder.add_argument("--matmul-peak", action="store_true",
                         help="also time a large square matmul per device and dtype: the achieved peak rate")
    encoder.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    encoder.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    encoder.add_argument("--paths", nargs="+", default=None, choices=["eager", "fused", "compile", "onnx"],
                         help="time these encoder.inference paths (serving/inference.py) on CPU instead, side by side")
    encoder.add_argument("--artifact", default=None, help="--paths: the artifact's encoder and item popularity "
                                                          "(default: the committed recipe's architecture, random)")
    encoder.add_argument("--path-threads", type=int, nargs="+", default=[1],
                         help="--paths: torch and onnxruntime threads, one table block each (default: %(default)s)")
    encoder.set_defaults(func=cmd_bench_encoder)


def cmd_bench_serve(args) -> int:
    from seqrank.serving.bench.loadgen import bench_serve, format_report
    from seqrank.serving.config import SERVE_CONFIG_PATH
    from seqrank.serving.ops.deploy import read_serve_config

    config = read_serve_config(args.config or SERVE_CONFIG_PATH)
    report = bench_serve(config, args.artifact, args.concurrency, args.seconds,
                         canary_artifact=args.canary_artifact, canary_percent=args.canary_percent, relay=args.relay)
    print(format_report(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_train(args) -> int:
    from seqrank.serving.bench.train_speed import bench_train, format_train_table
    from seqrank.training.config import load_config

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

    from seqrank.serving.bench.train_speed import DTYPES, bench_encoder, format_encoder_table, matmul_peak

    if args.paths:
        return _bench_encoder_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise ValueError("--devices cuda: torch.cuda.is_available() is False")
    matmul_dtypes = {DTYPES[t]: t for t in reversed(args.dtypes)}.values()  # bf16w's matmuls are bf16's (first name kept)
    peaks = {(d, t): matmul_peak(d, t) for d in devices for t in matmul_dtypes} if args.matmul_peak else {}
    rows = bench_encoder(args.models, devices, args.dtypes, args.batch_sizes or [1, 8, 64, 256, 1024], args.seconds,
                         args.max_call_seconds, peaks, compile_mode=args.compile)
    print(format_encoder_table(rows, peaks))
    if args.json:
        report = {"rows": [asdict(r) for r in rows],
                  "matmul_peak_tflops": [{"device": d, "dtype": t, "tflops": v} for (d, t), v in peaks.items()],
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        write_json_report(args.json, report)
    return 0


def _bench_encoder_paths(args) -> int:
    from dataclasses import asdict

    import torch

    from seqrank.serving.bench.encoder_paths import (
        artifact_model,
        bench_encoder_paths,
        format_paths_table,
        recipe_model,
    )

    model, popularity = artifact_model(args.artifact) if args.artifact else recipe_model()
    rows = bench_encoder_paths(model, popularity, args.paths, args.path_threads, args.batch_sizes or [1, 16],
                               args.seconds)
    source = args.artifact or "the committed recipe's architecture, random weights"
    print(f"encoder: {source}; towers {list(model.config.towers) or [model.config.backbone]}, histories of 20-50 "
          f"events; torch {torch.__version__}")
    print(format_paths_table(rows))
    write_json_report(args.json, {"rows": [asdict(r) for r in rows], "artifact": args.artifact,
                                  "torch": torch.__version__})
    return 0


def cmd_bench_ann(args) -> int:
    from seqrank.serving.bench.ann import Row, bench_ann, format_table

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
    from seqrank.serving.bench.mmr import bench_mmr, format_mmr

    report = bench_mmr(args.candidates, args.k, args.dim, args.diversity, args.repeats)
    print(format_mmr(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_catalogue(args) -> int:
    from seqrank.serving.bench.catalogue import bench_catalogue, format_catalogue
    from seqrank.serving.config import SERVE_CONFIG_PATH
    from seqrank.serving.ops.deploy import read_serve_config

    report = bench_catalogue(read_serve_config(args.config or SERVE_CONFIG_PATH), args.artifact, args.changes,
                             args.users, args.batch_size, args.concurrency)
    print(format_catalogue(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_search(args) -> int:
    from seqrank.serving.bench.search import bench_search, format_search

    report = bench_search(args.artifact, args.data, args.attributes, max_users=args.max_users)
    print(format_search(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_new_items_prepare(args) -> int:
    from seqrank.serving.bench.new_items import prepare

    summary = prepare(args.data, args.out, args.fraction, args.seed)
    print(f"{summary['new_items']} of {summary['items']} items are new; {summary['events_dropped']} events dropped; "
          f"train on {summary['log']}")
    return 0


def cmd_bench_new_items_run(args) -> int:
    from seqrank.serving.bench.new_items import format_new_items, run

    report = run(args.artifact_without, args.artifact_with, args.data, args.attributes, args.new_items)
    print(format_new_items(report))
    write_json_report(args.json, report)
    return 0


def cmd_bench_filtered(args) -> int:
    from dataclasses import replace

    from seqrank.serving.bench.filtered import Row, bench_filtered, format_table, write_report
    from seqrank.serving.filtered_search import FilterPolicy

    overrides = {name: getattr(args, name) for name in ("exact_max_items", "exact_max_fraction", "beam_factor")
                 if getattr(args, name) is not None}
    report = bench_filtered(num_items=args.num_items, dim=args.dim, num_queries=args.queries, k=args.k, ef=args.ef,
                            M=args.m, ef_construction=args.ef_construction, build_threads=args.build_threads,
                            selectivities=args.selectivities, mask_kinds=args.masks, index_kinds=args.index,
                            policy=replace(FilterPolicy(), **overrides), compare=not args.no_compare,
                            repeats=args.repeats, seed=args.seed,
                            on_report=lambda partial: write_report(args.json, partial))
    build = ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in report["build_s"].items())
    print(f"{report['vectors']}; {report['queries']} queries, k={report['k']}, ef={report['ef']}, M={report['M']}, "
          f"ef_construction={report['ef_construction']}; searches on one thread, builds on {report['build_threads']} "
          f"({build}); policy {report['policy']}")
    print(format_table([Row(**row) for row in report["rows"]]))
    print("\n".join(report["target"]))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_bench_exact(args) -> int:
    from seqrank.serving.bench.exact_vs_hnsw import PriorCost, Row, bench_exact, format_priors, format_rows

    report = bench_exact(sizes=args.sizes, dim=args.dim, num_queries=args.queries, k=args.k, batch=args.batch,
                         M=args.m, ef_construction=args.ef_construction, ef=args.ef,
                         build_threads=args.build_threads, repeats=args.repeats, seed=args.seed,
                         artifact=args.artifact, artifact_sizes=tuple(args.artifact_sizes),
                         transition_candidates=args.transition_candidates,
                         on_row=lambda partial: write_json_report(args.json, partial))
    print(f"{report['queries']} queries, k={report['k']}, M={report['M']}, ef_construction="
          f"{report['ef_construction']}, ef={report['ef']}; searches on one thread, builds on "
          f"{report['build_threads']}")
    print(format_rows([Row(**row) for row in report["rows"]]))
    print(format_priors([PriorCost(**prior) for prior in report["prior"]]))
    return 0


def cmd_bench_retraining(args) -> int:
    from seqrank.serving.bench.retraining import RECIPE, WARM, bench_retraining, format_table, report

    results = bench_retraining(args.data, args.out, days=args.days, window_days=args.window_days,
                               recipe=RECIPE + args.recipe, warm=WARM + args.warm, min_item_events=args.min_item_events)
    print(format_table(results))
    write_json_report(args.json, report(results))
    return 0
