#!/usr/bin/env bash
# Run on the lent GPU machine, from the repository root (see README.md beside this file).
#
#   bash benchmarks/gpu/run.sh stash             # every call but the last: keep the carried part(s) in /tmp
#   bash benchmarks/gpu/run.sh [BUDGET_S] [STEPS]  # last call: join, install, run check_cuda.py
#                                                # BUDGET_S default 480; STEPS e.g. kernel,speed (default all)
#   DRY=1 bash benchmarks/gpu/run.sh 300         # here, on the CPU: joins, test-installs, check_cuda.py --dry-run
#   CAPS=tests=60,speed=200 bash benchmarks/gpu/run.sh 480   # other per-step limits (check_cuda.py --caps)
#
# A second run on the same (still warm) machine skips the join and the install, so it needs no carry.
# Everything it prints also goes to $OUT/log.txt; check_cuda.py writes $OUT/results.json and
# $OUT/summary.md as it goes, so a run cut short still leaves what it measured.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/../.."
REPO=$(pwd)
STASH=/tmp/mozgach_parts
SITE=/tmp/site
OUT=${OUT:-/tmp/mozgach_gpu_out}
mkdir -p "$STASH" "$OUT"

stash() {
    cp -f .whl/parts/bundle.part-* .whl/parts/MANIFEST "$STASH"/ 2>/dev/null
    echo "stashed in $STASH:"; ls -l "$STASH" | grep -v '^total'
}

if [ "${1:-}" = "stash" ]; then
    stash
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      ldd --version | head -1; python3 -V; df -h /tmp | tail -1; nproc; free -g | head -2
      python3 -m pip list 2>/dev/null | grep -i -E '^(nvidia|torch |transformers|numpy|pytest)'
    } 2>&1 | tee "$OUT/env_stash.txt"
    exit 0
fi

BUDGET=${1:-480}
STEPS=${2:-}
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== run.sh budget ${BUDGET}s, steps ${STEPS:-all}, $(date -u +%FT%TZ), DRY=${DRY:-0}"
stash >/dev/null

PY=python3
[ -n "${DRY:-}" ] && PY="$REPO/.venv/bin/python"
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
if [ -n "${DRY:-}" ]; then  # here: prove the wheels install for the device's Python, then use the venv
    PIP+=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64)
    SITE=$(mktemp -d)
fi

install_bundle() {  # join the parts, check them against MANIFEST, pip install the wheels to $SITE
    [ -f "$STASH/MANIFEST" ] || { echo "!! no MANIFEST in $STASH: carry .whl/parts/MANIFEST"; return 3; }
    (cd "$STASH" && sha256sum -c --quiet --ignore-missing MANIFEST) || { echo "!! a part does not match"; return 3; }
    for p in $(awk '{print $2}' "$STASH/MANIFEST" | grep part-); do
        [ -f "$STASH/$p" ] || { echo "!! $p missing: make the stash call(s) again, back to back with this one"; return 3; }
    done
    cat "$STASH"/bundle.part-* > /tmp/bundle.tar
    (cd /tmp && grep ' bundle.tar$' "$STASH/MANIFEST" | sha256sum -c --quiet) || { echo "!! bundle.tar corrupt"; return 3; }
    rm -rf /tmp/bundle && mkdir -p /tmp/bundle && tar -C /tmp/bundle -xf /tmp/bundle.tar && rm -f /tmp/bundle.tar
    echo "== install to $SITE"
    timeout 150 "${PIP[@]}" --target "$SITE" /tmp/bundle/wheels/*.whl || { echo "!! pip install failed"; return 4; }
    cp "$STASH/MANIFEST" "$SITE/.mozgach_manifest"
    ls "$SITE"
}

if [ -z "${DRY:-}" ] && [ -f "$SITE/mlx/lib/libmlx.so" ] && cmp -s "$SITE/.mozgach_manifest" "$STASH/MANIFEST"; then
    echo "== $SITE already holds this bundle: no join, no install"
else
    install_bundle || exit $?
fi

cuda_headers_from_bundle() {  # NVRTC needs cuda_runtime.h & co; the bundle has nvidia-cuda-runtime 13.0
    [ -d /tmp/cudart/nvidia/cu13/include ] ||
        timeout 60 "${PIP[@]}" --target /tmp/cudart /tmp/bundle/extra/*.whl || return 1
    export CUDA_HOME=/tmp/cudart/nvidia/cu13
}

if [ -n "${DRY:-}" ]; then
    rm -rf "$SITE"; export PYTHONPATH="$REPO"
else
    # libmlx.so's RPATH points at nvidia/* beside itself (/tmp/site/nvidia: absent); the device's
    # CUDA libraries are in its own site-packages.
    NV=$(python3 -c "
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(':'.join(sorted({d for r in roots for d in glob.glob(os.path.join(r, 'nvidia', '*', 'lib'))})))")
    export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # MLX compiles its kernels at run time (NVRTC) against CUDA_HOME/include.
    if [ -z "${CUDA_HOME:-}" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
        unset CUDA_HOME
        for d in ${NV//:/ } /usr/local/cuda/lib; do
            [ -f "$(dirname "$d")/include/cuda_runtime.h" ] && export CUDA_HOME="$(dirname "$d")" && break
        done
        [ -n "${CUDA_HOME:-}" ] || { echo "no CUDA runtime headers here: the bundle's"; cuda_headers_from_bundle; }
    fi
    export PYTHONPATH="$SITE:$REPO"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; echo "CUDA_HOME=${CUDA_HOME:-}"
fi

echo "== versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
ldd --version 2>&1 | head -1
"$PY" -m pip show nvidia-cublas nvidia-cudnn-cu13 nvidia-nccl-cu13 nvidia-cufft nvidia-cusolver \
    nvidia-cuda-nvrtc nvidia-cuda-runtime transformers numpy 2>/dev/null | grep -E '^(Name|Version):' | paste - -
timeout 60 "$PY" -c "import mlx.core as mx; print(mx.__version__, mx.default_device(), mx.cuda.is_available() if hasattr(mx,'cuda') else '')"
FIRST_OP="import mlx.core as mx; a = mx.ones((4,)) + 1; mx.eval(a); print('first op ok:', a.tolist())"
if ! timeout 60 "$PY" -c "$FIRST_OP" && [ -z "${DRY:-}" ] && [ "${CUDA_HOME:-}" != /tmp/cudart/nvidia/cu13 ]; then
    echo "first op failed with CUDA_HOME=${CUDA_HOME:-}: again with the bundle's CUDA headers"
    cuda_headers_from_bundle && timeout 60 "$PY" -c "$FIRST_OP"
fi

REST=$(( BUDGET - ($(date +%s) - T0) - 10 ))
echo "== check_cuda.py with ${REST}s of the budget left"
[ "$REST" -gt 30 ] || { echo "!! no time left for check_cuda.py"; exit 5; }
ARGS=(--out "$OUT" --budget $((REST - 15)))
[ -n "$STEPS" ] && ARGS+=(--steps "$STEPS")
[ -n "${CAPS:-}" ] && ARGS+=(--caps "$CAPS")  # e.g. CAPS=tests=60,speed=200
[ -n "${DRY:-}" ] && ARGS+=(--dry-run)
PYTHONUNBUFFERED=1 timeout -k 5 "$REST" "$PY" benchmarks/gpu/check_cuda.py "${ARGS[@]}"
rc=$?
echo "== run.sh done: check_cuda.py exit $rc after $(( $(date +%s) - T0 ))s; files in $OUT:"
ls -l "$OUT" | grep -v '^total'
exit $rc
