#!/usr/bin/env bash
# The wheelhouse a lent GPU machine needs to run this project, built here (it has no network; this machine
# reaches PyPI). Its image ('cuda', .library/device/KINDS.md) runs Python 3.12 with torch 2.11, transformers
# 5.17, peft, accelerate, tensorboard, sentencepiece, pyarrow, safetensors, numpy, pandas and the rest of
# that list; it lacks the packages below. The device tool carries at most 64 MiB with the working tree, so the
# wheels are only those it lacks, for that Python and platform, without their dependencies (which are there).
#
#   bash tools/gpu_wheels.sh [DIR]      default DIR: wheelhouse/ (git-ignored); prints the total size
#
# On the GPU machine:
#   python3 -m pip install --no-index --find-links wheelhouse --no-build-isolation -e .
# pip resolves every dependency against what is installed plus these wheels: a package missing from both
# fails the install with its name, which is the cue to add it here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheelhouse}
LIMIT_MIB=56 # of the 64 MiB a call may carry: the rest is the working tree (about 3.5 MiB)
PYTHON_VERSION=3.12
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_17_x86_64 --platform linux_x86_64)

# What the image lacks, pinned to the versions verified together on CPU here (pyproject.toml's comment).
# deepspeed's own dependencies it lacks: hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection).
# datasets': dill, multiprocess. Ours: zstandard.
BINARY=(
    bitsandbytes==0.50.2
    datasets==5.2.0
    hjson
    "pydantic>=2,<3"
    pydantic-core
    annotated-types
    typing-inspection
    dill
    multiprocess
    zstandard
)

fail() {
    echo "gpu_wheels: $*" >&2
    exit 1
}
command -v pip >/dev/null || fail "pip not found: activate the project's venv (make setup)"
rm -rf "$OUT.new"
mkdir -p "$OUT.new"

# pydantic-core must match pydantic's pin: resolve the pair together (both are binary for the platform).
pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" "${PLATFORMS[@]}" \
    -d "$OUT.new" "${BINARY[@]}" || fail "pip download failed (the registry, or a version no longer there)"
core=$(python - "$OUT.new" <<'PY'
import json, sys, zipfile, pathlib
d = pathlib.Path(sys.argv[1])
wheel = next(d.glob("pydantic-2*.whl"))
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: pydantic-core"):
            print(line.split(None, 1)[1].split(";")[0].replace(" ", "").replace("(", "").replace(")", ""))
            break
PY
)
[[ -n $core ]] || fail "cannot read pydantic's pydantic-core pin"
rm -f "$OUT.new"/pydantic_core-*.whl
pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" "${PLATFORMS[@]}" \
    -d "$OUT.new" "$core" || fail "pip download $core failed"

# deepspeed ships only an sdist: a pure-python wheel, its ops JIT-built on the GPU machine (nvcc is there).
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w "$OUT.new" "deepspeed==0.19.8" ||
    fail "building the deepspeed wheel failed"

size=$(du -sm "$OUT.new" | cut -f1)
((size <= LIMIT_MIB)) || fail "the wheelhouse is $size MiB, over $LIMIT_MIB: the call could not carry it"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
ls -1 "$OUT"
echo "gpu_wheels: $OUT: $(find "$OUT" -name '*.whl' | wc -l) wheels, $size MiB (carry it: run(carry=[\"$OUT\"]))"
