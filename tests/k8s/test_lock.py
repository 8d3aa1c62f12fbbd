"""scripts/lock/: every entry an exact pin with sha256 hashes, pyproject.toml fully covered, and the locks install.

The oracles are pyproject.toml (what must be locked), pip itself (a hash-checked dry run over the configured indexes
refuses any dependency the lock leaves out and any hash that does not match the file it fetches) and k8s/Dockerfile
read as instructions (lock installed before the source is copied, base image by digest).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.k8s.conftest import K8S_DIR, REPO_ROOT

LOCK_DIR = REPO_ROOT / "scripts" / "lock"
LOCKS = sorted(LOCK_DIR.glob("*.txt"))
TORCH_LOCKS = sorted(LOCK_DIR.glob("torch-*.txt"))
SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    hashes: frozenset[str]


def logical_lines(text: str) -> list[str]:
    """Requirement-file lines with comments dropped and backslash continuations joined."""
    text = re.sub(r"(?m)^\s*#.*$", "", text)  # whole-line comments, such as uv's "# via" annotations
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def parse_lock(text: str) -> dict[str, Pin]:
    """Each entry as a Pin; raises AssertionError naming the entry that is not `name==version --hash=sha256:...`."""
    pins: dict[str, Pin] = {}
    for line in logical_lines(text):
        requirement_text, _, options = line.partition(" --hash=")
        options = "--hash=" + options if options else ""
        assert not requirement_text.startswith("-"), f"option line in a lock: {line!r}"
        requirement = Requirement(requirement_text.strip())
        (specifier,) = requirement.specifier or [None]
        assert specifier is not None and specifier.operator == "==" and "*" not in specifier.version, \
            f"{requirement_text!r} is not an exact == pin"
        hashes = SHA256.findall(options)
        assert hashes, f"{requirement.name} has no --hash=sha256:"
        assert SHA256.sub("", options).strip() == "", f"{requirement.name}: only sha256 hashes may follow the pin"
        assert requirement.url is None, f"{requirement.name} is a direct URL, not an index pin"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} twice in one lock"
        pins[name] = Pin(name, specifier.version, frozenset(hashes))
    return pins


def lock(name: str) -> dict[str, Pin]:
    return parse_lock((LOCK_DIR / name).read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def assert_covers(pins: dict[str, Pin], requirements: list[str], where: str) -> None:
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{where} lacks {requirement.name}, which pyproject.toml names"
        assert requirement.specifier.contains(Version(pins[name].version), prereleases=True), \
            f"{where} pins {name}=={pins[name].version}, outside pyproject.toml's {requirement.specifier}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"(?m)^\s*#.*\n", "", (K8S_DIR / "Dockerfile").read_text())
    result = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def pip_dry_run(tmp_path: Path, *lock_names: str) -> set[str]:
    """What pip would install from these locks into an empty environment, hashes checked against fetched files."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--require-hashes",
               "--quiet", "--report", str(report)]
    for name in lock_names:
        command += ["-r", str(LOCK_DIR / name)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}


# ---- the files themselves


@pytest.mark.parametrize("path", LOCKS, ids=[path.name for path in LOCKS])
def test_every_entry_is_an_exact_pin_with_sha256_hashes(path):
    pins = parse_lock(path.read_text())
    assert pins, f"{path.name} locks nothing"


def test_the_parser_refuses_what_a_lock_must_not_hold():
    """Hand-written entries: each defect the lock tests rely on the parser to find."""
    good = "numpy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via pandas\n"
    assert parse_lock(good) == {"numpy": Pin("numpy", "2.4.6", frozenset({"a" * 64}))}
    for bad in ("numpy==2.4.6\n", "numpy>=2.4 --hash=sha256:" + "a" * 64, "numpy==2.* --hash=sha256:" + "a" * 64,
                "numpy==2.4.6 --hash=md5:" + "a" * 32, "numpy==2.4.6 --hash=sha256:" + "a" * 64 + " --no-binary x",
                "-e . --hash=sha256:" + "a" * 64, good + good):
        with pytest.raises(AssertionError):
            parse_lock(bad)


def test_the_locks_cover_every_dependency_pyproject_toml_names():
    project = pyproject()["project"]
    runtime, dev = lock("runtime.txt"), lock("dev.txt")
    dependencies = project["dependencies"]
    torch = [text for text in dependencies if canonicalize_name(Requirement(text).name) == "torch"]
    others = [text for text in dependencies if text not in torch]
    assert torch, "pyproject.toml names torch; the torch locks pin it"
    assert_covers(runtime, others, "runtime.txt")
    extras = project["optional-dependencies"]
    assert_covers(dev, others + extras["dev"] + extras["bench"], "dev.txt")
    assert TORCH_LOCKS, "no scripts/lock/torch-*.txt"
    for path in TORCH_LOCKS:
        assert_covers(parse_lock(path.read_text()), torch, path.name)


