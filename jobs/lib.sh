# Shared by the job files (sourced, bash): run a trainer so that the end of a job's walltime becomes a
# checkpoint and a resubmitted job, never a lost run; and let follow-up jobs start only on finished runs.
#
# The trainers' contract: with --resume they continue from the checkpoint in --out-dir (or start fresh);
# on SIGTERM, SIGUSR1, SIGINT or SIGHUP they save a checkpoint at the next batch and exit 75; a finished run
# given --resume exits 0 without training; any other status is an error (2: bad input, with a one-line
# message).
#
# A training job sets JOB_SCRIPT (itself, relative to the submit directory), JOB_NAME (baseline or gan: the
# trainer's file names <OUT_DIR>/<JOB_NAME>.ckpt), JOB_VARS (the names of the variables the next job needs)
# and OUT_DIR, then calls: run_chain COMMAND...
#
# Signals: the scheduler warns the job's shell of the walltime with SIGUSR1 (Slurm's --signal; on PBS a
# timer of this file, STOP_MARGIN seconds early). The shell passes it on to COMMAND as JOB_CHILD_SIGNAL
# (USR1; TERM for torchrun, which SIGUSR1 would kill). A SIGTERM that comes first is a cancel (scancel,
# qdel) or a preemption.
#
# What run_chain does when COMMAND exits:
#   0                                   the run is finished: releases the follow-up job, exit 0
#   after a cancel                      stop; the log says how to continue
#   75, or any failure after the        the walltime: resubmit JOB_SCRIPT with the same variables and
#     walltime warning                  resources, exit 0 (torchrun exits 1, not 75, after its workers
#                                       stopped; if that hid a real error, the next job meets it again)
#   anything else                       an error: stop, exit with that status
# It does not resubmit when OUT_DIR/STOP exists, after MAX_CHAIN jobs, or when this job left the checkpoint
# as it found it (no progress: another job would not get further).
#
# <OUT_DIR>/<JOB_NAME>.chain holds the chain's state in one line that starts with running:, queued:,
# finished:, stopped: or failed:, and once an epoch has run, the time the rest of the schedule takes.
# FOLLOW_UP (a held job's id) is released once every chain file named in
# FOLLOW_UP_AFTER (space-separated) says finished: jobs/pipeline.sh starts visualize that way.

export PYTHONUNBUFFERED=1  # the trainers' lines reach the job's log as they are printed

. jobs/defaults.sh               # DATA_DIR, WIDTH, the epochs, MAX_CHAIN, STOP_MARGIN
JOB_CHAIN=${JOB_CHAIN:-1}        # this job's place in the chain of resubmitted jobs
FOLLOW_UP=${FOLLOW_UP:-}
FOLLOW_UP_AFTER=${FOLLOW_UP_AFTER:-}
JOB_CHILD_SIGNAL=${JOB_CHILD_SIGNAL:-USR1}

job_log() { echo "job $(date '+%F %T'): $*"; }

# Exits 2 with one line unless every variable named is a whole number (seconds, a count of jobs, ...).
job_check_numbers() {
    local name
    for name in "$@"; do
        case ${!name:-} in "" | *[!0-9]*)
            echo "error: $name='${!name:-}' is not a whole number; give it in digits only (seconds, or a count)" >&2
            exit 2 ;;
        esac
    done
}

# JOB_SCHEDULER=pbs (set by the .pbs files) comes first: a PBS emulated over Slurm sets both ids.
job_scheduler() {
    if [ "${JOB_SCHEDULER:-}" = pbs ] && [ -n "${PBS_JOBID:-}" ]; then echo pbs
    elif [ -n "${SLURM_JOB_ID:-}" ]; then echo slurm
    elif [ -n "${PBS_JOBID:-}" ]; then echo pbs
    fi
}

job_id() {
    case $(job_scheduler) in pbs) echo "$PBS_JOBID" ;; *) echo "${SLURM_JOB_ID:-local}" ;; esac
}

# The variables the next job of a chain needs: JOB_VARS and this file's knobs.
job_var_names() {
    echo $JOB_VARS MAX_CHAIN STOP_MARGIN FOLLOW_UP FOLLOW_UP_AFTER
}

# NAME=value,... of job_var_names, for qsub -v and sbatch --export (which split on commas); $1: the chain
# position the job submitted with them takes.
job_var_list() {
    local name list=
    for name in $(job_var_names); do
        list+="${list:+,}$name=${!name}"
    done
    echo "$list,JOB_CHAIN=$1"
}

