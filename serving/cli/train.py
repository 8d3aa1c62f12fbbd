"""`seqrank train`, `evaluate`, `prior`, `export` and `synth`: the offline commands (no Ray Serve or gRPC needed)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from seqrank.serving.cli.render import print_metrics


def add_train_commands(sub) -> None:
    train = sub.add_parser("train", help="train an encoder on a log; writes a run directory")
    train.add_argument("--data", default="", help="log file; omit to train on the built-in synthetic log")
    train.add_argument("--format", default=None, choices=["auto", "events", "s3rec", "sasrec"])
    train.add_argument("--attributes", default=None, help="item side information (JSON {item: [attributes]})")
    train.add_argument("--config", default=None, help="YAML config layered over training/configs/default.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--out", required=True, help="run directory to create")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--init-from", default=None, metavar="RUN_OR_ARTIFACT",
                       help="warm start: continue from this run directory or artifact on --data (rows matched by raw "
                            "id; without --config the parent's settings; docs/retraining.md)")
    train.add_argument("--metrics-port", type=int, default=None, metavar="N",
                       help="serve progress gauges for Prometheus on this port while the run lasts (0: any free "
                            "port, printed); docs/metrics.md \"Training progress\"")
    train.add_argument("--metrics-textfile", default=None, metavar="PATH.prom",
                       help="write progress gauges to this file for node-exporter's textfile collector, at start, "
                            "after each epoch and at the end")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="full-ranking evaluation of a run's best checkpoint")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--split", default="test", choices=["test", "valid"])
    evaluate.add_argument("--baseline", default="model", choices=["model", "popular"])
    evaluate.add_argument("--with", dest="with_runs", nargs="+", default=[], metavar="RUN",
                          help="more runs on the same data: their scores are added (what model.towers trains in one run)")
    evaluate.add_argument("--no-transitions", action="store_true",
                          help="leave out the item-to-item prior the run chose (the encoder alone)")
    evaluate.add_argument("--against", default=None, metavar="RUN",
                          help="a second run on the same data (or `popular`, the most-popular baseline): also print "
                               "the paired difference (this run minus it) per metric over the same users, with its CI")
    evaluate.add_argument("--include-seen", action="store_true",
                          help="keep the items of each input history as candidates (as Rank's include_seen) instead of "
                               "masking them")
    evaluate.add_argument("--resamples", type=int, default=1000,
                          help="bootstrap resamples of the users for the confidence intervals (default: %(default)s)")
    evaluate.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default: %(default)s)")
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
                             "(raise --ef-search with it; docs/benchmarks/retrieval.md)")
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


def progress_metrics(args, config):
    """The Prometheus progress reporter --metrics-port / --metrics-textfile ask for, or None."""
    if args.metrics_port is None and args.metrics_textfile is None:
        return None
    if config.distributed.backend != "local":  # checked before the textfile is written; fit checks it too
        raise ValueError("--metrics-port, --metrics-textfile: need distributed.backend: local (with ray the chief "
                         "is a Train worker process)")
    from seqrank.training.progress_metrics import ProgressMetrics

    reporter = ProgressMetrics(Path(args.out).resolve().name, config.optim.max_epochs, textfile=args.metrics_textfile,
                               port=args.metrics_port)
    if reporter.port is not None:
        print(f"progress metrics on http://{socket.gethostname()}:{reporter.port}/metrics", file=sys.stderr)
    return reporter


def cmd_train(args) -> int:
    from seqrank.training.config import load_config
    from seqrank.training.train import fit

    config_path, inherited = args.config, []
    if args.init_from and args.config is None:
        from seqrank.training.warm_start import inherited_settings

        config_path, inherited = inherited_settings(args.init_from)
    config = load_config(config_path, inherited + training_overrides(args))
    reporter = progress_metrics(args, config)
    try:
        result = fit(config, args.out, progress=not args.quiet, hook=reporter, init_from=args.init_from)
    finally:
        if reporter is not None:
            reporter.close()
    print_metrics(result.test, f"test metrics of the best checkpoint (epoch {result.best_epoch}), run {args.out}")
    return 0


def load_run_data(run_dir: Path, data=None):
    """A run's config and its data, checked against the fingerprint it was trained on (`data`: already loaded)."""
    from seqrank.training.run_dir import read_config, read_data_info
    from seqrank.training.sources import load_sequences
    from seqrank.training.warm_start import recorded_data

    config = read_config(run_dir)
    data = data if data is not None else load_sequences(config.data)
    data = recorded_data(run_dir, data, config.data.attributes)  # a warm-started run's vocabulary holds more items
    recorded = read_data_info(run_dir).fingerprint
    if data.fingerprint != recorded:
        raise SystemExit(f"error: {config.data.path or 'synthetic data'} changed since run {run_dir} was trained "
                         f"(fingerprint {data.fingerprint[:12]} != {recorded[:12]})")
    return config, data


