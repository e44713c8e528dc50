#!/usr/bin/env bash
# Sourced by slurm/launch.sh and slurm/prepare.sh (after `cd` to the checkout, with `fail` defined): activates
# MELLAMA_VENV (default <checkout>/.venv) if it exists, else uses the python on PATH, and sets $python.
venv=${MELLAMA_VENV:-$PWD/.venv}
if [[ -f $venv/bin/activate ]]; then
    set +u # activate scripts read unset variables
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    set -u
elif [[ -n ${MELLAMA_VENV:-} ]]; then
    fail "MELLAMA_VENV=$MELLAMA_VENV has no bin/activate; point it at a virtualenv, or unset it to use PATH"
fi
python=$(command -v python || command -v python3) || fail "no python on PATH; run make setup or set MELLAMA_VENV=/path/to/venv"