def test_dev_and_build_hold_the_runtime_pins_and_torch_only_its_own():
    runtime, dev, build = lock("runtime.txt"), lock("dev.txt"), lock("build.txt")
    for name, pin in runtime.items():
        assert dev.get(name) == pin, f"dev.txt differs from runtime.txt on {name}: {dev.get(name)} vs {pin}"
        assert build.get(name, pin) == pin, f"build.txt differs from runtime.txt on {name}"
    assert "torch" not in runtime and "torch" not in dev, "torch belongs in torch-VARIANT.txt only"
    torch_versions = set()
    for path in TORCH_LOCKS:
        pins = parse_lock(path.read_text())
        # Installed together with runtime.txt: a package in both would be a double requirement.
        assert not set(pins) & set(runtime), f"{path.name} repeats {sorted(set(pins) & set(runtime))}"
        torch_versions.add(Version(pins["torch"].version).public)
        pinned_in = (LOCK_DIR / path.name.replace(".txt", ".in")).read_text()
        assert f"torch=={pins['torch'].version}" in pinned_in.split(), f"{path.name} is stale against its .in file"
    assert len(torch_versions) == 1, f"the torch variants disagree: {torch_versions}"
    assert "cpu" in {path.stem.removeprefix("torch-") for path in TORCH_LOCKS}  # scripts/setup.sh and the default


def test_the_runtime_lock_and_cpu_torch_install_and_need_nothing_more(tmp_path):
    """pip refuses (with --require-hashes) a dependency the lock omits and a hash the fetched file does not match."""
    locked = set(lock("runtime.txt")) | set(lock("torch-cpu.txt"))
    assert pip_dry_run(tmp_path, "runtime.txt", "torch-cpu.txt") == locked


def test_the_dev_lock_installs_and_needs_nothing_more(tmp_path):
    locked = set(lock("dev.txt")) | set(lock("torch-cpu.txt"))
    assert pip_dry_run(tmp_path, "dev.txt", "torch-cpu.txt") == locked


# ---- how the image and scripts/setup.sh use them


def test_the_base_image_is_pinned_by_digest():
    froms = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "FROM"]
    assert froms and all(re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}( AS \w+)?", image) for image in froms), \
        froms


def test_the_image_installs_the_locks_before_it_copies_any_source():
    instructions = dockerfile_instructions()
    variant = next(arguments for instruction, arguments in instructions
                   if instruction == "ARG" and arguments.startswith("TORCH_VARIANT="))
    assert (LOCK_DIR / f"torch-{variant.split('=', 1)[1]}.txt").exists(), f"no lock for the default {variant}"

    def first(predicate) -> int:
        return next(index for index, step in enumerate(instructions) if predicate(*step))

    lock_copy = first(lambda i, a: i == "COPY" and "scripts/lock/runtime.txt" in a
                      and "scripts/lock/torch-${TORCH_VARIANT}.txt" in a and "scripts/lock/build.txt" in a)
    build_install = first(lambda i, a: i == "RUN" and re.search(r"--require-hashes -r \S*/build\.txt", a))
    install = first(lambda i, a: i == "RUN" and "--require-hashes" in a and "--no-build-isolation" in a
                    and "runtime.txt" in a and "torch-${TORCH_VARIANT}.txt" in a)
    source_copy = first(lambda i, a: i in ("COPY", "ADD") and "scripts/lock/" not in a)
    assert lock_copy < build_install <= install < source_copy, (lock_copy, build_install, install, source_copy)
    # Every pip install is hash-checked, or installs the package alone with no dependency resolution.
    for instruction, arguments in instructions:
        for command in re.findall(r"pip install [^&]*", arguments) if instruction == "RUN" else []:
            assert "--require-hashes" in command or "--no-deps" in command, command


def test_setup_sh_installs_from_the_dev_lock_with_hashes():
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    hash_checked = re.search(r"install\(\) \{ [^}]*pip install[^}]*--require-hashes", setup)
    assert hash_checked, "setup.sh's install() must pass --require-hashes"
    assert re.search(r'\binstall --no-build-isolation -r "\$LOCK/dev\.txt" -r "\$LOCK/torch-cpu\.txt"', setup)
    assert re.search(r'\binstall -r "\$LOCK/build\.txt"', setup)
    assert re.search(r"pip install -q --no-deps --no-build-isolation -e \.", setup)


@pytest.mark.slow
def test_the_cuda_torch_lock_resolves_from_pypi_with_nothing_more(tmp_path):
    """The cu130 image's set, resolved by pip from PyPI alone (as in a Docker build) from metadata, hashes aside."""
    unhashed = tmp_path / "cu130.txt"
    pins = {**lock("runtime.txt"), **lock("torch-cu130.txt")}
    unhashed.write_text("".join(f"{pin.name}=={pin.version}\n" for pin in pins.values()))
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--index-url", "https://pypi.org/simple", "--report", str(report), "-r", str(unhashed)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert installed == set(pins)


def test_every_torch_variant_the_docs_name_has_a_lock():
    texts = [path.read_text() for path in [*K8S_DIR.rglob("*"), *(REPO_ROOT / "docs").rglob("*.md")]
             if path.is_file() and path.suffix in ("", ".md", ".yaml")]
    named = {variant for text in texts for variant in re.findall(r"TORCH_VARIANT=([A-Za-z0-9_]+)", text)}
    assert named, "no TORCH_VARIANT found in k8s/ or docs/"
    missing = sorted(variant for variant in named if not (LOCK_DIR / f"torch-{variant}.txt").exists())
    assert not missing, f"TORCH_VARIANT values without scripts/lock/torch-VARIANT.txt: {missing}"
