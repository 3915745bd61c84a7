"""Can the installed transfer-engine build register GPU memory? Asked before a CUDA KV pool is registered.

Without this check a CPU-only build fails late and obscurely: Mooncake's non-CUDA wheel registers a device
pointer as if it were host memory (the first write then reads garbage or faults), and a NIXL whose UCX has no
CUDA transport fails inside UCX. The decision (`gpu_memory_problem`) is a pure function of probed facts, so
its table is tested on CPU; `probe_mooncake` / `probe_nixl` gather the facts from the installed packages:

- Mooncake ships one distribution per build, all installing the same `mooncake` package:
  `mooncake-transfer-engine-non-cuda` (CPU), `mooncake-transfer-engine` (CUDA 12) and
  `mooncake-transfer-engine-cuda13`. The reliable fact is what the loaded `mooncake/engine.so` links: the
  CUDA builds have `libcudart.so.12`/`.13` in DT_NEEDED, the CPU build no libcudart at all (0.3.13/0.3.14).
  The distribution names are only a fallback (two of them installed overwrite each other's files).
- NIXL's PyPI `nixl` is a meta package that imports `nixl_cu12` or `nixl_cu13` by torch's CUDA major; both
  bundle UCX with its CUDA transport (`nixl_cuNN.libs/ucx/libuct_cuda.so*`), and the UCX plugin lists
  `VRAM_SEG` among its memory types. A source build without CUDA lacks the transport or VRAM_SEG.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transfer.backends.base import TransferError

MOONCAKE_CPU = "mooncake-transfer-engine-non-cuda"
MOONCAKE_BY_CUDA = {12: "mooncake-transfer-engine", 13: "mooncake-transfer-engine-cuda13"}
NIXL_DISTS = ("nixl", "nixl-cu12", "nixl-cu13")


class GpuMemoryUnsupported(TransferError):
    """The installed engine build cannot register GPU memory; the message names the build and the fix."""


@dataclass(frozen=True)
class EngineBuild:
    """What was found about one engine's installed build. None: could not be told (never a reason to refuse)."""

    backend: str  # "mooncake" or "nixl"
    distributions: dict[str, str] = field(default_factory=dict)  # installed distribution -> version
    torch_cuda: str | None = None  # torch.version.cuda
    # mooncake: the libcudart major engine.so links (0: links none), None when engine.so could not be read
    cudart_major: int | None = None
    # nixl: the build module the meta package loaded ("nixl_cu13"), whether UCX lists VRAM_SEG, whether the
    # UCX CUDA transport library is in that build
    nixl_module: str | None = None
    vram_mem_type: bool | None = None
    ucx_cuda_transport: bool | None = None


def _major(version: str | None) -> int | None:
    try:
        return int(version.split(".")[0]) if version else None
    except ValueError:
        return None


def _installed(build: EngineBuild) -> str:
    found = [f"{name} {version}" for name, version in sorted(build.distributions.items())]
    return ", ".join(found) or "no distribution of it (a source build?)"


def _mooncake_fix(torch_major: int | None) -> str:
    target = MOONCAKE_BY_CUDA.get(torch_major or 0)
    remove = " ".join([MOONCAKE_CPU, *MOONCAKE_BY_CUDA.values()])
    if torch_major is None:
        return "torch here is a CPU build: install a CUDA 12 or 13 torch, then `bash scripts/setup.sh` picks Mooncake"
    if target is None:
        return (
            f"Mooncake has GPU builds for CUDA 12 and 13 only (torch here: CUDA {torch_major}); install a CUDA 12 "
            "or 13 torch, or use --transfer-backend nixl"
        )
    extra = f"mooncake-cuda{torch_major}"
    return f"fix: pip uninstall -y {remove} && pip install {target}  (or: pip install -e '.[{extra}]')"


