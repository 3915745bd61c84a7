#!/usr/bin/env bash
# The device check: what runs ON the GPU box (one call, at most ~8 minutes), and also on any CPU machine.
#
# Usage:
#   bash scripts/device_wheels.sh               # here, with internet: fills .whl/ (git-ignored, <= 60 MiB)
#   then the device tool's run with carry [".whl"] and command `bash scripts/device_check.sh`
#   (arguments are passed on to bench/gpu_check.py; the whole output is also in ${OUT:-/tmp}/device_check.log)
#
# On the box (x86-64, Python 3.12, no internet; torch 2.11+cu130, transformers, numpy, msgpack, httpx, uvloop,
# pytest, ninja, nvidia-ml-py, cuda-bindings and nvcc 13 preinstalled) it installs .whl/*.whl into /tmp/site
# without an index, unpacks the trimmed FlashInfer there, and runs bench/gpu_check.py with PYTHONPATH on it.
# Without .whl/ (or with a Python that is not the box's 3.12) it uses what is installed, so on a CPU machine
# it ends with gpu_check's "SKIP <check>: no CUDA" lines and exits 0. Exit status: gpu_check's.
set -uo pipefail
cd "$(dirname "$0")/.."

LOG="${OUT:-/tmp}/device_check.log"
mkdir -p "$(dirname "$LOG")"
SITE=${PDSERVE_DEVICE_SITE:-/tmp/site}

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif python3 -c "import torch" >/dev/null 2>&1; then
        echo python3
    elif [ -x .venv/bin/python ]; then
        echo .venv/bin/python  # a dev checkout: the system python3 has no torch
    else
        echo python3
    fi
}

# Mooncake's CUDA engine links libibverbs, libmlx5, libnuma and libcurl from the system. Where the box has
# none, the copies bundled in the NIXL wheel stand in, linked under their sonames.
stand_in_system_libs() {
    local dir="$SITE/.pdserve-syslibs" pair soname pattern lib
    mkdir -p "$dir"
    for pair in libibverbs.so.1:libibverbs-* libmlx5.so.1:libmlx5-* libnuma.so.1:libnuma-* libcurl.so.4:libcurl-*; do
        soname=${pair%%:*} pattern=${pair#*:}
        ldconfig -p 2>/dev/null | grep -q "^\s*$soname " && continue
        lib=$(ls "$SITE"/nixl_cu13.libs/$pattern 2>/dev/null | head -1)
        if [ -n "$lib" ]; then
            ln -sf "$lib" "$dir/$soname"
            echo "device-check: $soname not on this system; using NIXL's bundled $(basename "$lib")"
        else
            echo "device-check: $soname not on this system and no stand-in carried; Mooncake may not load"
        fi
    done
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

install_carried() {
    local py=$1
    mkdir -p "$SITE"
    echo "device-check: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    if "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl || return 1
    else  # no pip on the box: a wheel is a zip laid out for site-packages
        "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" .whl/*.whl || return 1
    fi
    local t
    for t in .whl/*.tar.xz; do
        [ -e "$t" ] || continue
        echo "device-check: unpacking $(basename "$t") into $SITE"
        rm -rf "$SITE/flashinfer"
        tar -xJf "$t" -C "$SITE" || return 1
    done
    if ! compgen -G ".whl/mooncake_transfer_engine*.whl" >/dev/null; then
        echo "skipped: mooncake (not carried)"
        export PDSERVE_DEVICE_NO_MOONCAKE=1
    fi
    stand_in_system_libs
}

setup_env() {
    local py=$1 tag
    tag=$("$py" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}")')
    if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
        if [ "$tag" = "3.12-x86_64" ]; then
            install_carried "$py" || { echo "FAIL: installing the carried wheels"; return 1; }
            export PYTHONPATH="$SITE:$PWD"
        else
            echo "device-check: .whl/ is built for the GPU box (Python 3.12, x86-64) and this is $tag;" \
                "using what is installed"
            export PYTHONPATH="$PWD"
        fi
    else
        echo "device-check: no .whl/ (run scripts/device_wheels.sh where there is internet); using what is installed"
        export PYTHONPATH="$PWD"
    fi
    export PYTHONUNBUFFERED=1
    export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/pdserve-flashinfer}"  # JIT cache
    export MAX_JOBS="${MAX_JOBS:-16}"
    if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        export CUDA_HOME
    fi
}

report_env() {
    local py=$1
    echo "device-check: $(date -u +%FT%TZ) on $(hostname), python $py"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | sed 's/^/device-check: /'
    command -v nvcc >/dev/null 2>&1 && echo "device-check: $(nvcc --version | tail -1)"
    "$py" - <<'EOF'
import importlib, importlib.metadata as md
for mod, dist in (("torch", "torch"), ("zmq", "pyzmq"), ("tvm_ffi", "apache-tvm-ffi"), ("flashinfer", "flashinfer-python"),
                  ("nixl._api", "nixl-cu13"), ("mooncake.engine", "mooncake-transfer-engine-cuda13")):
    try:
        m = importlib.import_module(mod)
        extra = f" cuda {m.version.cuda}, available {m.cuda.is_available()}" if mod == "torch" else ""
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = getattr(m, "__version__", "?")
        print(f"device-check: import {mod}: ok ({version}{extra}) from {getattr(m, '__file__', '?')}")
    except Exception as e:  # a report line, not a verdict: gpu_check says which checks need it
        print(f"device-check: import {mod}: {type(e).__name__}: {e}")
EOF
}

main() {
    local py rc
    py=$(pick_python)
    setup_env "$py" || return 1
    report_env "$py"
    echo "device-check: running $py bench/gpu_check.py $*"
    "$py" bench/gpu_check.py "$@"
    rc=$?
    echo "device-check: bench/gpu_check.py exited $rc"
    return $rc
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
