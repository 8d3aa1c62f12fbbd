"""Regenerate `serving/generated/` from `protos/`: `python -m serving.protogen`.

protoc writes `from seqrank.v1 import ranking_pb2` into the gRPC module, which only imports when
`serving/generated` itself is on sys.path. Ray Serve's proxies import the servicer module from the installed
package, so `generate()` rewrites that one import to `serving.generated.seqrank.v1` and adds the package
`__init__.py` files. It also gives the message classes that importable module name (protoc names them
`seqrank.v1.ranking_pb2`): Ray pickles messages and classes by reference, and unpickling imports that
module. The output depends only on the .proto files and the grpcio-tools version; a test
regenerates into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_DIR = REPO_ROOT / "serving" / "generated"
GENERATED_PACKAGE = "serving.generated"
PROTO_FILES = ("seqrank/v1/ranking.proto",)
PACKAGE_DOCSTRING = '"""protoc output for protos/, committed. Never edit; regenerate: `python -m serving.protogen`."""\n'

# protoc's import of a sibling _pb2 module, e.g. "from seqrank.v1 import ranking_pb2 as seqrank_..."
_PB2_IMPORT = re.compile(r"^from (seqrank(?:\.\w+)*) import (\w+_pb2) as ", re.MULTILINE)
# protoc's module name for the message classes: "BuildTopDescriptorsAndMessages(DESCRIPTOR, 'seqrank.v1.ranking_pb2'"
_MESSAGE_MODULE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'(seqrank(?:\.\w+)*)'")

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


def _rewrite_grpc_imports(grpc_module: Path) -> None:
    """Makes the _pb2_grpc module import its _pb2 sibling through the installed package."""
    text = grpc_module.read_text(encoding="utf-8")
    rewritten, count = _PB2_IMPORT.subn(rf"from {GENERATED_PACKAGE}.\1 import \2 as ", text)
    if count != 1:
        raise RuntimeError(f"{grpc_module}: expected exactly 1 protoc import to rewrite, found {count}")
    grpc_module.write_text(rewritten, encoding="utf-8")


def _rewrite_message_module(pb2_module: Path) -> None:
    """Registers the messages under the module's importable name, e.g. serving.generated.seqrank.v1.ranking_pb2."""
    text = pb2_module.read_text(encoding="utf-8")
    rewritten, count = _MESSAGE_MODULE.subn(rf"\1'{GENERATED_PACKAGE}.\2'", text)
    if count != 1:
        raise RuntimeError(f"{pb2_module}: expected exactly 1 message module name to rewrite, found {count}")
    pb2_module.write_text(rewritten, encoding="utf-8")


def _add_package_markers(out_dir: Path) -> None:
    """__init__.py in out_dir (saying how to regenerate) and in every folder below that holds generated modules."""
    (out_dir / "__init__.py").write_text(PACKAGE_DOCSTRING, encoding="utf-8")
    for module in out_dir.rglob("*_pb2.py"):
        for folder in module.parent.relative_to(out_dir).parents:
            (out_dir / folder / "__init__.py").touch()
        (module.parent / "__init__.py").touch()


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
        for grpc_module in staging.rglob("*_pb2_grpc.py"):
            _rewrite_grpc_imports(grpc_module)
        for pb2_module in staging.rglob("*_pb2.py"):
            _rewrite_message_module(pb2_module)
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
