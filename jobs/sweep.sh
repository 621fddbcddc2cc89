#!/usr/bin/env bash
# Submits a sweep: SEEDS seeds of each configuration, the baseline's and the GAN's runs each as one job array
# (Slurm --array, PBS -J or -t), every element a training chain of its own that resubmits itself at the
# walltime, in RUN_DIR/<config>/seed-K/; then compare.py (jobs/compare.slurm), held until every chain of the
# sweep has finished. Run it from the repository root on the login node, as jobs/pipeline.sh:
#   jobs/sweep.sh runs/seeds                                    # SEEDS=3 seeds of the default configuration
#   jobs/sweep.sh runs/width --config w196="--width 196" --config w128="--width 128 --epochs 400 | --width 128"
#   jobs/sweep.sh runs/variants --configs variants.txt
# A configuration is a name and flags: for train_gan.py, then after " | " those for train_baseline.py (without
# "|", both take the same flags; "FLAGS |" gives the baseline none). A --configs file has one a line,
# "NAME FLAGS [| FLAGS]"; "#" starts a comment. Seeds are 0 to SEEDS-1 (--seed K). Without a configuration:
# one named "default", no flags. Running the same command again continues the sweep from the checkpoints.
#
# Settings, as environment variables (defaults in brackets), otherwise those of jobs/pipeline.sh:
#   SEEDS                       seeds per configuration [3]
#   RUNS                        which trainers: "baseline gan", "gan" or "baseline" [baseline gan]
#   SCHEDULER, DATA_DIR, WIDTH, BASELINE_EPOCHS, GAN_EPOCHS, BASELINE_ARGS, GAN_ARGS (before each
#   configuration's flags), SUBMIT_OPTS, BASELINE_OPTS, GAN_OPTS, STOP_MARGIN, MAX_CHAIN,
#   PBS_MODULES, PBS_VENV, PBS_LAUNCHER
#   COMPARE_ARGS, COMPARE_OPTS  compare.py's flags, the comparison job's options
#   PBS_ARRAY                   PBS: the array option, -J (PBS Pro, OpenPBS) or -t (Torque) [-J]
set -euo pipefail

RUN_DIR=${1:-}
[ -n "$RUN_DIR" ] && [ "${RUN_DIR#-}" = "$RUN_DIR" ] ||
    { echo "error: give the sweep's folder first: jobs/sweep.sh runs/NAME [--config NAME=\"FLAGS\"]..." >&2; exit 2; }
shift
SEEDS=${SEEDS:-3}
RUNS=${RUNS:-baseline gan}
COMPARE_ARGS=${COMPARE_ARGS:-}
COMPARE_OPTS=${COMPARE_OPTS:-}
PBS_ARRAY=${PBS_ARRAY:--J}
# The other settings' defaults: jobs/defaults.sh (through jobs/lib.sh) and jobs/submit.sh.

. jobs/lib.sh 2>/dev/null && . jobs/submit.sh || { echo "error: run jobs/sweep.sh from the repository root" >&2; exit 2; }

