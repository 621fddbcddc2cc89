# Shared by jobs/pipeline.sh and jobs/sweep.sh (sourced, bash, after `set -euo pipefail` and jobs/lib.sh):
# checking the settings before anything is queued, submitting with the job's id read from the scheduler's
# stdout (notices on stderr pass through), and cancelling what was submitted when a later step fails.

# The settings both take (jobs/pipeline.sh lists them); the recipe's are jobs/defaults.sh's.
BASELINE_ARGS=${BASELINE_ARGS:-}
GAN_ARGS=${GAN_ARGS:-}
SUBMIT_OPTS=${SUBMIT_OPTS:-}
BASELINE_OPTS=${BASELINE_OPTS:-}
GAN_OPTS=${GAN_OPTS:-}
PBS_MODULES=${PBS_MODULES:-} PBS_VENV=${PBS_VENV:-} PBS_LAUNCHER=${PBS_LAUNCHER:-}

submitted=()  # job ids so far, cancelled again when a later step fails
# What the trainers' checks and the schedulers' commands say on stderr, read after each of them
submit_errors=$(mktemp 2>/dev/null) ||
    { echo "error: cannot create a temporary file in ${TMPDIR:-/tmp}; set TMPDIR to a writable folder" >&2; exit 2; }
trap 'rm -f "$submit_errors"' EXIT

fail() {
    echo "error: $*" >&2
    if [ ${#submitted[@]} -gt 0 ]; then
        case $SCHEDULER in slurm) scancel "${submitted[@]}" ;; pbs) qdel "${submitted[@]}" ;; esac 2>/dev/null || true
        echo "(cancelled the jobs already submitted: ${submitted[*]})" >&2
    fi
    exit 2
}

# The last line of a command's complaint, for a one-line error.
last_line() { grep -v '^\s*$' <<<"$1" | tail -n 1; }

# Sets SCHEDULER (slurm where sbatch exists, else pbs) and refuses, in one line, what would fail later:
# not the repository root, a comma in a variable that travels with --export / -v (the names given), a
# setting that must be a whole number (the names after --numbers).
check_common() {
    local name numbers=()
    [ -f jobs/lib.sh ] && [ -f train_gan.py ] || fail "run $0 from the repository root"
    while [ $# -gt 0 ] && [ "$1" != --numbers ]; do
        case ${!1} in *,*) fail "$1='${!1}' contains a comma, which sbatch --export and qsub -v cannot pass on" ;; esac
        shift
    done
    [ $# -eq 0 ] || { shift; numbers=("$@"); }
    # job_check_numbers's one line, in this script's words.
    for name in "${numbers[@]}"; do
        case ${!name:-} in "" | *[!0-9]*) fail "$name='${!name:-}' is not a whole number; give it in digits only" ;; esac
    done
    if [ -z "${SCHEDULER:-}" ]; then
        if command -v sbatch >/dev/null; then SCHEDULER=slurm
        elif command -v qsub >/dev/null; then SCHEDULER=pbs
        else fail "neither sbatch nor qsub is here: run this on the cluster's login node"
        fi
    fi
    case $SCHEDULER in slurm | pbs) ;; *) fail "SCHEDULER=$SCHEDULER: use slurm or pbs" ;; esac
}

