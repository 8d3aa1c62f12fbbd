"""The `seqrank` command: thin subcommands over training and serving; settings are parsed here and passed on."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


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
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export", help="write the versioned serving artifact of a run")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--hnsw-m", type=int, default=32)
    export.add_argument("--ef-construction", type=int, default=200)
    export.add_argument("--ef-search", type=int, default=200)
    export.set_defaults(func=cmd_export)

    synth = sub.add_parser("synth", help="write a synthetic event log (CSV) and item attributes (JSON)")
    synth.add_argument("--out", required=True, help="directory")
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
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


def load_run_data(run_dir: Path):
    from training.config import config_from_dict
    from training.data import load_sequences
    import yaml

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = load_sequences(config.data)
    recorded = json.loads((run_dir / "data.json").read_text())["fingerprint"]
    if data.fingerprint != recorded:
        raise SystemExit(f"error: {config.data.path or 'synthetic data'} changed since run {run_dir} was trained "
                         f"(fingerprint {data.fingerprint[:12]} != {recorded[:12]})")
    return config, data


def cmd_evaluate(args) -> int:
    from training.evaluate import evaluate_model, evaluate_popularity
    from training.model import load_encoder_dir

    run_dir = Path(args.run)
    config, data = load_run_data(run_dir)
    if args.baseline == "popular":
        report = evaluate_popularity(data, args.split, config.eval.ks)
    else:
        report = evaluate_model(load_encoder_dir(run_dir), data, args.split, config.eval.ks, config.eval.batch_size)
    if args.json:
        print(json.dumps(report))
    else:
        print_metrics(report, f"{args.baseline} on {args.split} ({int(report['users'])} users, full ranking, seen items masked)")
    return 0


def cmd_export(args) -> int:
    from training.artifact import IndexParams
    from training.export import export_run

    params = IndexParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    path = export_run(args.run, args.out, params)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"artifact {manifest['model_version']} written to {path} ({manifest['num_items']} items, dim {manifest['dim']})")
    return 0


def cmd_synth(args) -> int:
    from training.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(args.out, num_users=args.users, num_items=args.items, seed=args.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
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
