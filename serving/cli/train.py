"""`seqrank train`, `evaluate`, `prior`, `export` and `synth`: the offline commands (no Ray Serve or gRPC needed)."""

from __future__ import annotations

import json
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


def cmd_train(args) -> int:
    from seqrank.training.config import load_config
    from seqrank.training.train import fit

    config = load_config(args.config, training_overrides(args))
    result = fit(config, args.out, progress=not args.quiet)
    print_metrics(result.test, f"test metrics of the best checkpoint (epoch {result.best_epoch}), run {args.out}")
    return 0


def load_run_data(run_dir: Path, data=None):
    """A run's config and its data, checked against the fingerprint it was trained on (`data`: already loaded)."""
    from seqrank.training.run_dir import read_config, read_data_info
    from seqrank.training.sources import load_sequences

    config = read_config(run_dir)
    data = data if data is not None else load_sequences(config.data)
    recorded = read_data_info(run_dir).fingerprint
    if data.fingerprint != recorded:
        raise SystemExit(f"error: {config.data.path or 'synthetic data'} changed since run {run_dir} was trained "
                         f"(fingerprint {data.fingerprint[:12]} != {recorded[:12]})")
    return config, data


def cmd_evaluate(args) -> int:
    from seqrank.training.evaluate import Evaluation, evaluate_model, evaluate_popularity
    from seqrank.training.model import EncoderEnsemble, load_encoder_dir
    from seqrank.training.run_dir import load_run_transitions
    from seqrank.training.train import final_evaluation_users

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    # eval.test_users: the subset the run's own test metrics used
    how = Evaluation.of(config.eval, users=final_evaluation_users(data, config))
    if args.baseline == "popular":
        report = evaluate_popularity(data, args.split, how)
    else:
        model = load_encoder_dir(run_dir)
        if args.with_runs:
            for other in args.with_runs:
                load_run_data(Path(other), data)
            model = EncoderEnsemble.of([model] + [load_encoder_dir(other) for other in args.with_runs])
        prior = None if args.no_transitions else load_run_transitions(run_dir)
        report = evaluate_model(model, data, args.split, how, prior)
    if args.json:
        print(json.dumps(report))
    else:
        print_metrics(report, f"{args.baseline} on {args.split} ({int(report['users'])} users, full ranking, seen items masked)")
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
