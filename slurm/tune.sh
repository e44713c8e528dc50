#!/usr/bin/env bash
# LoRA instruction tuning under SLURM (launch/tune.py). From the repo root:
#   sbatch slurm/tune.sh --profile 13b --base runs/pretrain-13b/final --config my_tune.yaml
#   sbatch --nodes=8 slurm/tune.sh --profile 70b --base /models/me-llama-70b --output-dir /scratch/me-llama-70b-chat
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/tune.sh --max-steps 20   # CPU-only
# Every argument goes to launch/tune.py. Resources are the #SBATCH lines below: edit them, or override any
# on the sbatch command line. The output dir defaults to runs/slurm-<job id>; before the time limit the job
# gets USR2 (--signal), passes it to the ranks, which save a checkpoint and exit; then it requeues itself and
# resumes exactly there. A node lost mid-job: SLURM ends the job and requeues it for as many nodes (no
# --no-kill here, unlike pretrain.sh: tuning data is streamed, so a tuning run cannot go on with fewer ranks).
#SBATCH --job-name=mellama-tune
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool directory: find the checkout where sbatch was run.
REPO=${MELLAMA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO/slurm/launch.sh ]]; then
    echo "error: $REPO/slurm/launch.sh not found; run sbatch from the repo root or set MELLAMA_ROOT" >&2
    exit 2
fi
exec bash "$REPO/slurm/launch.sh" launch/tune.py "$@"