job_check_vars() {
    local name
    for name in $JOB_VARS FOLLOW_UP_AFTER; do
        case ${!name} in *,*)
            echo "error: $name='${!name}' contains a comma, which qsub -v and sbatch --export cannot pass on" >&2
            return 1 ;;
        esac
    done
}

# The value of NAME= in a one-line `scontrol show job -o` record ($1, starting with a space); nothing for
# the values that mean "not set".
job_slurm_field() {
    local rest=${1#* "$2"=}
    [ "$rest" != "$1" ] || return 0
    rest=${rest%% *}
    case $rest in ""|"(null)"|N/A|None|NONE|UNLIMITED) ;; *) echo "$rest" ;; esac
}

# The resources this Slurm job got, as sbatch options, one a line: whatever the first job was given, by
# #SBATCH lines, the command line or SBATCH_* variables, holds for every job of the chain.
job_slurm_options() {
    local record value nodes
    record=" $(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)"
    [ "$record" != " " ] || return 0
    value=$(job_slurm_field "$record" JobName) && [ -n "$value" ] && echo "--job-name=$value"
    value=$(job_slurm_field "$record" Partition) && [ -n "$value" ] && echo "--partition=$value"
    value=$(job_slurm_field "$record" Account) && [ -n "$value" ] && echo "--account=$value"
    value=$(job_slurm_field "$record" QOS) && [ -n "$value" ] && echo "--qos=$value"
    value=$(job_slurm_field "$record" Reservation) && [ -n "$value" ] && echo "--reservation=$value"
    value=$(job_slurm_field "$record" Features) && [ -n "$value" ] && echo "--constraint=$value"
    value=$(job_slurm_field "$record" ExcNodeList) && [ -n "$value" ] && echo "--exclude=$value"
    value=$(job_slurm_field "$record" TimeLimit) && [ -n "$value" ] && echo "--time=$value"
    value=$(job_slurm_field "$record" CPUs/Task) && [ -n "$value" ] && echo "--cpus-per-task=$value"
    nodes=$(job_slurm_field "$record" NumNodes) && [ -n "$nodes" ] && echo "--nodes=$nodes"
    # The memory of a one-node job, however it was asked for: --mem-per-cpu on the command line would clash
    # with the job file's --mem. Of a job on several nodes, the memory of each.
    value=$(job_slurm_field "$record" TRES) && value=$(tr , '\n' <<<"$value" | sed -n 's/^mem=//p')
    [ "${nodes:-1}" = 1 ] || value=$(job_slurm_field "$record" MinMemoryNode)
    [ -n "$value" ] && echo "--mem=$value"
    value=$(job_slurm_field "$record" TresPerNode)
    echo "--gres=${value:-none}" | sed 's/gres://g'  # none: a job given --gres=none stays without GPUs
    value=$(job_slurm_field "$record" TresPerJob) && [ -n "$value" ] && echo "--gpus=${value#gres:gpu:}"
    value=$(job_slurm_field "$record" MailUser) && [ -n "$value" ] && echo "--mail-user=$value"
    value=$(job_slurm_field "$record" MailType) && [ -n "$value" ] && echo "--mail-type=$value"
    # The log of every job goes where the first one's went.
    value=$(job_slurm_field "$record" StdOut) && [ -n "$value" ] && echo "--output=$(dirname "$value")/%x-%j.out"
    return 0
}

# A value of `qstat -f`'s record for this PBS job (Torque and PBS Pro write "    name = value", some with a tab).
job_pbs_field() {
    qstat -f "$PBS_JOBID" 2>/dev/null | sed -n "s/^[[:space:]]*$1 = //p" | head -n 1
}

# The resources this PBS job got, as qsub options, one a line.
job_pbs_options() {
    local name value
    value=$(job_pbs_field Job_Name) && [ -n "$value" ] && printf '%s\n' -N "$value"
    value=$(job_pbs_field queue) && [ -n "$value" ] && printf '%s\n' -q "$value"
    value=$(job_pbs_field Account_Name) && [ -n "$value" ] && printf '%s\n' -A "$value"
    for name in walltime nodes select mem; do
        value=$(job_pbs_field "Resource_List.$name") && [ -n "$value" ] && printf '%s\n' -l "$name=$value"
    done
    return 0
}

