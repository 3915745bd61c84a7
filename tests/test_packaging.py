"""Packaging for CUDA machines: the extras set-up picks, pyproject's extras and pins, the check that a CUDA pool
is only registered with a GPU-capable engine build, the wheel trimming helpers, and the device check on CPU."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from transfer.backends.base import BackendSettings, MemoryRegion, TransferError
from transfer.backends.gpu_memory import (
    MOONCAKE_BY_CUDA,
    MOONCAKE_CPU,
    EngineBuild,
    GpuMemoryUnsupported,
    elf_needed,
    gpu_memory_problem,
    probe_mooncake,
    probe_nixl,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import pick_extras  # noqa: E402
import trim_wheels  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# --- which extras set-up installs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "extras"),
    [
        ("12.4", ["dev", "mooncake-cuda12", "nixl", "flashinfer"]),
        ("12.8", ["dev", "mooncake-cuda12", "nixl", "flashinfer"]),
        ("13.0", ["dev", "mooncake-cuda13", "nixl", "flashinfer"]),
        (None, ["dev", "mooncake", "nixl"]),  # CPU: exactly what set-up installed before
        ("", ["dev", "mooncake", "nixl"]),
        ("11.8", ["dev", "mooncake", "nixl"]),
        ("garbage", ["dev", "mooncake", "nixl"]),
    ],
)
def test_pick_extras_table(cuda: str | None, extras: list[str]) -> None:
    got, warning = pick_extras.pick_extras(cuda)
    assert got == extras
    if cuda in ("11.8", "garbage"):
        assert f"CUDA {cuda}" in warning and "CUDA 12 or 13" in warning
    else:
        assert warning == ""


def test_pick_extras_command_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(REPO / "scripts/pick_extras.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)

    assert run("13.0").stdout.strip() == "dev,mooncake-cuda13,nixl,flashinfer"
    old = run("11.8")
    assert old.stdout.strip() == "dev,mooncake,nixl" and "warning" in old.stderr
    # no argument: this machine's torch (a CPU build here gives the CPU set)
    if torch.version.cuda is None:
        assert run().stdout.strip() == "dev,mooncake,nixl"


def test_pyproject_has_every_extra_the_picker_names() -> None:
    for cuda in ("12.4", "13.0", None, "11.8"):
        for extra in pick_extras.pick_extras(cuda)[0]:
            assert extra in EXTRAS, f"pick_extras names [{extra}], which pyproject.toml does not define"
    assert EXTRAS["mooncake"] == [MOONCAKE_CPU]
    for major, dist in MOONCAKE_BY_CUDA.items():  # the capability check's fix names the same wheels
        assert EXTRAS[f"mooncake-cuda{major}"] == [dist]
    assert EXTRAS["mooncake-cuda"] == EXTRAS["mooncake-cuda12"]
    assert EXTRAS["flashinfer"] == ["flashinfer-python>=0.7.4,<0.8"]
    assert EXTRAS["nixl"] == ["nixl"]


def test_setup_sh_installs_the_picked_extras() -> None:
    text = (REPO / "scripts/setup.sh").read_text()
    assert 'extras=$("$VENV/bin/python" scripts/pick_extras.py)' in text
    assert 'pip install -e ".[$extras]"' in text
    assert "scripts/pick_extras.py | sha256sum" in text  # a change to the picker re-runs set-up


# --- can the installed build register GPU memory ----------------------------------------------------------

CPU_WHEEL = {MOONCAKE_CPU: "0.3.13.post1"}
CU12_WHEEL = {"mooncake-transfer-engine": "0.3.13.post1"}
CU13_WHEEL = {"mooncake-transfer-engine-cuda13": "0.3.14"}
NIXL_META = {"nixl": "1.5.1", "nixl-cu12": "1.5.1", "nixl-cu13": "1.5.1"}


@pytest.mark.parametrize(
    ("build", "expect"),
    [
        # Mooncake: what engine.so links decides; the distribution names only when it cannot be read.
        (EngineBuild("mooncake", CU13_WHEEL, "13.0", cudart_major=13), None),
        (EngineBuild("mooncake", CU12_WHEEL, "12.4", cudart_major=12), None),
        (EngineBuild("mooncake", CPU_WHEEL, "13.0", cudart_major=0), "pip install mooncake-transfer-engine-cuda13"),
        (EngineBuild("mooncake", CPU_WHEEL, "12.4", cudart_major=0), "pip install mooncake-transfer-engine "),
        (EngineBuild("mooncake", CU12_WHEEL, "13.0", cudart_major=12), "built for CUDA 12 but torch uses CUDA 13.0"),
        # both installed: they overwrite each other; engine.so says which one won
        (EngineBuild("mooncake", {**CPU_WHEEL, **CU13_WHEEL}, "13.0", cudart_major=0), "pip uninstall -y"),
        (EngineBuild("mooncake", {**CPU_WHEEL, **CU13_WHEEL}, "13.0", cudart_major=13), None),
        (EngineBuild("mooncake", CPU_WHEEL, "13.0", cudart_major=None), "CPU-only build"),
        (EngineBuild("mooncake", CU13_WHEEL, "13.0", cudart_major=None), None),
        (EngineBuild("mooncake", {}, "13.0", cudart_major=None), None),  # a source build: let the engine try
        (EngineBuild("mooncake", CPU_WHEEL, "11.8", cudart_major=0), "CUDA 12 and 13 only"),
        # NIXL: the build module the meta package loaded, UCX's VRAM_SEG, the UCX CUDA transport
        (
            EngineBuild(
                "nixl", NIXL_META, "13.0", nixl_module="nixl_cu13", vram_mem_type=True, ucx_cuda_transport=True
            ),
            None,
        ),
        (
            EngineBuild(
                "nixl", NIXL_META, "12.8", nixl_module="nixl_cu12", vram_mem_type=True, ucx_cuda_transport=True
            ),
            None,
        ),
        (EngineBuild("nixl", NIXL_META, "13.0", nixl_module="nixl_cu12", vram_mem_type=True), "built for CUDA 12"),
        (EngineBuild("nixl", {}, "13.0", vram_mem_type=False), "no VRAM_SEG"),
        (EngineBuild("nixl", NIXL_META, "13.0", nixl_module="nixl_cu13", ucx_cuda_transport=False), "libuct_cuda"),
        (EngineBuild("nixl", {}, "13.0"), None),  # nothing known: never a reason to refuse
    ],
)
def test_gpu_memory_decision_table(build: EngineBuild, expect: str | None) -> None:
    problem = gpu_memory_problem(build)
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem
        assert "pip" in problem or "torch" in problem  # always says how to fix it


def test_gpu_memory_decision_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown transfer backend"):
        gpu_memory_problem(EngineBuild("rdma-magic"))


def test_elf_needed_reads_a_real_binary() -> None:
    binary = Path(os.path.realpath(sys.executable))
    readelf = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=False)
    if readelf.returncode != 0:
        pytest.skip("readelf (binutils) is not installed")
    expected = [line.split("[")[1].rstrip("]") for line in readelf.stdout.splitlines() if "(NEEDED)" in line]
    assert elf_needed(binary) == expected and expected  # the same list, in order, as binutils reads it
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf_needed(REPO / "pyproject.toml")


def test_mooncake_cpu_wheel_refuses_a_cuda_pool_and_keeps_cpu_pools() -> None:
    pytest.importorskip("mooncake.engine")
    from transfer.backends.mooncake import MooncakeBackend

    build = probe_mooncake()
    if MOONCAKE_CPU not in build.distributions or build.cudart_major != 0:
        pytest.skip("the installed Mooncake is not the CPU wheel")
    buf = torch.zeros(4, 256, dtype=torch.uint8)
    regions = [MemoryRegion(buf.data_ptr(), 256, 4)]
    backend = MooncakeBackend(BackendSettings())
    try:
        with pytest.raises(GpuMemoryUnsupported) as err:
            backend.register(regions, torch.device("cuda", 0))
        assert isinstance(err.value, TransferError)
        msg = str(err.value)
        assert "cannot register a CUDA KV pool" in msg and MOONCAKE_CPU in msg
        backend.register(regions, torch.device("cpu"))  # refused before anything was registered
    finally:
        backend.close()


def test_nixl_probe_of_the_installed_build() -> None:
    pytest.importorskip("nixl")
    from transfer.backends.nixl_agent import UCX, make_agent

    agent = make_agent("pdserve-probe-test", 10_000)
    build = probe_nixl(list(agent.get_backend_mem_types(UCX)))
    # the PyPI wheels (cu12 and cu13 alike) carry UCX's CUDA transport and list VRAM for it
    assert build.nixl_module in ("nixl_cu12", "nixl_cu13")
    assert build.vram_mem_type is True and build.ucx_cuda_transport is True
    assert gpu_memory_problem(build) is None


# --- wheel trimming (scripts/trim_wheels.py) ----------------------------------------------------------------


def test_trim_wheel_drops_entries_and_rewrites_record(tmp_path: Path) -> None:
    src = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": b"x = 1\n", "demo/big/blob.bin": b"\0" * 1000, "demo-1.0.dist-info/METADATA": b"M"}
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo-1.0.dist-info/RECORD", "stale\n")
    out = trim_wheels.trim_wheel(src, tmp_path / "out", drop=["demo/big/*"], keep=[])
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["demo-1.0.dist-info/METADATA", "demo-1.0.dist-info/RECORD", "demo/__init__.py"]
        record = z.read("demo-1.0.dist-info/RECORD").decode().splitlines()
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"x = 1\n").digest()).rstrip(b"=").decode()
    assert f"demo/__init__.py,sha256={digest},6" in record
    assert "demo-1.0.dist-info/RECORD,," in record and not any("blob" in line for line in record)


def test_include_closure_follows_flashinfers_search_path() -> None:
    d = trim_wheels.FI_DATA
    tree = {
        f"{d}csrc/batch_decode.cu": b'#include "local.cuh"\n#include <flashinfer/x.cuh>\n#include <cuda_runtime.h>\n',
        f"{d}csrc/local.cuh": b"",
        f"{d}include/flashinfer/x.cuh": b"#if 0\n#include <cute/tensor.hpp>\n#endif\n",
        f"{d}cutlass/include/cute/tensor.hpp": b"",
        f"{d}cutlass/include/cute/unused.hpp": b"",
    }
    reached, unresolved = trim_wheels.include_closure([f"{d}csrc/batch_decode.cu"], tree.__getitem__, set(tree))
    assert reached == set(tree) - {f"{d}cutlass/include/cute/unused.hpp"}  # every #if branch is followed
    assert unresolved == {"cuda_runtime.h"}


# --- the device check ---------------------------------------------------------------------------------------


def test_device_check_runs_on_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run scripts/device_check.sh itself")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PDSERVE_DEVICE_SITE=str(tmp_path / "site"))
    run = subprocess.run(
        ["bash", str(REPO / "scripts/device_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "import torch: ok" in run.stdout
    assert "SKIP backend_logits: no CUDA" in run.stdout
    assert "gpu_check: 0 passed, 0 failed" in run.stdout
    assert (tmp_path / "device_check.log").read_text() == run.stdout  # everything is tee'd to $OUT
