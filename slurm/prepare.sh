#!/usr/bin/env bash
# Tokenize a recipe's corpora once, as a SLURM array: each task prepares its share of the files
# (`mellama-train prepare --part K/N`), and the task that finds every shard finished writes the manifest.
# From the repo root:
#   sbatch --array=0-15 slurm/prepare.sh my_recipe.yaml /scratch/corpus
#   sbatch --array=0-15 slurm/prepare.sh my_recipe.yaml /scratch/corpus --profile 13b
# Run it again (the same command) after a failure or a time-out: finished shards of unchanged files are kept.
# The output directory must be on a filesystem every node sees.
#SBATCH --job-name=mellama-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 2
}

[[ $# -ge 2 ]] || fail "usage: sbatch --array=0-N slurm/prepare.sh RECIPE OUT_DIR [mellama-train prepare flags]"
recipe=$1
out=$2
shift 2
# sbatch runs a copy of this file from its spool directory: find the checkout where sbatch was run.
REPO=${MELLAMA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
# shellcheck source=slurm/python_env.sh
source "$REPO/slurm/python_env.sh"
task=$((${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0})) # --array=1-16 works as well as 0-15
tasks=${SLURM_ARRAY_TASK_COUNT:-1}
echo "prepare part $task/$tasks of $recipe into $out on $(hostname)"
exec "$python" -m mellama_train prepare "$recipe" --out "$out" --part "$task/$tasks" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