# The command that submits JOB_SCRIPT again, one word a line: the same resources and variables, as job $1
# of the chain.
job_submit_words() {
    case $(job_scheduler) in
        slurm) echo sbatch; job_slurm_options; echo "--export=ALL,$(job_var_list "$1")" ;;
        pbs) echo qsub; job_pbs_options; printf '%s\n' -v "$(job_var_list "$1")" ;;
        *) return 1 ;;
    esac
    echo "$JOB_SCRIPT"
}

# A word as the shell reads it back: in single quotes when it has characters the shell would take apart.
job_quote() {
    local q="'"
    case $1 in *[!A-Za-z0-9_./:=,@%+-]* | "") echo "$q${1//$q/$q\\$q$q}$q" ;; *) echo "$1" ;; esac
}

# The same, as one line to paste into a shell. Outside a scheduler (a job run by hand, bash JOB_SCRIPT): the
# job file run with the variables it was given, NAME=value before it, without which it would start afresh.
job_submit_line() {
    local words word name line=""
    mapfile -t words < <(job_submit_words "$1")
    if [ ${#words[@]} -eq 0 ]; then
        for name in $(job_var_names); do
            [ -z "${!name}" ] || line+="$name=$(job_quote "${!name}") "
        done
        words=(bash "$JOB_SCRIPT")
    fi
    for word in "${words[@]}"; do
        line+="$(job_quote "$word") "
    done
    echo "${line% }"
}

# The job id in what sbatch --parsable ("1234" or "1234;cluster") or qsub ("1234.server") wrote on stdout:
# its last line. Notices go to stderr and pass through.
job_parse_id() {
    local id
    id=$(grep -v '^[[:space:]]*$' <<<"$1" | tail -n 1)
    id=${id%%;*}
    case $id in "" | *[[:space:]]*) return 1 ;; esac
    echo "$id"
}

# Submits the next job of the chain; prints its id.
job_resubmit() {
    local words out
    mapfile -t words < <(job_submit_words $((JOB_CHAIN + 1))) || true
    if [ ${#words[@]} -eq 0 ]; then
        echo "not inside a Slurm or PBS job: nothing to resubmit to" >&2
        return 1
    fi
    # sbatch --parsable prints the id alone on stdout.
    [ "${words[0]}" != sbatch ] || words=(sbatch --parsable "${words[@]:1}")
    out=$("${words[@]}") || return 1
    job_parse_id "$out"
}

# Writes the text $2 (and a newline) to the file $1 whole or not at all: into a temporary file, renamed over
# $1. When that fails (a full disk, no permission) it leaves nothing behind and $1 as it was, prints the reason
# (the end of the shell's message) and returns 1.
job_write_line() {
    local error
    if error=$({ printf '%s\n' "$2" > "$1.$$.tmp"; } 2>&1) && error=$(mv -f "$1.$$.tmp" "$1" 2>&1); then
        return 0
    fi
    rm -f "$1.$$.tmp"
    echo "${error##*: }"
    return 1
}

# The chain's state, or one line saying that it could not be recorded (the follow-up jobs read the file).
job_set_state() {
    local file=$OUT_DIR/$JOB_NAME.chain reason now=
    reason=$(job_write_line "$file" "$*") && return
    read -r now < "$file" 2>/dev/null
    echo "error: cannot record the chain's state in $file ($reason); it still says '${now:-nothing}', but the" \
         "state is: $*" >&2
}

# "1 h 05 min", "12 min", "40 s" for a number of seconds.
job_duration() {
    if [ "$1" -ge 3600 ]; then printf '%d h %02d min\n' $(($1 / 3600)) $(($1 % 3600 / 60))
    elif [ "$1" -ge 60 ]; then echo "$(($1 / 60)) min"
    else echo "$1 s"
    fi
}

# "SECONDS DONE" for a run with metrics file $1 and schedule of $2 epochs: the seconds per epoch its last epoch
# record measured (seconds_per_epoch; an older file's seconds of that epoch) times the epochs left of $2, which
# may be more than the run was first given (a finished GAN trained further). Without $2, the trainer's own
# estimate (eta_s). Nothing before the first epoch. Epoch records are those of type "epoch" (or of no type:
# older baseline files).
job_eta_seconds() {
    [ -r "$1" ] || return 0
    awk -v total="${2:-}" '
        function field(name,   v) {
            if (!match(last, "\"" name "\": *[0-9.eE+-]+")) return ""
            v = substr(last, RSTART, RLENGTH); sub(/^[^:]*: */, "", v); return v
        }
        /"epoch":/ && (/"type": *"epoch"/ || !/"type":/) { last = $0 }
        END {
            if (last == "" || field("epoch") == "") exit
            done = field("epoch") + 0
            per = field("seconds_per_epoch")
            if (per == "") per = field("seconds")
            if (total ~ /^[0-9]+$/ && per != "") eta = per * (total > done ? total - done : 0)
            else if (field("eta_s") != "") eta = field("eta_s") + 0
            else exit
            printf "%d %d\n", eta + 0.5, done
        }' "$1"
}

# The same as words for the chain's state file and the pipeline's plan, or nothing.
job_eta() {
    local seconds done
    read -r seconds done < <(job_eta_seconds "$1" "$2") || return 0
    [ -n "$seconds" ] && [ "$seconds" -gt 0 ] &&
        echo "$(job_duration "$seconds") to go at the measured pace (epoch $done of ${2:-?} done)"
}

# The chain's state $1 with the time the rest of the run takes, when an epoch has been measured.
job_state_eta() {
    local eta
    eta=$(job_eta "$OUT_DIR/${JOB_NAME}_metrics.jsonl" "${EPOCHS:-}")
    echo "$1${eta:+; $eta}"
}

# Releases FOLLOW_UP once every chain named in FOLLOW_UP_AFTER is finished. Each chain writes its own state
# before it reads the others', so of two chains that finish together at least one sees both finished.
job_release_follow_up() {
    local file state rest
    [ -n "$FOLLOW_UP" ] || return 0
    for file in $FOLLOW_UP_AFTER; do
        state=
        read -r state rest 2>/dev/null < "$file"
        if [ "$state" != finished: ]; then
            job_log "follow-up job $FOLLOW_UP stays held until $file says finished (now: ${state:-no such file} $rest)"
            return 0
        fi
    done
    case $(job_scheduler) in
        slurm) scontrol release "$FOLLOW_UP" ;;
        pbs) qrls "$FOLLOW_UP" ;;
    esac && job_log "released follow-up job $FOLLOW_UP: every run it needs is finished"
}

# A sweep's array element (jobs/sweep.sh): SWEEP names a table of one line per element, "OUT_DIR FLAGS...";
# the element's line is the array index's (or SWEEP_INDEX's) plus one. Sets OUT_DIR and EXTRA_ARGS from it,
# and empties SWEEP, so that the chain's next jobs, plain jobs, carry those on as any chain does.
job_sweep_element() {
    local index line
    [ -n "${SWEEP:-}" ] || return 0
    index=${SWEEP_INDEX:-${SLURM_ARRAY_TASK_ID:-${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-}}}}
    case $index in "" | *[!0-9]*)
        echo "error: SWEEP=$SWEEP is set but this job is no array element; submit it with jobs/sweep.sh" >&2
        exit 2 ;;
    esac
    line=$(sed -n "$((index + 1))p" "$SWEEP" 2>/dev/null)
    if [ -z "$line" ]; then
        echo "error: $SWEEP has no line for array element $index; submit the sweep again with jobs/sweep.sh" >&2
        exit 2
    fi
    read -r OUT_DIR EXTRA_ARGS <<<"$line"
    export SWEEP= SWEEP_INDEX=
}