# check_flags TRAINER LABEL FLAGS [LABEL FLAGS]...: train_TRAINER.py (baseline or gan) checks, without training,
# each FLAGS (the words its job will pass it, split as the job's shell splits them) in one python call
# (`train_TRAINER.py --check-flags -`); the
# first it refuses stops this script in one line naming its LABEL, before anything is queued: otherwise every
# element would fail on its node after the queue wait. The jobs' python: PBS_VENV's on PBS where it is set.
check_flags() {
    local script=train_$1.py labels=() lines=() verdicts=() out i python=python
    shift
    while [ $# -ge 2 ]; do labels+=("$1"); lines+=("$2"); shift 2; done
    [ "$SCHEDULER" != pbs ] || [ -z "${PBS_VENV:-}" ] || python=$PBS_VENV/bin/python
    out=$(printf '%s\n' "${lines[@]}" | "$python" "$script" --check-flags - 2>"$submit_errors") || true  # 2: refused
    [ -z "$out" ] || mapfile -t verdicts <<<"$out"
    if [ ${#verdicts[@]} -ne ${#lines[@]} ]; then
        out=$(last_line "$(cat "$submit_errors")")
        fail "cannot check the trainers' flags with '$python $script --check-flags' (${out:-no answer}); run this" \
             "where python has the jobs' packages (activate their environment, or load their modules)"
    fi
    for i in "${!lines[@]}"; do
        [ "${verdicts[i]}" = ok ] || fail "${labels[i]}: $script would refuse it on every node:" \
            "${verdicts[i]#error: }; fix its flags"
    done
}

# slurm_submit JOB_FILE VARS OPTIONS [-- SUBMIT-ONLY OPTIONS]: checks with --test-only that some node can run
# the job, submits it, prints its id.
slurm_submit() {
    local file=$1 vars=$2 options=() extra=() out
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
    [ $# -eq 0 ] || { shift; extra=("$@"); }
    if ! out=$(sbatch --test-only "${options[@]}" --export="ALL,$vars" "$file" 2>&1); then
        fail "no node can run $file with the options '${options[*]}': Slurm says '$(last_line "$out")';" \
             "change them (SUBMIT_OPTS, *_OPTS; jobs/README.md)"
    fi
    out=$(sbatch --parsable "${options[@]}" "${extra[@]}" --export="ALL,$vars" "$file" 2>"$submit_errors") ||
        fail "sbatch $file failed: $(last_line "$(cat "$submit_errors")$out")"
    cat "$submit_errors" >&2
    job_parse_id "$out" || fail "sbatch $file answered '$out', not a job id"
}

pbs_submit() {
    local file=$1 vars=$2 out
    shift 2
    out=$(qsub "$@" -v "$vars" "$file" 2>"$submit_errors") ||
        fail "qsub $file failed: $(last_line "$(cat "$submit_errors")$out")"
    cat "$submit_errors" >&2
    job_parse_id "$out" || fail "qsub $file answered '$out', not a job id"
}

# A request beyond every partition's limits is accepted by sbatch and then waits forever: catch it now.
slurm_check_pending() {
    local id reason
    while read -r id reason; do
        case $reason in PartitionConfig | PartitionTimeLimit | PartitionNodeLimit | *PerJob*)
            fail "job $id would wait forever: Slurm says $reason (the request exceeds what the partition or QOS" \
                 "allows); ask for less (--time, --cpus-per-task, --mem, --gres in SUBMIT_OPTS, *_OPTS)" ;;
        esac
    done < <(squeue -h -o '%i %r' -j "$(IFS=,; echo "${submitted[*]}")")
}

# The file $1 holding the text $2, written whole or not at all (jobs/lib.sh's job_write_line).
write_state() {
    local reason
    mkdir -p "$(dirname "$1")"
    reason=$(job_write_line "$1" "$2") || fail "cannot write $1 ($reason); free space or choose another RUN_DIR"
}

# plan_eta LABEL METRICS EPOCHS ...: a line per run that has measured an epoch, and the longest of them (the
# runs train side by side), for the plan printed after submitting; nothing before a first epoch.
plan_eta() {
    local longest=0 lines="" seconds done
    while [ $# -ge 3 ]; do
        if read -r seconds done < <(job_eta_seconds "$2" "$3") && [ -n "$seconds" ]; then
            lines+="  $1: $(job_duration "$seconds") of training left (epoch $done of $3 done)"$'\n'
            [ "$seconds" -le "$longest" ] || longest=$seconds
        fi
        shift 3
    done
    [ -n "$lines" ] || return 0
    echo "At the pace measured so far, with the runs side by side and not counting the queue:"
    printf '%s' "$lines"
    echo "  the whole: about $(job_duration "$longest"), then the follow-up jobs"
}
