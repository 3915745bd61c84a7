"""The architecture's rules, checked on the source: imports run one way and files stay readable.

Layers, bottom up: `contracts` (what crosses a process boundary) and `tokenization` (text <-> ids) → `engine` →
`transfer` → `serving` → the server packages → `pdserve` (CLI). `router` talks HTTP only and sits on `contracts` and
`tokenization` alone. `harness` (processes on loopback) serves `tests` and `bench`; `bench` never imports `tests`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "contracts", "tokenization", "engine", "transfer", "serving", "prefill_server", "decode_server", "router",
    "pdserve", "harness", "bench", "tests",
)  # fmt: skip
# package -> the first-party packages it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "contracts": set(PACKAGES) - {"contracts"},
    "tokenization": set(PACKAGES) - {"tokenization"},
    "engine": {"transfer", "serving", "prefill_server", "decode_server", "router", "pdserve", "harness", "tests"},
    "transfer": {"serving", "prefill_server", "decode_server", "router", "pdserve", "harness", "tests"},
    "serving": {"prefill_server", "decode_server", "router", "pdserve", "harness", "tests"},
    "prefill_server": {"decode_server", "router", "pdserve", "harness", "tests"},
    "decode_server": {"prefill_server", "router", "pdserve", "harness", "tests"},
    "router": {"engine", "transfer", "serving", "prefill_server", "decode_server", "pdserve", "harness", "tests"},
    "bench": {"tests"},
    "harness": {"tests", "bench"},
}
MAX_LINES = 450


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    assert _sources(package), f"no sources under {package}/"
    bad = {
        str(p.relative_to(ROOT)): sorted(hits)
        for p in _sources(package)
        if (hits := _imported_packages(p) & FORBIDDEN[package])
    }
    assert bad == {}, f"{package}/ must not import {sorted(FORBIDDEN[package])}"


def test_source_files_fit_one_sitting():
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in PACKAGES
        if pkg != "tests"
        for p in _sources(pkg)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"source files over {MAX_LINES} lines: split them by concern"