# The torchrun agent of one node of a job on several nodes, as words one a line (to run on every node, by
# srun): NODES agents meet at the c10d rendezvous on ENDPOINT (host:port, on the first node) under the id
# RDZV_ID, each starting NPROC workers. The workers' ranks follow the order in which the agents joined.
job_torchrun_agent() {
    printf '%s\n' torchrun --nnodes="$1" --nproc_per_node="$2" --rdzv_backend=c10d --rdzv_endpoint="$3" \
        --rdzv_id="$4" --max_restarts=0
}

# What srun runs on every node of a multi-node job: the torchrun agent ($@), passing it the walltime warning
# (SIGUSR1, which srun forwards) as SIGTERM, which the agent hands to its workers. Slurm signals every
# process of the step, the workers too; this is for where the node's task alone hears it.
job_node_agent() {
    JOB_CHILD_SIGNAL=TERM
    job_run_forwarding "$@"
}

# Exits 2 with one line unless every chain file given is finished (or absent: a run trained outside these
# jobs). For the jobs that read finished runs.
job_require_finished() {
    local file state rest
    for file in "$@"; do
        [ -e "$file" ] || continue
        state=
        read -r state rest < "$file"
        if [ "$state" != finished: ]; then
            echo "error: $file says '$state $rest': that run is not finished; submit this job after its chain has" \
                 "ended (jobs/pipeline.sh does that for you)" >&2
            exit 2
        fi
    done
}

