#!/usr/bin/env bash
# One-shot, idempotent set-up: .venv, torch first, system libraries Mooncake needs, then pdserve.
# Quick when nothing changed (a stamp keyed on pyproject.toml, this script and scripts/pick_extras.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.pdserve-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/pick_extras.py | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

say() { printf '[setup] %s\n' "$*" >&2; }

# Mooncake's wheel links libibverbs and libnuma even when it runs over TCP; the tests check the
# metrics exposition with promtool (Debian's prometheus package).
missing=()
for lib in libibverbs1 libnuma1; do
    dpkg -s "$lib" >/dev/null 2>&1 || missing+=("$lib")
done
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "installing ${missing[*]} (Debian packages)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "warning: ${missing[*]} missing and cannot apt-get install them; run: sudo apt-get install ${missing[*]}"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# torch first: keep whatever torch is there; otherwise a CPU build on CPU-only machines,
# so that no later requirement pulls several GB of CUDA wheels.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "installing torch (CUDA machine)"
        pip install torch
    else
        say "installing torch==2.13.0 (CPU build)"
        pip install torch==2.13.0
    fi
fi

# Extras by torch's CUDA major (scripts/pick_extras.py): dev,mooncake,nixl on CPU builds;
# dev,mooncake-cudaNN,nixl,flashinfer for CUDA 12/13 (anything else: the CPU set, with a warning).
extras=$("$VENV/bin/python" scripts/pick_extras.py)
case ",$extras," in
*,mooncake-cuda1[0-9],*)
    # the CUDA Mooncake engine also links libmlx5 and libcurl
    for lib in ibverbs-providers libcurl4; do
        dpkg -s "$lib" >/dev/null 2>&1 && continue
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$lib" >/dev/null
        else
            say "warning: $lib missing; run: sudo apt-get install $lib"
        fi
    done
    ;;
esac
say "installing pdserve and its dependencies (.[$extras])"
pip install -e ".[$extras]"

# checkov (manifest checks in the tests) pins packaging<24, which the test stack cannot share: own venv.
TOOLS=.venv-tools
if [ ! -x "$TOOLS/bin/checkov" ]; then
    say "installing checkov into $TOOLS"
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip --disable-pip-version-check -q install "checkov==3.3.30"
fi

echo "$want" > "$STAMP"
say "done"