names=() gan_flags=() baseline_flags=()
add_config() {
    local name=${1%%=*} flags=${1#*=}
    [ "$name" != "$1" ] || fail "--config $1: give NAME=\"FLAGS\""
    case $name in "" | *[!A-Za-z0-9._-]* | .*) fail "configuration name '$name': use letters, digits, . _ -" ;; esac
    case $flags in *$'\r'*) fail "configuration $name: its flags hold a carriage return; remove it" ;; esac
    case " ${names[*]:-} " in *" $name "*) fail "configuration $name is given twice" ;; esac
    case $flags in *,*) fail "configuration $name: '$flags' contains a comma, which sbatch --export and qsub -v cannot pass on" ;; esac
    names+=("$name")
    if [ "${flags#*|}" != "$flags" ]; then
        gan_flags+=("$(echo ${flags%%|*})") baseline_flags+=("$(echo ${flags#*|})")
    else
        gan_flags+=("$(echo $flags)") baseline_flags+=("$(echo $flags)")
    fi
}
while [ $# -gt 0 ]; do
    case $1 in
        --config) [ $# -ge 2 ] || fail "--config needs NAME=\"FLAGS\""; add_config "$2"; shift 2 ;;
        --config=*) add_config "${1#--config=}"; shift ;;
        --configs)
            [ $# -ge 2 ] && [ -r "$2" ] || fail "--configs needs a readable file of lines NAME FLAGS [| FLAGS]"
            while read -r line || [ -n "$line" ]; do
                line=${line%$'\r'}  # a file written on Windows ends its lines in CR LF
                line=${line%%#*}
                [ -n "${line// /}" ] || continue
                read -r name flags <<<"$line"
                add_config "$name=$flags"
            done < "$2"
            shift 2 ;;
        *) fail "unknown argument '$1': jobs/sweep.sh RUN_DIR [--config NAME=\"FLAGS\"]... [--configs FILE]" ;;
    esac
done
[ ${#names[@]} -gt 0 ] || add_config "default="

case $RUN_DIR in *[[:space:],]*) fail "RUN_DIR '$RUN_DIR' contains a space or a comma; choose a plain path" ;; esac
check_common DATA_DIR WIDTH BASELINE_EPOCHS GAN_EPOCHS BASELINE_ARGS GAN_ARGS COMPARE_ARGS PBS_MODULES PBS_VENV \
    PBS_LAUNCHER --numbers SEEDS WIDTH BASELINE_EPOCHS GAN_EPOCHS STOP_MARGIN MAX_CHAIN
[ "$SEEDS" -ge 1 ] || fail "SEEDS=$SEEDS: give at least 1"
for run in $RUNS; do case $run in baseline | gan) ;; *) fail "RUNS='$RUNS': name baseline, gan or both" ;; esac; done
[ -n "${RUNS// /}" ] || fail "RUNS is empty: name baseline, gan or both"
case $PBS_ARRAY in -J | -t) ;; *) fail "PBS_ARRAY=$PBS_ARRAY: use -J (PBS Pro, OpenPBS) or -t (Torque)" ;; esac
# Each configuration's command line as its jobs will run it (seed 0 standing for all), checked by the trainer
for run in $RUNS; do
    checks=()
    for c in "${!names[@]}"; do
        if [ "$run" = gan ]; then flags="$GAN_ARGS ${gan_flags[c]}" epochs=$GAN_EPOCHS
        else flags="$BASELINE_ARGS ${baseline_flags[c]}" epochs=$BASELINE_EPOCHS; fi
        checks+=("configuration ${names[c]}" "--resume --data-dir $DATA_DIR --out-dir $RUN_DIR/${names[c]}/seed-0 \
--epochs $epochs --width $WIDTH $flags --seed 0")
    done
    check_flags "$run" "${checks[@]}"
done