# PBS sites differ in how a job gets its software and starts its process. The .pbs files pass these on to
# every job of a chain (jobs/README.md has Blue Waters' values):
#   PBS_MODULES   modules to load first, e.g. "bwpy cudatoolkit" [none]
#   PBS_VENV      a Python virtual environment to activate [none: the login environment's python]
#   PBS_LAUNCHER  the command that starts the process on the compute node [aprun -n 1 -N 1 -d NCPUS where
#                 aprun exists (a Cray), else none: the job's shell runs on the compute node already]
job_pbs_setup() {
    local init
    if [ -n "${PBS_MODULES:-}" ]; then
        for init in /etc/profile.d/modules.sh /opt/modules/default/init/bash /usr/share/lmod/lmod/init/bash; do
            command -v module >/dev/null || [ ! -r "$init" ] || . "$init"
        done
        # Word splitting of the list is intended.
        # shellcheck disable=SC2086
        module load $PBS_MODULES ||
            { echo "error: module load $PBS_MODULES failed (PBS_MODULES); see \`module avail\`" >&2; exit 2; }
    fi
    if [ -n "${PBS_VENV:-}" ]; then
        [ -r "$PBS_VENV/bin/activate" ] && . "$PBS_VENV/bin/activate" ||
            { echo "error: PBS_VENV=$PBS_VENV has no bin/activate; give a virtual environment's folder" >&2; exit 2; }
    fi
    if [ -z "${PBS_LAUNCHER:-}" ] && command -v aprun >/dev/null; then
        PBS_LAUNCHER="aprun -n 1 -N 1 -d ${PBS_NUM_PPN:-${NCPUS:-1}}"
    fi
    # The words of PBS_LAUNCHER, to put before a command.
    read -ra job_launcher <<<"${PBS_LAUNCHER:-}"
}

