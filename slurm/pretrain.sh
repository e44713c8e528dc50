#!/usr/bin/env bash
# Continual pretraining under SLURM (launch/pretrain.py). From the repo root:
#   sbatch slurm/pretrain.sh --profile 13b --config my_recipe.yaml
#   sbatch --nodes=16 slurm/pretrain.sh --profile 70b --config my_recipe.yaml --output-dir /scratch/me-llama-70b
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/pretrain.sh --max-steps 20   # CPU-only
# Every argument goes to launch/pretrain.py. Resources are the #SBATCH lines below: edit them, or override any
# on the sbatch command line. The output dir defaults to runs/slurm-<job id>; before the time limit the job
# gets USR2 (--signal), passes it to the ranks, which save a checkpoint and exit; then it requeues itself and
# resumes exactly there. With --no-kill, a node lost mid-job ends only the step, and launch.sh goes on with the
# nodes left or requeues the job (see slurm/launch.sh).
#SBATCH --job-name=mellama-pretrain
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=B:USR2@300
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool directory: find the checkout where sbatch was run.
REPO=${MELLAMA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO/slurm/launch.sh ]]; then
    echo "error: $REPO/slurm/launch.sh not found; run sbatch from the repo root or set MELLAMA_ROOT" >&2
    exit 2
fi
exec bash "$REPO/slurm/launch.sh" launch/pretrain.py "$@"