def ranked_users(run_dir: Path | None, data, split: str, how, with_runs=(), no_transitions: bool = False):
    """(UserRanks, item vectors or None) of a run's model (run_dir None: the most-popular baseline) on `split`."""
    import torch

    from seqrank.training.evaluate import rank_model, rank_popularity
    from seqrank.training.model import EncoderEnsemble, load_encoder_dir
    from seqrank.training.run_dir import load_run_transitions

    if run_dir is None:
        return rank_popularity(data, split, how), None
    model = load_encoder_dir(run_dir)
    if with_runs:
        for other in with_runs:
            load_run_data(Path(other), data)
        model = EncoderEnsemble.of([model] + [load_encoder_dir(other) for other in with_runs])
    prior = None if no_transitions else load_run_transitions(run_dir)
    ranked = rank_model(model, data, split, how, prior)
    with torch.no_grad():
        vectors = model.output_item_vectors()[: data.num_items + 1].float().cpu().numpy() if how.diversity else None
    return ranked, vectors


def cmd_evaluate(args) -> int:
    from seqrank.training.bootstrap import bootstrap_interval, paired_difference
    from seqrank.training.evaluate import Evaluation, per_user_metrics, split_summary
    from seqrank.training.metrics import ranking_report
    from seqrank.training.train import final_evaluation_users

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    # eval.test_users: the subset the run's own test metrics used
    how = Evaluation.of(config.eval, users=final_evaluation_users(data, config), seen_masked=not args.include_seen)
    ranked, vectors = ranked_users(None if args.baseline == "popular" else run_dir, data, args.split, how,
                                   args.with_runs, args.no_transitions)
    report = ranking_report(ranked.target_ranks, ranked.top_items, vectors, list(how.ks), data.num_items)
    stats = {"resamples": args.resamples, "confidence": args.confidence}
    per_user = per_user_metrics(ranked.target_ranks, how.ks)
    intervals = {name: bootstrap_interval(values, **stats)
                 for name, values in per_user.items()} if len(ranked.users) else {}
    differences = {}
    if args.against:
        if args.against == "popular":
            other, _ = ranked_users(None, data, args.split, how)
        else:
            load_run_data(Path(args.against), data)  # the same data, or an error
            other, _ = ranked_users(Path(args.against), data, args.split, how)
        if not (len(ranked.users) and len(other.users) and (other.users == ranked.users).all()):
            raise ValueError(f"--against {args.against}: does not evaluate the same users as {args.run}")
        other_values = per_user_metrics(other.target_ranks, how.ks)
        differences = {name: paired_difference(values, other_values[name], **stats)
                       for name, values in per_user.items()}
    summary = split_summary(data, args.split, how.users)
    protocol = config.data.protocol
    if config.data.target_behavior:
        protocol += f", targets: {config.data.target_behavior}"
    if args.json:
        as_pair = lambda interval: [interval.low, interval.high]  # noqa: E731
        payload = {**report, "split": summary, "protocol": protocol,
                   f"ci{round(args.confidence * 100)}": {name: as_pair(i) for name, i in intervals.items()}}
        if args.against:
            payload["against"] = {"run": args.against, "difference": {
                name: {"mean": d.mean, "low": d.low, "high": d.high} for name, d in differences.items()}}
        print(json.dumps(payload))
        return 0
    seen = "seen items kept" if args.include_seen else "seen items masked"
    print_metrics(report, f"{args.baseline} on {args.split} ({protocol}; {int(report['users'])} users, full ranking, "
                          f"{seen})")
    level = f"{args.confidence:.0%}"
    header = f"  {'metric':<9} {'mean':>7}  {level + ' CI (users resampled)':<26}"
    if args.against:
        header += f"  minus {args.against}: paired difference, {level} CI"
    print(header)
    for name, interval in intervals.items():
        line = f"  {name:<9} {interval.mean:7.4f}  [{interval.low:.4f}, {interval.high:.4f}]          "
        if name in differences:
            d = differences[name]
            line += f"  {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
        print(line)
    print(f"  users with a target but no history (not evaluated): {summary['users_without_history']}; targets never "
          f"in training: {summary['cold_targets']}; targets already in the history (masked): {summary['seen_targets']}")
    return 0


def cmd_prior(args) -> int:
    from seqrank.training.model import load_encoder_dir
    from seqrank.training.run_dir import read_transition_choice
    from seqrank.training.train import fit_transition_prior

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    prior, _ = fit_transition_prior(load_encoder_dir(run_dir), data, config, args.weights, run_dir)
    print(json.dumps(read_transition_choice(run_dir)))
    print(f"weight {prior.weight} kept in {run_dir}: `seqrank evaluate` and `seqrank export` use it")
    return 0


def cmd_export(args) -> int:
    from seqrank.training.artifact import IndexParams
    from seqrank.training.export import export_run

    params = IndexParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search,
                         norm_augmented=args.norm_augment)
    path = export_run(args.run, args.out, params)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"artifact {manifest['model_version']} written to {path} ({manifest['num_items']} items, dim {manifest['dim']})")
    return 0


def cmd_synth(args) -> int:
    from seqrank.training.synthetic import ZIPF_EXPONENT, write_synthetic_dataset

    paths = write_synthetic_dataset(args.out, num_users=args.users, num_items=args.items, seed=args.seed,
                                    zipf_exponent=ZIPF_EXPONENT if args.zipf is None else args.zipf)
    for path in paths:
        print(path)
    return 0