# Seconds of walltime this PBS job asked for: Torque exports PBS_WALLTIME, PBS Pro answers through qstat.
job_pbs_walltime() {
    local w=${PBS_WALLTIME:-} h m s
    [ -n "$w" ] || w=$(job_pbs_field Resource_List.walltime)
    case $w in
        *[!0-9:]* | *::* | :* | *:) ;;  # unreadable: no warning
        *:*:*) IFS=: read -r h m s <<<"$w"; echo $((10#$h * 3600 + 10#$m * 60 + 10#$s)) ;;
        *:*) IFS=: read -r m s <<<"$w"; echo $((10#$m * 60 + 10#$s)) ;;
        *) echo "$w" ;;
    esac
}

# PBS has no early-warning signal like Slurm's --signal, and it SIGKILLs the job a site-specific grace
# period (seconds on some sites) after the walltime's SIGTERM: too short, perhaps, to checkpoint and
# resubmit. So the job warns itself STOP_MARGIN seconds early, with the USR1 that Slurm would send.
job_start_timer() {
    local walltime delay
    walltime=$(job_pbs_walltime)
    delay=$((${walltime:-0} - STOP_MARGIN))
    if [ "$delay" -le 0 ]; then
        job_log "walltime unknown or shorter than STOP_MARGIN=$STOP_MARGIN s: no warning before it; the walltime's" \
                "SIGTERM will end the chain like a qdel"
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

# The first signal decides: USR1 is the walltime warning; a TERM before it is a cancel or a preemption.
job_forward() {
    local to=$1
    [ "$1" != USR1 ] || to=$JOB_CHILD_SIGNAL
    # srun takes SIGTERM as "kill the tasks now"; a cancel has sent them SIGTERM itself already.
    [ "$to" != TERM ] || [ "${JOB_FORWARD_TERM:-1}" = 1 ] || to=
    [ -n "$job_stop_signal" ] || job_stop_signal=$1
    job_interrupted=1
    job_log "received SIG$1: asking the trainer to save a checkpoint and stop"
    [ -z "$job_child" ] || [ -z "$to" ] || kill -"$to" "$job_child" 2>/dev/null
}

# Runs COMMAND in the background, so that this shell is free to take the scheduler's signals and pass them
# on, and returns COMMAND's status.
job_run_forwarding() {
    local status s
    job_child="" job_stop_signal="" job_interrupted=""
    trap 'job_forward USR1' USR1
    trap 'job_forward TERM' TERM
    "$@" &
    job_child=$!
    # A signal that came before the child existed is passed on now.
    if [ -n "$job_stop_signal" ]; then
        [ "$job_stop_signal" = USR1 ] && kill -"$JOB_CHILD_SIGNAL" "$job_child" 2>/dev/null
        [ "$job_stop_signal" = TERM ] && [ "${JOB_FORWARD_TERM:-1}" = 1 ] && kill -TERM "$job_child" 2>/dev/null
    fi
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

# A fingerprint of the checkpoint file: its checksum, or "none".
job_checkpoint_sum() {
    { cksum < "$OUT_DIR/$JOB_NAME.ckpt"; } 2>/dev/null || echo none
}

# Ends the job: exit status $1, the chain's state $2, and the rest as a one-line message on stderr.
job_stop() {
    local status=$1 state=$2
    shift 2
    echo "$*" >&2
    job_set_state "$state"
    exit "$status"
}

run_chain() {
    local status before next resume job_timer=""
    job_check_numbers JOB_CHAIN MAX_CHAIN STOP_MARGIN
    job_check_vars || exit 2
    mkdir -p "$OUT_DIR" || { echo "error: cannot create OUT_DIR=$OUT_DIR; choose a writable folder" >&2; exit 2; }
    resume=$(job_submit_line 1)
    if [ -e "$OUT_DIR/STOP" ]; then
        job_log "$OUT_DIR/STOP exists: not starting; remove it and submit $JOB_SCRIPT again to continue"
        job_set_state "stopped: $OUT_DIR/STOP exists; remove it and continue with: $resume"
        exit 75
    fi
    job_log "$(job_id) on $(hostname), job $JOB_CHAIN of at most $MAX_CHAIN: $*"
    job_set_state "$(job_state_eta "running: job $(job_id), link $JOB_CHAIN of the chain, since $(date '+%F %T')")"
    before=$(job_checkpoint_sum)
    [ "$(job_scheduler)" != pbs ] || job_start_timer
    job_run_forwarding "$@"
    status=$?
    [ -z "$job_timer" ] || kill "$job_timer" 2>/dev/null
    job_log "the trainer exited with status $status"

    if [ "$status" -eq 0 ]; then
        job_log "the run is finished"
        job_set_state "finished: job $(job_id), link $JOB_CHAIN of the chain, at $(date '+%F %T')"
        job_release_follow_up
        exit 0
    fi
    if [ "$job_stop_signal" = TERM ]; then
        job_stop 75 "stopped: job $(job_id) was cancelled; continue with: $resume" \
            "job $(job_id) was cancelled (SIGTERM without the walltime warning before it): not resubmitting;" \
            "$OUT_DIR/$JOB_NAME.ckpt holds the run; to continue it: $resume"
    fi
    if [ "$status" -ne 75 ] && [ -z "$job_stop_signal" ]; then
        job_stop "$status" "failed: the trainer exited with status $status in job $(job_id); see its log" \
            "error: the trainer failed with status $status (see its message above); not resubmitting"
    fi
    if [ -e "$OUT_DIR/STOP" ]; then
        job_log "$OUT_DIR/STOP exists: not resubmitting; the checkpoint in $OUT_DIR resumes the run later"
        job_set_state "stopped: $OUT_DIR/STOP exists; remove it and continue with: $resume"
        exit 75
    fi
    if [ "$(job_checkpoint_sum)" = "$before" ]; then
        job_stop 75 "stopped: no progress in job $(job_id); continue with: $resume" \
            "error: job $(job_id) left $OUT_DIR/$JOB_NAME.ckpt as it found it: no progress, so not resubmitting;" \
            "give the job more time (start-up and at least one batch before the warning), then: $resume"
    fi
    if [ "$JOB_CHAIN" -ge "$MAX_CHAIN" ]; then
        job_stop 75 "stopped: MAX_CHAIN=$MAX_CHAIN jobs; continue with: $resume" \
            "error: this is job $JOB_CHAIN of MAX_CHAIN=$MAX_CHAIN; not resubmitting; raise MAX_CHAIN to go on"
    fi
    if ! next=$(job_resubmit); then
        job_stop 75 "stopped: resubmitting failed in job $(job_id); continue with: $resume" \
            "error: resubmitting $JOB_SCRIPT failed; submit it again by hand to continue from the checkpoint: $resume"
    fi
    job_set_state "$(job_state_eta "queued: job $next, link $((JOB_CHAIN + 1)) of the chain")"
    job_log "resubmitted $JOB_SCRIPT as job $next, link $((JOB_CHAIN + 1)) of the chain"
    exit 0
}
