#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to PyPI): download the wheels the lent GPU machine
# lacks (it has no network and no MLX) and cut them into parts small enough to travel in a
# device call's `carry` (64 MiB per call, the tracked tree included). Prints the calls to make.
#
#   bash benchmarks/gpu/prepare.sh            # -> .whl/bundle.tar, .whl/parts/bundle.part-aa ..., MANIFEST
#
# Contents of the bundle (see README.md beside this file):
#   wheels/  mlx, mlx-cuda-13 (libmlx.so + CCCL headers), mlx-lm, pytest-timeout  -> pip install --target
#   extra/   nvidia-cuda-runtime 13.0.x: CUDA runtime headers (cuda_runtime.h, cuda_fp16.h, ...) that
#            MLX's run-time compiler (NVRTC) needs; unpacked only if the device has none (run.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
PART_MIB=${PART_MIB:-45}
MLX_V=$("$PY" -c "import importlib.metadata as m; print(m.version('mlx'))")
MLX_LM_V=$("$PY" -c "import importlib.metadata as m; print(m.version('mlx-lm'))")
# cuda-runtime 13.0 matches the CUDA 13.0 NVRTC that torch's cu130 wheels pin; newer headers
# than the NVRTC that compiles them may not parse.
CUDART_SPEC=${CUDART_SPEC:-"nvidia-cuda-runtime>=13.0,<13.1"}

TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 39 38 35 34 31 28 27 17; do TAGS+=(--platform "manylinux_2_${n}_x86_64"); done
TAGS+=(--platform manylinux2014_x86_64 --platform any)

rm -rf .whl
mkdir -p .whl/bundle/wheels .whl/bundle/extra .whl/parts
"$PY" -m pip download -q --no-deps "${TAGS[@]}" -d .whl/bundle/wheels \
    "mlx==$MLX_V" "mlx-cuda-13==$MLX_V" "mlx-lm==$MLX_LM_V" pytest-timeout
"$PY" -m pip download -q --no-deps "${TAGS[@]}" -d .whl/bundle/extra "$CUDART_SPEC"

echo "== wheels (mlx $MLX_V, mlx-lm $MLX_LM_V)"
ls -l .whl/bundle/wheels .whl/bundle/extra | grep -v '^total'
echo "== what they require (the device must already have these; checked by run.sh)"
for w in .whl/bundle/wheels/*.whl; do
    echo "-- $(basename "$w")"
    unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/   /' || true
done

# One tar, split into parts; run.sh joins the parts and checks both hashes.
tar -C .whl/bundle -cf .whl/bundle.tar wheels extra
split -b "${PART_MIB}M" -a 2 .whl/bundle.tar .whl/parts/bundle.part-
(cd .whl/parts && sha256sum bundle.part-* > MANIFEST && sha256sum ../bundle.tar | sed 's| \.\./| |' >> MANIFEST)
rm -rf .whl/bundle

echo "== parts"
ls -l .whl/parts | grep -v '^total'
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
echo "tracked + untracked-not-ignored tree: $((tree_bytes / 1048576)) MiB (travels with every call)"

echo
echo "== device calls: tool \`run\`, back to back (the machine keeps /tmp only while it stays warm)"
mapfile -t PARTS < <(cd .whl/parts && ls bundle.part-*)
last=$((${#PARTS[@]} - 1))
for i in "${!PARTS[@]}"; do
    p=".whl/parts/${PARTS[$i]}"
    mib=$(( ( $(stat -c %s "$p") + tree_bytes ) / 1048576 ))
    if [ "$i" -lt "$last" ]; then
        cmd="bash benchmarks/gpu/run.sh stash"
    else
        cmd="bash benchmarks/gpu/run.sh 480"
    fi
    echo "call $((i + 1)): command: $cmd"
    echo "        carry: [\"$p\", \".whl/parts/MANIFEST\"]      (~$mib MiB with the tree)"
    if [ "$mib" -ge 64 ]; then
        echo "        !! over 64 MiB: rerun with a smaller PART_MIB" >&2
        exit 1
    fi
done
echo "then: read results under the call's files_at (summary.md, results.json, log.txt)."