elements=$((${#names[@]} * SEEDS))
# Each trainer's table: line i+1 is array element i, "OUT_DIR FLAGS" (jobs/lib.sh's job_sweep_element).
chains=()
mkdir -p "$RUN_DIR"
for run in $RUNS; do
    table=
    for c in "${!names[@]}"; do
        for ((k = 0; k < SEEDS; k++)); do
            dir=$RUN_DIR/${names[c]}/seed-$k
            [ ! -e "$dir/STOP" ] || fail "$dir/STOP exists and would stop that chain at once; remove it"
            if [ "$run" = gan ]; then flags="$GAN_ARGS ${gan_flags[c]}"; else flags="$BASELINE_ARGS ${baseline_flags[c]}"; fi
            table+="$(echo "$dir" $flags --seed "$k")"$'\n'
            chains+=("$dir/$run.chain")
        done
    done
    write_state "$RUN_DIR/$run.sweep" "${table%$'\n'}"
done

pbs_vars=
[ "$SCHEDULER" != pbs ] || pbs_vars=",PBS_MODULES=$PBS_MODULES,PBS_VENV=$PBS_VENV,PBS_LAUNCHER=$PBS_LAUNCHER"
compare_vars="SWEEP_DIR=$RUN_DIR,CHAINS=${chains[*]},EXTRA_ARGS=$COMPARE_ARGS$pbs_vars"
array_vars() {
    local epochs=$BASELINE_EPOCHS
    [ "$1" != gan ] || epochs=$GAN_EPOCHS
    local vars="DATA_DIR=$DATA_DIR,MAX_CHAIN=$MAX_CHAIN,STOP_MARGIN=$STOP_MARGIN,WIDTH=$WIDTH,EPOCHS=$epochs"
    echo "$vars$pbs_vars,SWEEP=$RUN_DIR/$1.sweep,SWEEP_INDEX=$2,FOLLOW_UP=$compare,FOLLOW_UP_AFTER=${chains[*]}"
}
# An old chain file saying "finished" must not release the comparison before this sweep's chain has run.
reset_states() {
    local file
    for file in "${chains[@]}"; do write_state "$file" "queued: submitted by jobs/sweep.sh at $(date '+%F %T')"; done
}
# One element is a plain job (PBS Pro refuses an array of one); more are an array.
if [ "$elements" -gt 1 ]; then index= range=0-$((elements - 1)); else index=0 range=; fi

declare -A arrays
# Word splitting of the *_OPTS is intended: they are lists of options.
# shellcheck disable=SC2086
if [ "$SCHEDULER" = slurm ]; then
    logs=$RUN_DIR/logs
    mkdir -p "$logs"
    unset SBATCH_SIGNAL
    compare=$(slurm_submit jobs/compare.slurm "$compare_vars" $SUBMIT_OPTS $COMPARE_OPTS --output="$logs/%x-%j.out" \
        -- --hold)
    submitted+=("$compare")
    export SBATCH_SIGNAL="B:USR1@$STOP_MARGIN"
    reset_states
    for run in $RUNS; do
        opts=BASELINE_OPTS
        [ "$run" != gan ] || opts=GAN_OPTS
        arrays[$run]=$(slurm_submit "jobs/$run.slurm" "$(array_vars "$run" "$index")" $SUBMIT_OPTS ${!opts} \
            --output="$logs/%x-%A_%a.out" ${range:+--array=$range})
        submitted+=("${arrays[$run]}")
    done
    slurm_check_pending
    where="logs in $logs/<name>-<array job>_<element>.out"
else
    compare=$(pbs_submit jobs/compare.pbs "$compare_vars" $SUBMIT_OPTS $COMPARE_OPTS -h)
    submitted+=("$compare")
    reset_states
    for run in $RUNS; do
        opts=BASELINE_OPTS
        [ "$run" != gan ] || opts=GAN_OPTS
        arrays[$run]=$(pbs_submit "jobs/$run.pbs" "$(array_vars "$run" "$index")" $SUBMIT_OPTS ${!opts} \
            ${range:+$PBS_ARRAY $range})
        submitted+=("${arrays[$run]}")
    done
    where="logs <name>.o<job id> in the submit directory"
fi

echo "Submitted to $SCHEDULER: ${#names[@]} configuration(s) x $SEEDS seed(s) under $RUN_DIR ($where):"
for run in $RUNS; do
    echo "  $run  job ${arrays[$run]}${range:+, elements $range}  -> $RUN_DIR/<config>/seed-K/ (one chain each, $run.chain)"
done
for c in "${!names[@]}"; do
    echo "    ${names[c]}: gan ${gan_flags[c]:-(no flags)}; baseline ${baseline_flags[c]:-(no flags)}"
done
echo "  compare  job $compare  -> compare.py $RUN_DIR, held until all ${#chains[@]} chains have finished"
echo "Element i of an array is configuration i / $SEEDS, seed i % $SEEDS (the lines of $RUN_DIR/<run>.sweep)."
echo "Stop one run: touch its folder's STOP; stop all: cancel the arrays (and the comparison)."
eta=()
for c in "${!names[@]}"; do
    for ((k = 0; k < SEEDS; k++)); do
        for run in $RUNS; do
            epochs=$BASELINE_EPOCHS
            [ "$run" != gan ] || epochs=$GAN_EPOCHS
            eta+=("${names[c]}/seed-$k $run" "$RUN_DIR/${names[c]}/seed-$k/${run}_metrics.jsonl" "$epochs")
        done
    done
done
plan_eta "${eta[@]}"
