# Shared by the training jobs (sourced, bash): run a trainer so that the end of a job's walltime becomes a
# checkpoint and a resubmitted job, never a lost run.
#
# The trainers' contract: with --resume they continue from the checkpoint in --out-dir (or start fresh);
# on SIGTERM or SIGUSR1 they save a checkpoint at the next batch and exit 75; a finished run given --resume
# exits 0 without training; any other status is an error (2: bad input, with a one-line message).
#
# A job script sets JOB_SCRIPT (itself, relative to the submit directory), JOB_VARS (the names of the
# variables the next job needs) and OUT_DIR, then calls: run_chain COMMAND...
# What run_chain does with COMMAND's status:
#   0                                  the run is finished: stop, exit 0
#   75, or any failure after this job  stopped for the scheduler: resubmit JOB_SCRIPT with the same
#     forwarded a stop signal          variables and exit 0 (launchers such as torchrun exit 1, not 75,
#                                      after their workers stopped; if that hid a real error, the next
#                                      job meets it again and stops there)
#   anything else                      an error: stop, exit with that status
# A file STOP in OUT_DIR ends the chain: no resubmission, and a job that starts with it present does nothing.

JOB_CHAIN=${JOB_CHAIN:-1}      # this job's place in the chain of resubmitted jobs
MAX_CHAIN=${MAX_CHAIN:-20}     # more jobs than this is a loop, not a long run: stop
STOP_MARGIN=${STOP_MARGIN:-300}  # PBS: seconds before the walltime at which the trainer is asked to stop

job_log() { echo "job $(date '+%F %T'): $*"; }

job_scheduler() {
    if [ -n "${SLURM_JOB_ID:-}" ]; then echo slurm
    elif [ -n "${PBS_JOBID:-}" ]; then echo pbs
    fi
}

# NAME=value,... of JOB_VARS and this file's knobs, for qsub -v and sbatch --export (which split on commas).
job_var_list() {
    local name list=
    for name in $JOB_VARS MAX_CHAIN STOP_MARGIN; do
        list+="${list:+,}$name=${!name}"
    done
    echo "$list,JOB_CHAIN=$((JOB_CHAIN + 1))"
}

job_check_vars() {
    local name
    for name in $JOB_VARS; do
        case ${!name} in *,*)
            echo "error: $name='${!name}' contains a comma, which qsub -v and sbatch --export cannot pass on" >&2
            return 1 ;;
        esac
    done
}

job_resubmit() {
    case $(job_scheduler) in
        slurm) sbatch --export="ALL,$(job_var_list)" "$JOB_SCRIPT" ;;
        pbs) qsub -v "$(job_var_list)" "$JOB_SCRIPT" ;;
        *) echo "not inside a Slurm or PBS job: nothing to resubmit to" >&2; return 1 ;;
    esac
}

# Seconds of walltime this PBS job asked for: Torque exports PBS_WALLTIME, PBS Pro answers through qstat.
job_pbs_walltime() {
    local w=${PBS_WALLTIME:-} h m s
    [ -n "$w" ] || w=$(qstat -f "$PBS_JOBID" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p')
    case $w in
        *:*:*) IFS=: read -r h m s <<<"$w"; echo $((10#$h * 3600 + 10#$m * 60 + 10#$s)) ;;
        *) echo "$w" ;;
    esac
}

# PBS has no early-warning signal like Slurm's --signal, and it SIGKILLs the job a site-specific grace
# period (seconds on some sites) after the walltime's SIGTERM: too short, perhaps, to checkpoint and
# resubmit. So the job warns itself STOP_MARGIN seconds early, through the same USR1 path as Slurm.
job_start_timer() {
    local walltime delay
    walltime=$(job_pbs_walltime)
    delay=$((${walltime:-0} - STOP_MARGIN))
    if [ "$delay" -le 0 ]; then
        job_log "walltime unknown or shorter than STOP_MARGIN=$STOP_MARGIN s: relying on the scheduler's SIGTERM"
        return
    fi
    job_log "will ask the trainer to stop in $delay s, $STOP_MARGIN s before the walltime"
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$delay" & sleeper=$!
        wait "$sleeper" && kill -USR1 $$
    ) &
    job_timer=$!
}

job_forward() {
    job_stop_signal=$1
    job_interrupted=1
    job_log "received SIG$1: asking the trainer to save a checkpoint and stop"
    [ -z "$job_child" ] || kill -"$1" "$job_child" 2>/dev/null
}

# Runs COMMAND in the background, so that this shell is free to take the scheduler's signals and pass them
# on, and returns COMMAND's status.
job_run_forwarding() {
    local status s
    job_child= job_stop_signal= job_interrupted=
    trap 'job_forward USR1' USR1
    trap 'job_forward TERM' TERM
    "$@" &
    job_child=$!
    # A signal that came before the child existed is passed on now.
    [ -z "$job_stop_signal" ] || kill -"$job_stop_signal" "$job_child" 2>/dev/null
    wait "$job_child"
    status=$?
    # A trapped signal makes wait return at once, the child still running: wait again for its own status.
    while [ -n "$job_interrupted" ]; do
        job_interrupted=
        wait "$job_child" 2>/dev/null
        s=$?
        [ "$s" -eq 127 ] || status=$s  # 127: the status was already collected by the wait above
    done
    trap - USR1 TERM
    return "$status"
}

run_chain() {
    local status job_timer=
    job_check_vars || exit 2
    if [ -e "$OUT_DIR/STOP" ]; then
        job_log "$OUT_DIR/STOP exists: not starting; remove it and submit $JOB_SCRIPT again to continue"
        exit 75
    fi
    job_log "${SLURM_JOB_ID:-${PBS_JOBID:-local}} on $(hostname), job $JOB_CHAIN of at most $MAX_CHAIN: $*"
    [ "$(job_scheduler)" != pbs ] || job_start_timer
    job_run_forwarding "$@"
    status=$?
    [ -z "$job_timer" ] || kill "$job_timer" 2>/dev/null
    job_log "the trainer exited with status $status"

    if [ "$status" -eq 0 ]; then
        job_log "the run is finished"
        exit 0
    fi
    if [ "$status" -ne 75 ] && [ -z "$job_stop_signal" ]; then
        echo "error: the trainer failed with status $status (see its message above); not resubmitting" >&2
        exit "$status"
    fi
    if [ -e "$OUT_DIR/STOP" ]; then
        job_log "$OUT_DIR/STOP exists: not resubmitting; the checkpoint in $OUT_DIR resumes the run later"
        exit 75
    fi
    if [ "$JOB_CHAIN" -ge "$MAX_CHAIN" ]; then
        echo "error: this is job $JOB_CHAIN of MAX_CHAIN=$MAX_CHAIN; not resubmitting; raise MAX_CHAIN to go on" >&2
        exit 75
    fi
    if ! job_resubmit; then
        echo "error: resubmitting $JOB_SCRIPT failed; submit it again by hand to continue from the checkpoint" >&2
        exit 75
    fi
    job_log "resubmitted $JOB_SCRIPT as job $((JOB_CHAIN + 1)) of the chain"
    exit 0
}
