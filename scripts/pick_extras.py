"""Which pdserve extras scripts/setup.sh installs, from the CUDA version torch was built for.

  python scripts/pick_extras.py [CUDA_VERSION]   prints the extras (e.g. dev,mooncake-cuda13,nixl,flashinfer);
                                                 any warning goes to stderr. Without an argument it asks the
                                                 local torch (`torch.version.cuda`), and when torch is a CPU
                                                 build but `nvidia-smi -L` lists a GPU, it says so and stays CPU.

Why per CUDA major: Mooncake publishes one wheel per CUDA major (`mooncake-transfer-engine` is built for
CUDA 12, `mooncake-transfer-engine-cuda13` for 13, `-non-cuda` for none), and its engine links that
major's libcudart. NIXL needs no choice: the `nixl` package is a meta package that depends on both
`nixl-cu12` and `nixl-cu13` and imports the one matching torch's CUDA at run time (nixl_meta_utils), so
the `nixl` extra is the same everywhere. FlashInfer's wheel is CUDA-major independent (it JIT-compiles).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

CPU_EXTRAS = ("dev", "mooncake", "nixl")
CUDA_MAJORS = {12: "mooncake-cuda12", 13: "mooncake-cuda13"}


def pick_extras(cuda_version: str | None) -> tuple[list[str], str]:
    """(extras, warning) for a torch built for `cuda_version` ("12.4", "13.0"; None: a CPU build)."""
    if not cuda_version:
        return list(CPU_EXTRAS), ""
    try:
        major = int(cuda_version.split(".")[0])
    except ValueError:
        major = -1
    if major not in CUDA_MAJORS:
        return list(CPU_EXTRAS), (
            f"torch is built for CUDA {cuda_version}: Mooncake, NIXL and FlashInfer publish GPU wheels for CUDA 12 "
            "and 13 only, so the CPU set is installed (its Mooncake, mooncake-transfer-engine-non-cuda, cannot "
            "register GPU memory, NIXL's meta package finds no build for this CUDA, and attention runs on the "
            "torch backend). Install a CUDA 12 or 13 build of torch into the venv and run setup again."
        )
    return ["dev", CUDA_MAJORS[major], "nixl", "flashinfer"], ""


def _local_cuda_version() -> tuple[str | None, str]:
    try:
        import torch
    except ImportError:
        return None, ""
    version = torch.version.cuda
    if version is None and shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).returncode == 0
        if gpu:
            return None, (
                f"this machine has an NVIDIA GPU but torch {torch.__version__} is a CPU build; installing the CPU "
                "extras. Install a CUDA build of torch into the venv and run setup again to get the GPU wheels."
            )
    return version, ""


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        version, note = (argv[1] or None), ""
    else:
        version, note = _local_cuda_version()
    extras, warning = pick_extras(version)
    for line in (note, warning):
        if line:
            print(f"[setup] warning: {line}", file=sys.stderr)
    print(",".join(extras))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
