#!/usr/bin/env bash
# Submits the whole assignment in one go: the baseline and the GAN training chains side by side, visualize
# (held: the chain that finishes last releases it, so it never reads a half-trained run), and report (after
# visualize has succeeded). Run it from the repository root on the login node, in the Python environment
# the jobs should use (Slurm passes it on; PBS jobs get theirs from PBS_MODULES, PBS_VENV):
#   jobs/pipeline.sh runs/main
#   WIDTH=128 GAN_EPOCHS=400 SUBMIT_OPTS="-p gpu -A myproj" GAN_OPTS="--time=24:00:00" jobs/pipeline.sh runs/w128
# Everything goes under RUN_DIR (default runs/main): baseline/, gan/, visualization/, report/, and on Slurm
# the jobs' logs in logs/. Running the same command again continues a stopped pipeline from the checkpoints,
# and then also prints how long the rest takes at the pace measured so far.
#
# Settings, as environment variables (defaults in brackets):
#   SCHEDULER                   slurm or pbs [slurm where sbatch exists, else pbs]
#   DATA_DIR                    CIFAR-10 [data]
#   WIDTH                       --width of both trainers [196]
#   BASELINE_EPOCHS, GAN_EPOCHS [100, 200]
#   BASELINE_ARGS, GAN_ARGS, VISUALIZE_ARGS, REPORT_ARGS
#                               more flags of train_baseline.py, train_gan.py, visualize.py all, report.py
#   SUBMIT_OPTS                 sbatch or qsub options for all four jobs, e.g. "-p gpu -A myproj"
#   BASELINE_OPTS, GAN_OPTS, VISUALIZE_OPTS, REPORT_OPTS
#                               options for one job, after SUBMIT_OPTS, e.g. GAN_OPTS="--time=24:00:00";
#                               a training chain's options hold for every job of the chain
#   STOP_MARGIN                 seconds before the walltime at which a trainer is asked to stop [300]
#   MAX_CHAIN                   the most jobs one training chain may take [20]
#   GAN_JOB                     gan, or on Slurm gan_multigpu (all the GPUs of one node) or gan_multinode
#                               (torchrun on several nodes) [gan]
#   PBS_MODULES, PBS_VENV, PBS_LAUNCHER
#                               PBS: how the jobs get Python and start it (jobs/lib.sh) [none; aprun if found]
set -euo pipefail

RUN_DIR=${1:-runs/main}
VISUALIZE_ARGS=${VISUALIZE_ARGS:-}
REPORT_ARGS=${REPORT_ARGS:-}
VISUALIZE_OPTS=${VISUALIZE_OPTS:-}
REPORT_OPTS=${REPORT_OPTS:-}
GAN_JOB=${GAN_JOB:-gan}
# The other settings' defaults: jobs/defaults.sh (through jobs/lib.sh) and jobs/submit.sh.

. jobs/lib.sh 2>/dev/null && . jobs/submit.sh || { echo "error: run jobs/pipeline.sh from the repository root" >&2; exit 2; }

check_settings() {
    case $RUN_DIR in *[[:space:],]*) fail "RUN_DIR '$RUN_DIR' contains a space or a comma; choose a plain path" ;; esac
    check_common DATA_DIR WIDTH BASELINE_EPOCHS GAN_EPOCHS BASELINE_ARGS GAN_ARGS VISUALIZE_ARGS REPORT_ARGS \
        PBS_MODULES PBS_VENV PBS_LAUNCHER --numbers WIDTH BASELINE_EPOCHS GAN_EPOCHS STOP_MARGIN MAX_CHAIN
    case $SCHEDULER:$GAN_JOB in slurm:gan | slurm:gan_multigpu | slurm:gan_multinode | pbs:gan) ;;
        *) fail "GAN_JOB=$GAN_JOB: use gan (or gan_multigpu, gan_multinode on Slurm)" ;; esac
    local name
    for name in baseline gan; do
        [ ! -e "$RUN_DIR/$name/STOP" ] || fail "$RUN_DIR/$name/STOP exists and would stop that chain at once; remove it"
    done
}

