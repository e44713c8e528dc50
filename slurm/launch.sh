#!/usr/bin/env bash
# The body of slurm/pretrain.sh and slurm/tune.sh (they only add #SBATCH lines and the entry point):
#   bash slurm/launch.sh ENTRY_POINT [ARGS...]      inside a SLURM batch job; ARGS go to the entry point as given
#
# Launch choice: one srun job step with one task per training process; no torchrun, no DeepSpeed launcher.
# Each task sets RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, and MASTER_ADDR/PORT
# come from here; the trainer's engine reads exactly those (engine.init_distributed). Why: SLURM then delivers
# signals straight to every rank, accounts and limits each task, and needs no ssh between nodes; torchrun's
# agent and DeepSpeed's pdsh/ssh launcher add a process layer between SLURM and the ranks that signals,
# accounting and cleanup have to get through.
#
# After the step: the warning signal or a hang -> requeue; a node lost -> a new step on the nodes left when the
# run can go on with fewer ranks, else a requeue for as many nodes as before (each section below says why).
#
# Environment it reads: MELLAMA_ROOT (the checkout; default the directory sbatch ran in), MELLAMA_VENV (default
# <checkout>/.venv, used if it exists, else the python on PATH). Exit 2: a setup error, one line naming the fix.
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || fail "usage: bash slurm/launch.sh ENTRY_POINT [ARGS...] (from slurm/pretrain.sh or slurm/tune.sh)"
ENTRY=$1
shift
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a SLURM job; submit it: sbatch slurm/$(basename "$ENTRY" .py).sh ..."

