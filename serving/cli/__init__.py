"""The `seqrank` command: thin subcommands over training and serving; settings are parsed here and passed on.

One module per command group (train, serve, client, bench); `render` holds the printing helpers. Library code never
imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys

from seqrank.serving.cli.bench import add_bench_commands
from seqrank.serving.cli.events import add_events_commands
from seqrank.serving.cli.train import add_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    try:  # the serving commands need Ray Serve and gRPC, which a training-only environment may lack
        from seqrank.serving.cli.canary import add_canary_commands
        from seqrank.serving.cli.client import add_client_commands
        from seqrank.serving.cli.promote import add_promote_commands
        from seqrank.serving.cli.serve import add_serve_commands

        add_serve_commands(sub)
        add_client_commands(sub)
        add_promote_commands(sub)
        add_canary_commands(sub)
    except ModuleNotFoundError as missing:  # a training-only environment (a GPU box without the gRPC/Ray stack)
        if (missing.name or "").startswith("seqrank"):
            raise  # our own module: a bug, never a reason to hide commands
        parser.epilog = f"serve, rank, client and loadgen commands unavailable: {missing}"
    add_bench_commands(sub)
    add_events_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # DataError, ConfigError, ArtifactError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
