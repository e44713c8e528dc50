#!/usr/bin/env bash
# LLaMA-Factory in a venv of its own: bench/peers.py's optional third side (bench/peers_llamafactory.py). It
# cannot share the project's .venv: llamafactory 0.9.5 pins transformers <=5.6, datasets <=4.0,
# accelerate <=1.11, peft 0.18 and trl <=0.24, older than ours (transformers 5.23+, datasets 5.2).
#
#   bash tools/llamafactory_venv.sh [DIR]    default DIR: .venv-llamafactory (git-ignored; bench/peers.py
#                                            finds it there, or pass --llamafactory-python DIR/bin/python)
#
# torch: the one DIR already has is kept, else torch==2.13.0 (the CPU wheel on this project's machines). On a
# GPU, first install into DIR the CUDA build of torch that matches the driver, then run this script:
#   python3 -m venv DIR && DIR/bin/pip install torch==<version>    (the CUDA build, from PyTorch's index)
# pip resolves transformers (and the rest) as llamafactory pins them; deepspeed 0.19.8 is ours (llamafactory
# 0.9.5 sets no bound on it), built from its sdist with its ops left to JIT, as in tools/gpu_wheels.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.venv-llamafactory}
PYTHON=${PYTHON:-python3}
LLAMAFACTORY=llamafactory==0.9.5
DEEPSPEED=deepspeed==0.19.8
TORCH_DEFAULT=2.13.0

fail() {
    echo "llamafactory_venv: $*" >&2
    exit 1
}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "$PYTHON is older than 3.11 (llamafactory 0.9.5 needs 3.11+): set PYTHON=python3.11"
[[ -x $DIR/bin/python ]] || "$PYTHON" -m venv "$DIR" || fail "cannot create the venv $DIR"
pip=("$DIR/bin/python" -m pip install -q)
"${pip[@]}" -U pip setuptools wheel || fail "pip install pip setuptools wheel failed"

torch=$("$DIR/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
torch=${torch:-$TORCH_DEFAULT}
# torch pinned in every step: nothing replaces the build installed, and torchvision (llamafactory requires it
# and torchaudio) comes in the version built for it; torchaudio in the newest that accepts it (2.11.1 for 2.13).
"${pip[@]}" "torch==$torch" || fail "pip install torch==$torch failed"
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$DEEPSPEED" "torch==$torch" ||
    fail "pip install $DEEPSPEED failed (its sdist builds against the torch installed)"
"${pip[@]}" "$LLAMAFACTORY" "$DEEPSPEED" "torch==$torch" || fail "pip install $LLAMAFACTORY failed"

# A CPU torch: PyPI's torchvision and torchaudio are CUDA builds (the CPU ones live only on PyTorch's own
# index) and do not load beside it, and transformers imports torchvision whenever it is installed. Both go
# (`pip check` then names them); LLaMA-Factory's one unconditional `import torchaudio` (its multimodal plugin,
# which pt does not use) gets a stand-in from bench/peers_llamafactory.py.
cpu_torch='import sys, torch; sys.exit(torch.version.cuda is not None or torch.version.hip is not None)'
if "$DIR/bin/python" -c "$cpu_torch"; then
    "$DIR/bin/python" -m pip uninstall -q -y torchvision torchaudio
fi

"$DIR/bin/python" - <<'PY' || fail "the venv does not import LLaMA-Factory's trainer"
import sys
from importlib.metadata import version

sys.path.insert(0, "bench")
from peers_llamafactory import stand_in_torchaudio

stand_in_torchaudio()
from llamafactory.train.tuner import run_exp  # noqa: F401  what bench/peers_llamafactory.py runs

names = ("llamafactory", "transformers", "deepspeed", "torch", "accelerate", "datasets", "peft", "trl")
print("llamafactory_venv: " + ", ".join(f"{n} {version(n)}" for n in names))
PY
echo "llamafactory_venv: $DIR ready (bench/peers.py: --llamafactory-python $DIR/bin/python)"
