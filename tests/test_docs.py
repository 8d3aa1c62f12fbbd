"""The documents a user reads: a short README, benchmark pages that open with their current table, links that
resolve, and product files that speak only of the product (no issue numbers, no section-number citations)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
README_LIMIT = 8_000
BENCHMARK_PAGES = sorted(p for p in (CHECKOUT / "docs" / "benchmarks").glob("*.md") if p.name != "README.md")
MARKDOWN = sorted([CHECKOUT / "README.md", CHECKOUT / "k8s" / "README.md", *(CHECKOUT / "docs").rglob("*.md")])
PRODUCT_FOLDERS = ("serving", "training", "k8s", "protos", "scripts", "docs", ".ci")
PRODUCT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".proto", ".sh", ".toml", ".json", ""}
# Words about how the product was built rather than what it is.
NOT_PRODUCT = re.compile(r"\b[Ii]ssue \d+|\bBENCHMARKS\.md\b|\bRELIABILITY\.md\b|\blent GPU\b|\b(?:section|§) ?\d")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def product_files() -> list[Path]:
    files = [CHECKOUT / "README.md", CHECKOUT / "pyproject.toml"]
    for folder in PRODUCT_FOLDERS:
        files += [p for p in (CHECKOUT / folder).rglob("*") if p.is_file() and p.suffix in PRODUCT_SUFFIXES
                  and "__pycache__" not in p.parts and "generated" not in p.parts]
    return files


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters; move reference material to docs/"
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)
    assert commands[:2] == ["bash scripts/setup.sh && .venv/bin/seqrank quickstart",
                            "bash scripts/setup.sh && .venv/bin/python -m pytest -q"]


def test_ci_runs_the_readme_test_command():
    ci = (CHECKOUT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in ci


@pytest.mark.parametrize("page", BENCHMARK_PAGES, ids=lambda p: p.name)
def test_each_benchmark_page_opens_with_its_current_table(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    headings = [line for line in lines if line.startswith("## ")]
    assert headings and headings[0] == "## Current", f"{page.name}: first section must be '## Current'"
    current = lines[lines.index("## Current") + 1: lines.index(headings[1]) if len(headings) > 1 else None]
    assert any(line.startswith("|") for line in current), f"{page.name}: '## Current' holds no table"
    said = " ".join(current)
    assert re.search(r"20\d\d-\d\d-\d\d", said), f"{page.name}: '## Current' gives no date"
    assert "`" in said, f"{page.name}: '## Current' gives no command"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(CHECKOUT)))
def test_relative_links_resolve(path):
    broken = [target for target in LINK.findall(path.read_text(encoding="utf-8"))
              if "://" not in target and not (path.parent / target).exists()]
    assert not broken, f"{path.relative_to(CHECKOUT)}: broken links {broken}"


def test_product_files_speak_only_of_the_product():
    offenders = []
    for path in product_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if NOT_PRODUCT.search(line):
                offenders.append(f"{path.relative_to(CHECKOUT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
