# The recipe's and the chains' defaults, in one place: every job file (through jobs/lib.sh), jobs/pipeline.sh and
# jobs/sweep.sh read them (sourced, bash). A variable already set (sbatch --export, qsub -v, the environment)
# wins. The trainers' own defaults are the same numbers.

DATA_DIR=${DATA_DIR:-data}               # CIFAR-10
WIDTH=${WIDTH:-196}                      # --width of both trainers
BASELINE_EPOCHS=${BASELINE_EPOCHS:-100}  # a baseline job's EPOCHS
GAN_EPOCHS=${GAN_EPOCHS:-200}            # a GAN job's EPOCHS; the assignment: 200 at width 196, 400 at width 128
MAX_CHAIN=${MAX_CHAIN:-20}               # more jobs than this is a loop, not a long run: stop
STOP_MARGIN=${STOP_MARGIN:-300}          # PBS: seconds before the walltime at which the trainer is asked to stop