def _mooncake_problem(build: EngineBuild) -> str | None:
    torch_major = _major(build.torch_cuda)
    dists = build.distributions
    if build.cudart_major is None:  # engine.so unreadable: go by the distribution names
        if MOONCAKE_CPU in dists and not any(d in dists for d in MOONCAKE_BY_CUDA.values()):
            return f"the installed Mooncake is the CPU-only build ({_installed(build)}); {_mooncake_fix(torch_major)}"
        return None
    if build.cudart_major == 0:
        return (
            f"the installed Mooncake ({_installed(build)}) is built without CUDA (its engine.so links no libcudart) "
            f"and cannot register GPU memory; {_mooncake_fix(torch_major)}"
        )
    if torch_major is not None and build.cudart_major != torch_major:
        return (
            f"the installed Mooncake ({_installed(build)}) is built for CUDA {build.cudart_major} but torch uses "
            f"CUDA {build.torch_cuda}; {_mooncake_fix(torch_major)}"
        )
    return None


def _nixl_problem(build: EngineBuild) -> str | None:
    torch_major = _major(build.torch_cuda)
    fix = "fix: pip install --force-reinstall nixl  (the PyPI meta package brings nixl-cu12 and nixl-cu13)"
    module_major = _major(build.nixl_module.removeprefix("nixl_cu")) if build.nixl_module else None
    if module_major is not None and torch_major is not None and module_major != torch_major:
        return (
            f"NIXL loaded {build.nixl_module} (built for CUDA {module_major}) but torch uses CUDA "
            f"{build.torch_cuda} ({_installed(build)}); {fix}"
        )
    if build.vram_mem_type is False:
        return f"NIXL's UCX plugin lists no VRAM_SEG memory type ({_installed(build)}): a build without CUDA; {fix}"
    if build.ucx_cuda_transport is False:
        return (
            f"NIXL's bundled UCX ({build.nixl_module}) has no CUDA transport (libuct_cuda), so it cannot move GPU "
            f"memory ({_installed(build)}); {fix}"
        )
    return None


def gpu_memory_problem(build: EngineBuild) -> str | None:
    """Why this build cannot register a CUDA pool (a message naming the build and the pip command), or None."""
    if build.backend == "mooncake":
        return _mooncake_problem(build)
    if build.backend == "nixl":
        return _nixl_problem(build)
    raise ValueError(f"unknown transfer backend {build.backend!r}")


# --- probes (impure) ------------------------------------------------------------------------------------


def _distributions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _torch_cuda() -> str | None:
    torch = sys.modules.get("torch")
    return getattr(getattr(torch, "version", None), "cuda", None)


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF file (what the dynamic loader will load for it)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC; sh_link is its string table
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value : end].decode())
    return needed


def _cudart_major(needed: list[str]) -> int:
    for lib in needed:
        m = re.fullmatch(r"libcudart\.so\.(\d+)", lib)
        if m:
            return int(m.group(1))
    return 0


def probe_mooncake() -> EngineBuild:
    cudart: int | None = None
    spec = importlib.util.find_spec("mooncake.engine")
    if spec is not None and spec.origin:
        try:
            cudart = _cudart_major(elf_needed(Path(spec.origin)))
        except (OSError, ValueError, struct.error, IndexError):
            cudart = None
    dists = _distributions((MOONCAKE_CPU, *MOONCAKE_BY_CUDA.values()))
    return EngineBuild("mooncake", dists, _torch_cuda(), cudart_major=cudart)


def probe_nixl(ucx_mem_types: list[str] | None) -> EngineBuild:
    """`ucx_mem_types`: what the agent's UCX backend reports (`get_backend_mem_types("UCX")`)."""
    module = transport = None
    api = sys.modules.get("nixl._api")
    if api is not None and api.__name__.startswith("nixl_cu"):
        module = api.__name__.split(".")[0]
        libs = Path(api.__file__).resolve().parent.parent / f"{module}.libs" / "ucx"
        transport = any(libs.glob("libuct_cuda.so*")) if libs.is_dir() else None
    vram = None if ucx_mem_types is None else any(t.startswith("VRAM") for t in ucx_mem_types)
    return EngineBuild(
        "nixl", _distributions(NIXL_DISTS), _torch_cuda(), nixl_module=module, vram_mem_type=vram,
        ucx_cuda_transport=transport,
    )  # fmt: skip


def require_gpu_memory(build: EngineBuild) -> None:
    problem = gpu_memory_problem(build)
    if problem:
        raise GpuMemoryUnsupported(f"{build.backend}: cannot register a CUDA KV pool: {problem}")
