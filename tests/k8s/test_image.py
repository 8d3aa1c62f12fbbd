"""k8s/Dockerfile: the installed package (not the source tree) holds the generated gRPC modules; pins agree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import ray
import yaml

from tests.k8s.conftest import K8S_DIR, REPO_ROOT

GENERATED = "seqrank/v1/ranking_pb2_grpc.py"  # protoc's package name is the installed one


def test_the_installed_package_imports_the_grpc_modules_outside_the_source_tree(tmp_path):
    """What the Dockerfile's `pip install --no-deps .` gives every Ray pod: the module Serve's proxies import."""
    source, wheel_dir, target = tmp_path / "src", tmp_path / "wheel", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what the Dockerfile copies, built outside the checkout
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("training", "serving"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(source)], check=True, timeout=300)
    (wheel,) = wheel_dir.glob("seqrank-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert GENERATED in names
    # One import name in site-packages: a user's own `serving` or `training` module can never clash with ours.
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"seqrank"}
    assert "seqrank/__init__.py" not in names  # a namespace package: seqrank.v1, .serving, .training
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import seqrank.v1.ranking_pb2_grpc as m; "
             "import seqrank.serving.history.redis_store, seqrank.training.artifact, seqrank.serving.app; "
             "print(m.__file__); m.add_RankingServiceServicer_to_server")
    result = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target))


def test_dockerfile_pins_agree_with_the_locks_the_readme_and_the_rayservice():
    """The image and scripts/setup.sh take torch and ray from scripts/lock/; the README and KubeRay must agree."""
    dockerfile = (K8S_DIR / "Dockerfile").read_text()
    locks = REPO_ROOT / "scripts" / "lock"
    cpu_torch = re.search(r"^torch==(\S+)", (locks / "torch-cpu.txt").read_text(), re.MULTILINE).group(1)
    assert f"`torch=={cpu_torch.split('+')[0]}`" in (REPO_ROOT / "README.md").read_text()
    rayservice = yaml.safe_load((K8S_DIR / "base" / "rayservice.yaml").read_text())
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f'"ray[serve]=={ray.__version__}"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(rf"^ray=={re.escape(ray.__version__)} ", (locks / "runtime.txt").read_text(), re.MULTILINE)
    # KubeRay's default probes run `wget ... | grep success` in bash; python:3.11-slim lacks wget.
    assert re.search(r"apt-get install .*\bwget\b", dockerfile)
