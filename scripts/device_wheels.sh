#!/usr/bin/env bash
# Download (here, with internet) every wheel the GPU box lacks for scripts/device_check.sh, into .whl/.
#
# The GPU box: x86-64, Python 3.12, no internet, torch 2.11+cu130 and the usual stack preinstalled (see
# scripts/device_check.sh). Everything carried there in one call (the git working tree plus .whl/) must fit in
# 64 MiB, so the big native wheels are rewritten smaller by scripts/trim_wheels.py:
#   flashinfer-python 0.7.4  101 MB -> ~13 MiB tar.xz: Python modules + the csrc/CUTLASS/CCCL headers of the
#                                      batch prefill (fa2, fa3) and decode JIT, checked here (verify step)
#   nixl-cu13 1.5.1           56 MiB -> ~13 MiB: without nixl_ep (3 x 31 MB) and the non-UCX plugins
#   mooncake-transfer-engine-cuda13  47 MiB -> ~9 MiB: the transfer engine only (no store, ep, pg, binaries)
# plus pyzmq, apache-tvm-ffi and the nixl meta package as they are. Idempotent: what is already in .whl/ (or in
# the download cache, .cache/device-wheels/) is not fetched again. Fails when .whl/ passes 60 MiB.
# Then: the device tool's run with carry [".whl"] and command `bash scripts/device_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=.whl
CACHE=.cache/device-wheels  # full wheels, kept out of .whl/ (never carried)
LIMIT_MIB=60
say() { printf '[device-wheels] %s\n' "$*" >&2; }
mkdir -p "$OUT" "$CACHE"

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform any)

# fetch DIR SPEC: download SPEC for the GPU box into DIR unless a wheel of that name is there already
fetch() {
    local dir=$1 spec=$2 name
    name=$(printf '%s' "${spec%%[=<>]*}" | tr '-' '_')
    if compgen -G "$dir/${name}-*.whl" >/dev/null; then
        return
    fi
    say "downloading $spec"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORM[@]}" -d "$dir" "$spec"
}

# As they are (small).
fetch "$OUT" "pyzmq>=25"
fetch "$OUT" "apache-tvm-ffi>=0.1.11,<0.2"  # flashinfer 0.7.4's requirement
fetch "$OUT" "nixl==1.5.1"                  # the meta package: `import nixl` picks nixl_cu13 by torch's CUDA

# Trimmed: full wheel into the cache, the trimmed one into .whl/.
fetch "$CACHE" "nixl-cu13==1.5.1"
if ! compgen -G "$OUT/nixl_cu13-*.whl" >/dev/null; then
    "$PY" scripts/trim_wheels.py wheel "$CACHE"/nixl_cu13-*.whl "$OUT" \
        --drop 'nixl_ep_cu13/*' --drop 'nixl_cu13.scripts/*' --drop 'nixl_cu13-*.data/*' \
        --drop '*/libplugin_[!U]*.so' --drop '*/ucx/libucx_perftest*' --drop '*/libtelemetry_exporter_*' \
        --keep 'nixl_cu13.libs/ucx/*' --keep '*/libplugin_UCX.so' --keep '*/libtrace_backend_*' \
        --keep 'nixl_cu13.libs/libnuma-*' --keep 'nixl_cu13.libs/libcurl-*' --keep 'nixl_cu13.libs/libzstd-*'
    # libnuma/libcurl (with libibverbs/libmlx5, kept anyway) stand in for the system libraries Mooncake's
    # engine links when the box has none: device_check.sh links them under their sonames if ldconfig lacks them.
fi

fetch "$CACHE" "mooncake-transfer-engine-cuda13==0.3.14"
if ! compgen -G "$OUT/mooncake_transfer_engine_cuda13-*.whl" >/dev/null; then
    "$PY" scripts/trim_wheels.py wheel "$CACHE"/mooncake_transfer_engine_cuda13-*.whl "$OUT" \
        --drop 'mooncake/_store*' --drop 'mooncake/_ep*' --drop 'mooncake/mooncake_client' \
        --drop 'mooncake/mooncake_master' --drop 'mooncake/transfer_engine_bench' --drop 'mooncake/libmooncake_pg*' \
        --drop 'mooncake/libmooncake_ep*' --drop 'mooncake/store/*' --drop 'mooncake/_pg_jit/*' \
        --drop 'mooncake/mooncake_ep_jit/*' --drop 'mooncake/reshard/*'
fi

fetch "$CACHE" "flashinfer-python==0.7.4"
FI_WHEEL=$(ls "$CACHE"/flashinfer_python-0.7.4-*.whl)
FI_TAR="$OUT/flashinfer_python-0.7.4-trimmed.tar.xz"
if [ ! -f "$FI_TAR" ]; then
    say "trimming FlashInfer (xz, about a minute)"
    "$PY" scripts/trim_wheels.py flashinfer "$FI_WHEEL" "$FI_TAR"
fi

# Verify the FlashInfer trim with the local torch: import it and generate the JIT specs the engine uses.
# apache-tvm-ffi and nvidia-ml-py for *this* Python go to a scratch folder, never into .whl/.
VERIFY=.cache/device-wheels/verify
if [ ! -f "$VERIFY/ok-$(sha256sum "$FI_TAR" | cut -c1-16)" ]; then
    rm -rf "$VERIFY" && mkdir -p "$VERIFY/site" "$VERIFY/tree"
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$VERIFY/site" \
        "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py
    tar -xJf "$FI_TAR" -C "$VERIFY/tree"
    PYTHONPATH="$VERIFY/site" "$PY" scripts/trim_wheels.py verify-flashinfer "$VERIFY/tree" "$FI_WHEEL"
    rm -rf "$VERIFY/tree"
    touch "$VERIFY/ok-$(sha256sum "$FI_TAR" | cut -c1-16)"
fi

ls -l "$OUT" >&2
total=$(du -cb "$OUT"/* | tail -1 | cut -f1)
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
say "total: $OUT/ ${mib} MiB (limit ${LIMIT_MIB} MiB), working tree $(awk -v b="$tree" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    say "FAIL: $OUT/ is over ${LIMIT_MIB} MiB; the device tool carries at most 64 MiB in all. Remove the Mooncake"
    say "wheel first (device_check.sh then prints 'skipped: mooncake (not carried)')."
    exit 1
fi
