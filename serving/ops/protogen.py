"""Regenerate the gRPC code from `protos/`: `python -m seqrank.serving.ops.protogen` in a checkout.

protoc's output is committed under `serving/generated/`, and the wheel installs its `seqrank/v1` folder as the
package `seqrank.v1` (pyproject.toml's package-dir), the very name protoc gives it: the gRPC module's
`from seqrank.v1 import ranking_pb2` and the message classes' module name (which Ray uses to unpickle messages)
work as generated, with no rewriting. The output depends only on the .proto files and the grpcio-tools version; a
test regenerates into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path("protos")  # relative to a checkout's root: protos/ and the generated code do not ship in the wheel
GENERATED_DIR = Path("serving") / "generated"
PROTO_FILES = ("seqrank/v1/ranking.proto",)
PACKAGE_DOCSTRING = (
    '"""protoc output for protos/, installed as seqrank.v1. Never edit; regenerate: '
    '`python -m seqrank.serving.ops.protogen`."""\n'
)


logger = logging.getLogger(__name__)


def _run_protoc(proto_root: Path, out_dir: Path) -> None:
    """Runs protoc in-process; raises RuntimeError with protoc's exit code on failure."""
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    exit_code = protoc.main(args)
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code} for {', '.join(PROTO_FILES)} in {proto_root}")


def _add_package_markers(out_dir: Path) -> None:
    """An __init__.py, saying how to regenerate, in each folder of generated modules (seqrank/v1); the folders
    above them stay namespace folders, since `seqrank` itself is the installed namespace package."""
    for folder in {module.parent for module in out_dir.rglob("*_pb2.py")}:
        (folder / "__init__.py").write_text(PACKAGE_DOCSTRING, encoding="utf-8")


def _remove_generated(out_dir: Path) -> None:
    """Deletes earlier output (modules, package markers, caches) so stale modules cannot linger; nothing else."""
    if not out_dir.exists():
        return
    for cache in list(out_dir.rglob("__pycache__")):
        shutil.rmtree(cache)
    for pattern in ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi", "__init__.py"):
        for path in out_dir.rglob(pattern):
            path.unlink()


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Writes the generated package into out_dir (replacing its contents); returns the files, sorted."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="seqrank-protogen-") as scratch:
        staging = Path(scratch) / "generated"
        staging.mkdir()
        _run_protoc(Path(proto_root), staging)
        _add_package_markers(staging)
        # Replace only after a complete, successful generation: a failed run leaves the old files intact.
        _remove_generated(out_dir)
        shutil.copytree(staging, out_dir, dirs_exist_ok=True)
    files = sorted(path for path in out_dir.rglob("*") if path.is_file())
    logger.info("generated %d files in %s", len(files), out_dir)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(args.out)


if __name__ == "__main__":
    main()