check_settings
B=$RUN_DIR/baseline G=$RUN_DIR/gan V=$RUN_DIR/visualization R=$RUN_DIR/report
check_flags baseline BASELINE_ARGS "--resume --data-dir $DATA_DIR --out-dir $B --epochs $BASELINE_EPOCHS \
--width $WIDTH $BASELINE_ARGS"
check_flags gan GAN_ARGS "--resume --data-dir $DATA_DIR --out-dir $G --epochs $GAN_EPOCHS --width $WIDTH \
$GAN_ARGS"
AFTER="$B/baseline.chain $G/gan.chain"
pbs_vars=
[ "$SCHEDULER" != pbs ] || pbs_vars=",PBS_MODULES=$PBS_MODULES,PBS_VENV=$PBS_VENV,PBS_LAUNCHER=$PBS_LAUNCHER"
common="DATA_DIR=$DATA_DIR,MAX_CHAIN=$MAX_CHAIN,STOP_MARGIN=$STOP_MARGIN,WIDTH=$WIDTH$pbs_vars"
vis_vars="DATA_DIR=$DATA_DIR,OUT_DIR=$V,BASELINE_DIR=$B,GAN_DIR=$G,EXTRA_ARGS=$VISUALIZE_ARGS$pbs_vars"
report_vars="BASELINE_DIR=$B,GAN_DIR=$G,VIS_DIR=$V,OUT_DIR=$R,EXTRA_ARGS=$REPORT_ARGS$pbs_vars"
chain_vars() { echo "$common,OUT_DIR=$1,EPOCHS=$2,EXTRA_ARGS=$3,FOLLOW_UP=$vis,FOLLOW_UP_AFTER=$AFTER"; }
# An old chain file saying "finished" must not release visualize before this pipeline's chain has run. Written
# before the chains are submitted: a chain that starts (or ends) at once overwrites it.
reset_states() {
    write_state "$B/baseline.chain" "queued: submitted by jobs/pipeline.sh at $(date '+%F %T')"
    write_state "$G/gan.chain" "queued: submitted by jobs/pipeline.sh at $(date '+%F %T')"
}

# Word splitting of the *_OPTS is intended: they are lists of options.
# shellcheck disable=SC2086
if [ "$SCHEDULER" = slurm ]; then
    logs=$RUN_DIR/logs
    mkdir -p "$logs"
    out=(--output="$logs/%x-%j.out")
    # The training chains get the walltime warning STOP_MARGIN seconds early, in every job (SBATCH_SIGNAL is
    # passed on with the environment); visualize and report have no use for it.
    unset SBATCH_SIGNAL
    vis=$(slurm_submit jobs/visualize.slurm "$vis_vars" $SUBMIT_OPTS $VISUALIZE_OPTS "${out[@]}" -- --hold)
    submitted+=("$vis")
    report=$(slurm_submit jobs/report.slurm "$report_vars" $SUBMIT_OPTS $REPORT_OPTS "${out[@]}" -- \
        --dependency="afterok:$vis" --kill-on-invalid-dep=yes)
    submitted+=("$report")
    export SBATCH_SIGNAL="B:USR1@$STOP_MARGIN"
    reset_states
    baseline=$(slurm_submit jobs/baseline.slurm "$(chain_vars "$B" "$BASELINE_EPOCHS" "$BASELINE_ARGS")" \
        $SUBMIT_OPTS $BASELINE_OPTS "${out[@]}")
    submitted+=("$baseline")
    gan=$(slurm_submit "jobs/$GAN_JOB.slurm" "$(chain_vars "$G" "$GAN_EPOCHS" "$GAN_ARGS")" \
        $SUBMIT_OPTS $GAN_OPTS "${out[@]}")
    submitted+=("$gan")
    slurm_check_pending
    log() { echo "$logs/$1-$2.out"; }
    gan_name=${GAN_JOB/_/-}
else
    vis=$(pbs_submit jobs/visualize.pbs "$vis_vars" $SUBMIT_OPTS $VISUALIZE_OPTS -h)
    submitted+=("$vis")
    report=$(pbs_submit jobs/report.pbs "$report_vars" $SUBMIT_OPTS $REPORT_OPTS -W "depend=afterok:$vis")
    submitted+=("$report")
    reset_states
    baseline=$(pbs_submit jobs/baseline.pbs "$(chain_vars "$B" "$BASELINE_EPOCHS" "$BASELINE_ARGS")" \
        $SUBMIT_OPTS $BASELINE_OPTS)
    submitted+=("$baseline")
    gan=$(pbs_submit jobs/gan.pbs "$(chain_vars "$G" "$GAN_EPOCHS" "$GAN_ARGS")" $SUBMIT_OPTS $GAN_OPTS)
    submitted+=("$gan")
    log() { echo "$1.o${2%%.*}"; }
    gan_name=gan
fi

cat <<EOF
Submitted to $SCHEDULER; everything goes under $RUN_DIR:
  baseline   job $baseline  -> $B/ (cifar10.model, baseline_metrics.jsonl)   log $(log baseline "$baseline")
  gan        job $gan  -> $G/ (models, gan_metrics.jsonl, output/NNN.png)   log $(log "$gan_name" "$gan")
  visualize  job $vis  -> $V/, held until both training chains have finished
  report     job $report  -> $R/report.md and report.pdf, after visualize has succeeded
A training chain resubmits itself at its walltime: each job has its own log, and $B/baseline.chain and
$G/gan.chain say which job runs now. Follow:  tail -f $(log "$gan_name" "$gan")
Stop a chain:  touch $G/STOP  (it ends after the running job),  or cancel its running job.
EOF
plan_eta baseline "$B/baseline_metrics.jsonl" "$BASELINE_EPOCHS" gan "$G/gan_metrics.jsonl" "$GAN_EPOCHS"