# sbatch runs a copy of the batch script from its spool directory, so the checkout is where sbatch was run.
REPO=${MELLAMA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
[[ -f $ENTRY ]] || fail "$REPO/$ENTRY not found; run sbatch from the repo root or set MELLAMA_ROOT=/path/to/checkout"

# --- layout: one process per GPU, or per task on a CPU-only cluster (--gpus-per-node=0) ------------------
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus_per_node=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
gpus_per_node=${gpus_per_node##*:} # --gpus-per-node=a100:8 -> 8
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
tasks_per_node=${tasks_per_node%%(*} # SLURM_TASKS_PER_NODE reads "8(x2)" for 8 tasks on each of 2 nodes
[[ $gpus_per_node =~ ^[0-9]+$ ]] || fail "cannot read a GPU count from '$gpus_per_node'; use --gpus-per-node=N"
[[ $tasks_per_node =~ ^[0-9]+$ ]] || fail "cannot read tasks per node from '$tasks_per_node'; use --ntasks-per-node=N"
if ((gpus_per_node > 0 && gpus_per_node != tasks_per_node)); then
    fail "--gpus-per-node=$gpus_per_node but $tasks_per_node tasks per node; one process per GPU: set --ntasks-per-node=$gpus_per_node"
fi
procs_per_node=$((gpus_per_node > 0 ? gpus_per_node : tasks_per_node))
world_size=$((nodes * procs_per_node))
first() { awk 'NR==1'; } # head -n1 would leave scontrol a broken pipe (exit 141) on a long host list
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | first)
# From the job id: the same on every node and across requeues of this job, different for jobs sharing a node;
# 10000-29999 is unprivileged and below Linux's ephemeral range (32768+), so no outgoing socket holds it.
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# --- output dir: runs/slurm-<job id> unless given, so a requeued job finds its checkpoints (--resume auto) --
output_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --output-dir) output_dir=${args[i + 1]:-} ;;
    --output-dir=*) output_dir=${args[i]#--output-dir=} ;;
    esac
done
if [[ -z $output_dir ]]; then
    output_dir=runs/slurm-$SLURM_JOB_ID
    set -- --output-dir "$output_dir" "$@"
fi
[[ $output_dir == /* ]] || output_dir=$REPO/$output_dir # relative paths are relative to the checkout
restart=${SLURM_RESTART_COUNT:-0}
mkdir -p "$output_dir/logs"
# %t: the task's global rank. The restart count keeps a requeued run from overwriting the earlier logs.
rank_logs=$output_dir/logs/rank-%t.restart-$restart.log

# --- python and defaults (what the user exported wins) ---------------------------------------------------
# shellcheck source=slurm/python_env.sh
source "$REPO/slurm/python_env.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-5}

echo "job $SLURM_JOB_ID (restart $restart) on $SLURM_JOB_NODELIST: $ENTRY"
echo "python:     $python ($("$python" --version 2>&1))"
echo "layout:     $nodes node(s) x $procs_per_node procs/node = world size $world_size ($gpus_per_node GPUs/node)"
echo "master:     $MASTER_ADDR:$MASTER_PORT"
echo "output dir: $output_dir"
echo "rank logs:  $rank_logs"

# --- the warning signal: forward it to the ranks, then requeue -------------------------------------------
# `--signal=B:USR2@300` signals only this batch shell. srun passes the USR2 it receives on to every task of
# its step (checked on this cluster: the same as `scancel --signal=USR2 <job>.<step>`, without the round
# trip through slurmctld). The ranks agree on it at the next step boundary, save a complete checkpoint and
# exit 75 (src/mellama_train/exit_codes.py). The job is then requeued under the same job id, so the same
# output dir and `--resume auto` continue the run exactly there. (USR2, not USR1: some NCCL builds use USR1.)
step_pid=""
warned=0
# shellcheck disable=SC2317  # called by the trap
forward_warning() {
    warned=1
    [[ -n $step_pid ]] || return 0
    local step
    step=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '^[0-9]+\.[0-9]+$' | head -n1) || true
    kill -USR2 "$step_pid" 2>/dev/null || true
    echo "$(date +%T) forwarded USR2 to step ${step:-$SLURM_JOB_ID.?} (srun pid $step_pid)"
}
trap forward_warning USR2

cpus_per_task=()
# srun does not inherit --cpus-per-task from the allocation in every SLURM version: pass it on.
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || cpus_per_task=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

run_step() { # one srun job step over $nodes nodes; sets $status to its exit status
    # --kill-on-bad-exit: one rank dying ends the step, instead of the others waiting out the collective timeout.
    # shellcheck disable=SC2016  # $SLURM_* expand inside each task, not here
    srun --nodes="$nodes" --ntasks="$world_size" --ntasks-per-node="$procs_per_node" "${cpus_per_task[@]}" \
        --kill-on-bad-exit=1 --output="$rank_logs" \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank \
        "$python" "$ENTRY" "$@" &
    step_pid=$!

    # `wait` returns early (status > 128) whenever the trap runs; wait again until the step has really ended.
    status=0
    wait "$step_pid" || status=$?
    while kill -0 "$step_pid" 2>/dev/null; do
        status=0
        wait "$step_pid" || status=$?
    done
    # If the step ended just after an interrupted wait, bash still holds its status: collect it (127: none left).
    local last=0
    wait "$step_pid" 2>/dev/null || last=$?
    ((last == 127)) || status=$last
    echo "$(date +%T) step ended with exit status $status"
}

# --- a node lost mid-job ------------------------------------------------------------------------------------
# With --no-kill (#SBATCH in pretrain.sh; tune.sh streams its data, so a lost node requeues it) SLURM keeps the job on the nodes left when one fails and ends
# only the step ("Node failure on ..."). When the run can go on with fewer ranks (a prepared corpus under
# ZeRO-3: the same global batch and the exact next sequences, docs/DATA.md), a new step starts at once on the
# nodes the job still holds, and resumes from the newest checkpoint. Otherwise the job is requeued for as many
# nodes as before (below). Why not requeue and shrink the pending job: slurmctld takes the requeue only once this
# script has exited, and refuses updates to a job that lost a node until then, so nothing would be left to
# shrink it; and a requeue gives up nodes the job holds for a place in the queue. (If the node running this
# script is the one lost, SLURM requeues the job itself for as many nodes: `scontrol update jobid=J
# NumNodes=K NumTasks=T` lets it start on fewer.)
job_nodes() { # the job's node list now; retried, since slurmctld is busiest when a node has just failed
    local list="" try
    for try in 1 2 3; do
        list=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -oE '(^| )NodeList=[^ ]+' | first | cut -d= -f2) || true
        [[ -z $list ]] || break
        ((try == 3)) || sleep 5
    done
    echo "$list"
}
requeue_job() { # scontrol requeue, retried; this shell ignores the SIGTERM that follows, for the log's last line
    trap '' TERM
    local try
    for try in 1 2 3; do
        scontrol requeue "$SLURM_JOB_ID" && return 0
        ((try == 3)) || sleep 5
    done
    fail "scontrol requeue $SLURM_JOB_ID failed; resubmit with the same --output-dir to resume"
}
step_nodelist=$SLURM_JOB_NODELIST
submitted_nodes=$nodes
lost_nodes="" # after a step failed: the nodes the job lost during it
nodes_lost() { # true when the job holds fewer nodes than the last step ran on; sets lost_nodes, left, now
    now=$(job_nodes)
    [[ -n $now ]] || return 1
    left=$(scontrol show hostnames "$now" | wc -l)
    ((left > 0 && left < nodes)) || return 1
    lost_nodes=$(comm -23 <(scontrol show hostnames "$step_nodelist" | sort) <(scontrol show hostnames "$now" | sort) | paste -sd, -)
}

relaunch=0
run_step "$@"
while ((status != 0)) && ((!warned)) && nodes_lost; do
    echo "$(date +%T) lost node(s) $lost_nodes: $left of $nodes node(s) left ($now)"
    if ! why=$("$python" -m mellama_train status "$output_dir" --resumes-on $((left * procs_per_node)) 2>&1); then
        break # requeued below, for as many nodes as before
    fi
    if ((warned)); then # the time-limit warning came meanwhile: requeue (below) rather than start a step
        lost_nodes=""
        break
    fi
    relaunch=$((relaunch + 1))
    nodes=$left
    world_size=$((nodes * procs_per_node))
    step_nodelist=$now
    MASTER_ADDR=$(scontrol show hostnames "$now" | first)
    # Another port: the killed step's rank 0 may still hold the old one while it is torn down.
    MASTER_PORT=$((10000 + (SLURM_JOB_ID + relaunch) % 20000))
    rank_logs=$output_dir/logs/rank-%t.restart-$restart.relaunch-$relaunch.log
    echo "$(date +%T) relaunching on the $nodes node(s) left: $now, world size $world_size, the same global batch"
    echo "layout:     $nodes node(s) x $procs_per_node procs/node = world size $world_size ($gpus_per_node GPUs/node)"
    echo "master:     $MASTER_ADDR:$MASTER_PORT"
    echo "rank logs:  $rank_logs"
    lost_nodes=""
    run_step "$@"
done

# A hang: every rank's watchdog dumped its stacks to logs/hang-rank-R.restart-N.txt and exited 76
# (src/mellama_train/watchdog.py). Requeue once, since a dead node or a stuck collective rarely repeats on
# a fresh allocation; a second hang in a row is left for a person, it would most likely hang again.
hung=0
hung_before=0
if compgen -G "$output_dir/logs/hang-rank-*.restart-$restart.txt" >/dev/null; then
    hung=1
    echo "$(date +%T) the step hung: stacks in $output_dir/logs/hang-rank-*.restart-$restart.txt"
fi
if ((restart > 0)) && compgen -G "$output_dir/logs/hang-rank-*.restart-$((restart - 1)).txt" >/dev/null; then
    hung_before=1
fi
if ((hung && hung_before)); then
    echo "$(date +%T) it also hung before the last requeue: not requeued; read the stack dumps" >&2
fi

# A node lost and a run that cannot go on with fewer ranks: wait in the queue for as many nodes as submitted.
if [[ -n $lost_nodes ]]; then
    requeue_job
    echo "$(date +%T) requeued job $SLURM_JOB_ID for $submitted_nodes node(s) again, not $left: ${why##*$'\n'}"
    exit 0
fi

# A step that finished its work (exit 0) before or despite the warning is done: requeueing it would only
# start a run with nothing left to train.
if ((status != 0)) && ((warned || (hung && !hung_before))); then
    requeue_job
    echo "$(date +%T) requeued job $SLURM_JOB_ID: it restarts as restart $((restart + 1)) and resumes from $output_dir"
    exit 0
fi
# A step relaunched on fewer nodes that failed otherwise (out of memory with more shards per rank, a refusal the
# check above could not foresee): back to the queue for as many nodes as submitted, where it ran before.
if ((status != 0 && relaunch > 0)); then
    requeue_job
    echo "$(date +%T) the step on $nodes node(s) failed (exit status $status): requeued job $SLURM_JOB_ID for $submitted_nodes node(s)"
    exit 0
fi
exit "$status"
