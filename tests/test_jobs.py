"""The batch job scripts in jobs/ at the command-line level: they parse, they pass only flags the Python
scripts know; the chain logic of jobs/lib.sh resubmits a run stopped by the walltime (and only such a run)
with the same variables and resources, passes the scheduler's stop signal on, ends the chain on a cancel or
when a job made no progress, and releases the follow-up job once every run is finished; jobs/pipeline.sh
submits the four jobs in their order. The schedulers' commands (sbatch, scontrol, squeue, scancel, qsub,
qstat, qrls, qdel), the trainers, torchrun, aprun and module are small fakes on PATH; tests/test_slurm.py
runs the same files on a real Slurm."""
import contextlib
import io
import os
import re
import resource
import runpy
import shlex
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from conftest import REPO

JOBS = os.path.join(REPO, "jobs")
SHELL_FILES = sorted(f for f in os.listdir(JOBS) if f.endswith((".pbs", ".slurm", ".sh")))
PY_SCRIPTS = ("train_baseline.py", "train_gan.py", "visualize.py", "make_gif.py", "report.py")
TRAINING_JOBS = ("baseline.pbs", "gan.pbs", "baseline.slurm", "gan.slurm", "gan_multigpu.slurm", "gan_multinode.slurm")
SHELL_OPERATORS = {"||", "&&", ";", "|", "&"}


# ---------------------------------------------------------------------------------------------------------
# The files themselves


@pytest.mark.parametrize("name", SHELL_FILES)
def test_job_file_parses(name):
    result = subprocess.run(["bash", "-n", os.path.join(JOBS, name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def script_calls(path):
    """(script, subcommand or None, flags) for every call of a repository script in a job file: continuation
    lines joined, comments left out, the flags being the --words after the script up to a shell operator."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a line of a quoted text over several lines (an awk program): no call in it
            assert not any(script in line for script in PY_SCRIPTS), line
            continue
        for i, word in enumerate(words):
            if word not in PY_SCRIPTS:
                continue
            rest = []
            for w in words[i + 1:]:
                if w in SHELL_OPERATORS:
                    break
                rest.append(w)
            sub = rest[0] if rest and not rest[0].startswith(("-", "$")) else None
            calls.append((word, sub, [w.split("=")[0] for w in rest if w.startswith("--")]))
    return calls


ALL_CALLS = {name: script_calls(os.path.join(JOBS, name)) for name in SHELL_FILES}


@pytest.fixture(scope="module")
def help_texts():
    """What `python SCRIPT [SUBCOMMAND] --help` prints, for every call the jobs make of an existing script.
    Run in this process through runpy: it has imported torch already, a fresh interpreter would take seconds
    per script for that."""
    texts = {}
    for script, sub in {(script, sub) for calls in ALL_CALLS.values() for script, sub, _ in calls}:
        path = os.path.join(REPO, script)
        if not os.path.exists(path):
            continue
        out = io.StringIO()
        with mock.patch.object(sys, "argv", [path, *([sub] if sub else []), "--help"]), \
                contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            runpy.run_path(path, run_name="__main__")
        assert exit_.value.code in (0, None), f"{script} {sub or ''} --help failed:\n{out.getvalue()}"
        texts[script, sub] = out.getvalue()
    return texts


def test_the_jobs_call_every_trainer_visualize_and_report():
    called = {script for calls in ALL_CALLS.values() for script, _, _ in calls}
    assert {"train_baseline.py", "train_gan.py", "visualize.py", "make_gif.py", "report.py"} <= called


@pytest.mark.parametrize("name", [n for n in SHELL_FILES if ALL_CALLS[n]])
def test_every_flag_a_job_passes_exists(name, help_texts):
    for script, sub, flags in ALL_CALLS[name]:
        if (script, sub) not in help_texts:
            pytest.skip(f"{script} does not exist yet")
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_texts[script, sub]), \
                f"{name}: {script} {sub or ''} has no {flag}"


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_each_training_job_resubmits_itself_with_resume(name):
    with open(os.path.join(JOBS, name)) as f:
        text = f.read()
    assert re.search(rf"^JOB_SCRIPT=jobs/{re.escape(name)}$", text, re.M)
    # JOB_NAME names the trainer's checkpoint, <OUT_DIR>/<JOB_NAME>.ckpt, which the chain watches for progress.
    (script, _, flags), = ALL_CALLS[name]
    job_name = re.search(r"^JOB_NAME=(\w+)$", text, re.M).group(1)
    assert script == f"train_{job_name}.py"
    assert script.startswith("train_") and "--resume" in flags


# ---------------------------------------------------------------------------------------------------------
# The chain logic, with fakes on PATH

# sbatch and qsub: record the call (one a line, --test-only calls apart) and answer with a new job id as the
# real ones do, after a notice on stderr as sites' submit plugins print. TEST_ONLY_SAYS makes sbatch
# --test-only refuse with that message.
FAKE_SUBMIT = """#!/bin/bash
record=submitted
case " $* " in *" --test-only "*) record=tested ;; esac
printf '%q ' "$(basename "$0")" "$@" >> "$FAKES/$record"
echo >> "$FAKES/$record"
if [ "$record" = tested ]; then
    [ -z "$TEST_ONLY_SAYS" ] || { echo "allocation failure: $TEST_ONLY_SAYS" >&2; exit 1; }
    echo "sbatch: Job 99 to start at 2030-01-01T00:00:00" >&2; exit 0
fi
echo "$(basename "$0"): NOTICE: the site's submit plugin checked this job" >&2
id=$(( $(cat "$FAKES/last_id" 2>/dev/null || echo 1) + 1 ))
echo "$id" > "$FAKES/last_id"
case "$(basename "$0") $*" in qsub*) echo "$id.bw" ;; *--parsable*) echo "$id" ;; *) echo "Submitted batch job $id" ;; esac
"""

# scontrol show job -o / qstat -f: the record in $FAKES/record; scontrol release, qrls, scancel, qdel: recorded.
FAKE_QUERY = """#!/bin/bash
case "$(basename "$0") $1 $2" in
    "scontrol show hostnames") printf 'node7\\nnode8\\n' ;;
    "scontrol show"* | "qstat -f"*) cat "$FAKES/record" 2>/dev/null ;;
    squeue*) cat "$FAKES/squeue" 2>/dev/null ;;
    *) echo "$(basename "$0") $*" >> "$FAKES/other" ;;
esac
"""

# The trainers' contract in miniature: exit STATUS at once, or with "sleep" wait for SIGUSR1 or SIGTERM,
# append its name to $FAKES/signal and exit STATUS after STOP_DELAY seconds (the rest of a batch); stopping
# with 75 writes to the checkpoint PROGRESS (unless NO_PROGRESS is set). Arguments are recorded in
# $FAKES/args (and appended to $FAKES/calls), the environment in $FAKES/env. --check-flags finds every line ok.
FAKE_TRAINER = """#!/bin/bash
case " $* " in *" --check-flags "*) while IFS= read -r line; do echo ok; done; exit 0 ;; esac
printf '%q ' "$(basename "$0")" "$@" > "$FAKES/args"
cat "$FAKES/args" >> "$FAKES/calls"; echo >> "$FAKES/calls"
env > "$FAKES/env"
stop() {
    echo "$1" >> "$FAKES/signal"
    [ "$STATUS" != 75 ] || [ -n "$NO_PROGRESS" ] || echo "$1 $$" >> "$PROGRESS"
    sleep "${STOP_DELAY:-0}"
    exit "$STATUS"
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
case " $* " in *" sleep "*) ;; *) [ "$STATUS" != 75 ] || stop none ;; esac
case " $* " in *" sleep "*) ;; *) exit "$STATUS" ;; esac
touch "$FAKES/started"
for _ in $(seq 200); do sleep 0.05; done
exit 99
"""

FAKE_APRUN = """#!/bin/bash
while [ "${1#-}" != "$1" ]; do shift 2; done  # aprun's -n 1 -N 1 -d 16
exec "$@"
"""

FAKE_SRUN = """#!/bin/bash
echo "srun $*" > "$FAKES/srun"
while [ "${1#-}" != "$1" ]; do shift; done  # srun's --option=value
exec "$@"
"""

DRIVER = """. "$REPO/jobs/lib.sh"
JOB_SCRIPT=jobs/some.job
JOB_NAME=trainer
JOB_VARS="OUT_DIR EPOCHS EXTRA_ARGS"
run_chain trainer "$@"
"""

FAKES = {"qsub": FAKE_SUBMIT, "sbatch": FAKE_SUBMIT, "trainer": FAKE_TRAINER, "python": FAKE_TRAINER,
         "torchrun": FAKE_TRAINER, "aprun": FAKE_APRUN, "srun": FAKE_SRUN,
         "module": '#!/bin/bash\necho "module $*" >> "$FAKES/modules"\n'}
FAKES.update(dict.fromkeys(("scontrol", "qstat", "squeue", "scancel", "qrls", "qdel"), FAKE_QUERY))


@pytest.fixture
def fakes(tmp_path):
    """A folder FAKES with bin/ (the fakes above) and the driver script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "driver.sh").write_text(DRIVER)
    return tmp_path


def job_env(fakes, scheduler, status, name="trainer", **extra):
    """The environment of a job of the driver (or of the job file for run `name`) under `scheduler`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PBS_", "SBATCH_")) and k != "PYTHONUNBUFFERED"}
    env.update(PATH=f"{fakes / 'bin'}:{env['PATH']}", FAKES=str(fakes), REPO=REPO, STATUS=str(status),
               OUT_DIR=str(fakes / "run"), EPOCHS="7", EXTRA_ARGS="--seed 1 --lr 2e-4",
               PROGRESS=str(fakes / "run" / f"{name}.ckpt"), TEST_ONLY_SAYS="", NO_PROGRESS="")
    env.update({"slurm": {"SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": REPO},
                "pbs": {"PBS_JOBID": "1.bw", "PBS_O_WORKDIR": REPO}, None: {}}[scheduler])
    env.update(extra)
    return env


def without_notices(text):
    """The lines of a script's stderr other than the fake schedulers' notices."""
    return [line for line in text.splitlines() if ": NOTICE: " not in line]


def calls(fakes, name):
    """The recorded calls in $FAKES/name, each as its list of words."""
    path = fakes / name
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


def submitted(fakes):
    return calls(fakes, "submitted")


def option(call, name):
    """The value of --name=value in a recorded call, or None."""
    values = [w.split("=", 1)[1] for w in call if w.startswith(f"{name}=")]
    return values[-1] if values else None


def exported(call):
    """The NAME=value pairs a recorded qsub -v / sbatch --export call passes on."""
    spec = call[call.index("-v") + 1] if call[0] == "qsub" else option(call, "--export").removeprefix("ALL,")
    return dict(item.split("=", 1) for item in spec.split(","))


def chain_state(fakes, name="trainer"):
    return (fakes / "run" / f"{name}.chain").read_text()


def run_driver(fakes, scheduler, status, *args, **env):
    return subprocess.run(["bash", str(fakes / "driver.sh"), *args], env=job_env(fakes, scheduler, status, **env),
                          capture_output=True, text=True, timeout=30)


def run_job(fakes, name, scheduler, status, **env):
    """Runs the job file jobs/<name> as the scheduler would, the run's name taken from the file name."""
    run = name.split(".")[0].split("_")[0]
    return subprocess.run(["bash", os.path.join(JOBS, name)], env=job_env(fakes, scheduler, status, run, **env),
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_stopped_run_is_resubmitted_with_the_same_variables(fakes, scheduler):
    result = run_driver(fakes, scheduler, 75)
    assert result.returncode == 0, result.stderr
    (call,) = submitted(fakes)
    assert call[0] == {"pbs": "qsub", "slurm": "sbatch"}[scheduler] and call[-1] == "jobs/some.job"
    assert exported(call) == {"OUT_DIR": str(fakes / "run"), "EPOCHS": "7", "EXTRA_ARGS": "--seed 1 --lr 2e-4",
                              "MAX_CHAIN": "20", "STOP_MARGIN": "300", "FOLLOW_UP": "", "FOLLOW_UP_AFTER": "",
                              "JOB_CHAIN": "2"}
    job = {"pbs": "2.bw", "slurm": "2"}[scheduler]
    assert chain_state(fakes) == f"queued: job {job}, link 2 of the chain\n"
    assert "NOTICE: the site's submit plugin" in result.stderr  # passed through to the job's log, not into the id


@pytest.mark.parametrize("status", [0, 2, 1])
def test_finished_or_failed_run_is_not_resubmitted(fakes, status):
    result = run_driver(fakes, "slurm", status)
    assert result.returncode == status
    assert submitted(fakes) == []
    state = chain_state(fakes)
    if status:
        assert f"failed with status {status}" in result.stderr
        assert state.startswith(f"failed: the trainer exited with status {status} in job 1")
    else:
        assert state.startswith("finished: job 1, link 1 of the chain")


def test_the_trainer_runs_unbuffered(fakes):
    """Its lines reach the job's log as they are printed, not when it exits."""
    run_driver(fakes, "slurm", 0)
    assert "PYTHONUNBUFFERED=1" in (fakes / "env").read_text().splitlines()


SLURM_RECORD = ("JobId=1 JobName=gan UserId=me(1) Account=(null) QOS=normal JobState=RUNNING Partition=gpu "
                "TimeLimit=02:00:00 NumCPUs=4 CPUs/Task=4 Features=a100 TRES=cpu=4,mem=8G,node=1,billing=4 "
                "StdOut=/scratch/me/logs/gan-1.out MinMemoryNode=8G TresPerNode=gres:gpu:2 ")


def test_slurm_resubmits_with_the_resources_the_first_job_got(fakes):
    """Whatever the first sbatch was given (command line, #SBATCH lines, SBATCH_* variables) holds for the next
    job: the chain passes on what Slurm reports for this job, and nothing that Slurm reports as unset."""
    (fakes / "record").write_text(SLURM_RECORD + "\n")
    assert run_driver(fakes, "slurm", 75).returncode == 0
    (call,) = submitted(fakes)
    options = [w for w in call if w.startswith("--") and not w.startswith(("--export", "--parsable"))]
    assert "--parsable" in call and options == ["--job-name=gan", "--partition=gpu", "--qos=normal", "--constraint=a100", "--time=02:00:00",
                       "--cpus-per-task=4", "--mem=8G", "--gres=gpu:2", "--output=/scratch/me/logs/%x-%j.out"]


def test_slurm_keeps_a_job_without_gpus_without_them(fakes):
    """--gres=none given to the first job must not turn into the job file's --gres=gpu:1 in the next."""
    (fakes / "record").write_text(SLURM_RECORD.replace("TresPerNode=gres:gpu:2 ", "") + "\n")
    assert run_driver(fakes, "slurm", 75).returncode == 0
    (call,) = submitted(fakes)
    assert option(call, "--gres") == "none"


def test_pbs_resubmits_with_the_resources_the_first_job_got(fakes):
    (fakes / "record").write_text("Job Id: 1.bw\n    Job_Name = gan\n    queue = high\n    Account_Name = bazz\n"
                                  "    Resource_List.nodect = 1\n    Resource_List.nodes = 1:ppn=16:xk\n"
                                  "    Resource_List.walltime = 01:30:00\n")
    assert run_driver(fakes, "pbs", 75).returncode == 0
    (call,) = submitted(fakes)
    assert call[1:call.index("-v")] == ["-N", "gan", "-q", "high", "-A", "bazz", "-l", "walltime=01:30:00",
                                        "-l", "nodes=1:ppn=16:xk"]


@pytest.mark.parametrize("name", ["gan.slurm", "gan.pbs"])
def test_a_chain_of_real_job_scripts_runs_75_then_0_then_2(fakes, name):
    """The job script itself: python gets the same command every time; 75 resubmits with the variables,
    the next job's 0 ends the chain, and a 2 (bad input) fails the job."""
    scheduler = "slurm" if name.endswith(".slurm") else "pbs"
    first = run_job(fakes, name, scheduler, 75, WIDTH="128")
    assert first.returncode == 0, first.stdout + first.stderr
    (call,) = submitted(fakes)
    assert call[-1] == f"jobs/{name}"
    passed = exported(call)
    assert passed["WIDTH"] == "128" and passed["EPOCHS"] == "7" and passed["JOB_CHAIN"] == "2"
    args = (fakes / "args").read_text()
    assert args.startswith("python train_gan.py --resume") and "--width 128" in args and "--seed 1 --lr 2e-4" in args

    # The next job gets only what was passed on (and what the scheduler sets).
    for status, code in ((0, 0), (2, 2)):
        nxt = run_job(fakes, name, scheduler, status, **passed)
        assert nxt.returncode == code, nxt.stdout + nxt.stderr
        assert (fakes / "args").read_text() == args
        assert len(submitted(fakes)) == 1


def run_until_started(fakes, scheduler, status, preexec_fn=None, **env):
    proc = subprocess.Popen(["bash", str(fakes / "driver.sh"), "sleep"], env=job_env(fakes, scheduler, status, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    deadline = time.monotonic() + 10
    while not (fakes / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the fake trainer did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("child_signal", ["USR1", "TERM"])
def test_the_walltime_warning_reaches_the_trainer_and_resubmits(fakes, child_signal):
    """USR1 is the walltime warning; the trainer gets it as JOB_CHILD_SIGNAL (TERM for torchrun). A TERM after
    it (the walltime itself) changes nothing."""
    proc = run_until_started(fakes, "slurm", 75, JOB_CHILD_SIGNAL=child_signal, STOP_DELAY="1")
    proc.send_signal(signal.SIGUSR1)
    while not (fakes / "signal").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # while the trainer is still saving
    out, err = proc.communicate(timeout=10)
    assert (fakes / "signal").read_text().split()[0] == child_signal  # then the forwarded TERM, harmless
    assert proc.returncode == 0, out + err
    assert len(submitted(fakes)) == 1


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_a_cancel_ends_the_chain_and_says_how_to_continue(fakes, scheduler):
    """scancel/qdel send SIGTERM with no walltime warning before it: the trainer saves and the chain ends, the
    log and the chain file giving the command that continues it."""
    (fakes / "record").write_text(SLURM_RECORD if scheduler == "slurm" else "    queue = high\n")
    proc = run_until_started(fakes, scheduler, 75)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert (fakes / "signal").read_text().strip() == "TERM"
    assert proc.returncode == 75, out + err
    assert submitted(fakes) == []
    (message,) = err.splitlines()
    assert "was cancelled" in message and "not resubmitting" in message
    command = shlex.split(message.split("to continue it: ")[1])
    assert command[0] == {"slurm": "sbatch", "pbs": "qsub"}[scheduler] and command[-1] == "jobs/some.job"
    assert exported(command)["JOB_CHAIN"] == "1" and exported(command)["EPOCHS"] == "7"
    assert ("--time=02:00:00" in command) if scheduler == "slurm" else (command[1:3] == ["-q", "high"])
    assert chain_state(fakes).startswith("stopped: job 1")


def test_a_launcher_failing_after_the_walltime_warning_counts_as_stopped(fakes):
    """torchrun exits 1 after its workers stopped with 75."""
    proc = run_until_started(fakes, "slurm", 1)
    (fakes / "run" / "trainer.ckpt").write_text("saved by the workers")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, out + err
    assert len(submitted(fakes)) == 1


def test_a_job_that_made_no_progress_is_not_resubmitted(fakes):
    """A stop before the trainer could save anything (a signal during start-up, a limit too short) leaves the
    checkpoint as it was: another job would not get further."""
    (fakes / "run").mkdir()
    (fakes / "run" / "trainer.ckpt").write_text("epoch 3")
    result = run_driver(fakes, "slurm", 75, NO_PROGRESS="1")
    assert result.returncode == 75 and submitted(fakes) == []
    assert "no progress" in result.stderr and len(result.stderr.splitlines()) == 1
    assert chain_state(fakes).startswith("stopped: no progress in job 1")


def test_a_full_disk_for_the_chain_state_is_one_line_and_leaves_the_file_whole(fakes):
    """The disk fills while the trainer runs: RLIMIT_FSIZE 0 on the job's shell from then on (SIGXFSZ ignored, so
    that its writes fail with EFBIG as on a full disk or quota). The run finishes; the chain file keeps its last
    state whole, nothing is left beside it, and the job says in one line that it could not record the new one."""
    proc = run_until_started(fakes, "slurm", 0, preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, 0))
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, out + err
    state = chain_state(fakes).strip()
    assert state.startswith("running: job 1, link 1 of the chain") and os.listdir(fakes / "run") == ["trainer.chain"]
    (line,) = err.splitlines()
    assert line.startswith(f"error: cannot record the chain's state in {fakes / 'run' / 'trainer.chain'} (File too "
                           f"large); it still says '{state}', but the state is: finished: job 1, link 1 of the chain")


def test_pbs_job_asks_the_trainer_to_stop_before_its_walltime(fakes):
    proc = run_until_started(fakes, "pbs", 75, PBS_WALLTIME="00:00:03", STOP_MARGIN="2")
    out, err = proc.communicate(timeout=10)
    assert (fakes / "signal").read_text().strip() == "USR1"
    assert proc.returncode == 0, out + err
    assert [call[0] for call in submitted(fakes)] == ["qsub"]


def test_stop_file_ends_the_chain(fakes):
    (fakes / "run").mkdir()
    (fakes / "run" / "STOP").touch()
    result = run_driver(fakes, "pbs", 0)
    assert result.returncode == 75 and not (fakes / "args").exists()  # not started
    assert "STOP exists" in result.stdout

    (fakes / "run" / "STOP").unlink()
    proc = run_until_started(fakes, "pbs", 75)
    (fakes / "run" / "STOP").touch()  # while the job runs
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 75 and submitted(fakes) == []
    assert chain_state(fakes).startswith("stopped:")


def test_a_chain_stops_at_max_chain(fakes):
    result = run_driver(fakes, "slurm", 75, JOB_CHAIN="20")
    assert result.returncode == 75 and submitted(fakes) == []
    assert "MAX_CHAIN" in result.stderr


def test_outside_a_scheduler_a_stopped_run_says_how_to_continue(fakes):
    result = run_driver(fakes, None, 75)
    assert result.returncode == 75 and submitted(fakes) == []
    assert "submit it again by hand" in result.stderr


@pytest.mark.parametrize("name", ["gan.pbs", "baseline.slurm"])
def test_a_job_run_by_hand_says_how_to_continue_with_its_variables(fakes, name):
    """jobs/README: `bash jobs/gan.pbs` with its variables set, outside a scheduler. The command its log and chain
    file give, run as printed in a shell without those variables, trains the same run with the same flags."""
    run = name.split(".")[0]
    given = dict(DATA_DIR=str(fakes / "cifar 10"), WIDTH="128", EXTRA_ARGS="--seed 1 --lr 2e-4", MAX_CHAIN="5")
    first = subprocess.run(["bash", os.path.join(JOBS, name)], env=job_env(fakes, None, 75, run, **given), cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    assert first.returncode == 75, first.stdout + first.stderr
    args = (fakes / "args").read_text()
    line = first.stderr.split("to continue from the checkpoint: ")[1].strip()
    assert chain_state(fakes, run).endswith(f"continue with: {line}\n")
    assert line.endswith(f" bash jobs/{name}") and "EXTRA_ARGS='--seed 1 --lr 2e-4' " in line
    (fakes / "args").unlink()
    env = {k: v for k, v in job_env(fakes, None, 0, run).items() if k not in ("OUT_DIR", "EPOCHS", "EXTRA_ARGS")}
    again = subprocess.run(["bash", "-c", line], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (fakes / "args").read_text() == args and chain_state(fakes, run).startswith("finished:")


def test_a_comma_in_a_variable_is_refused_before_training(fakes):
    result = run_driver(fakes, "slurm", 0, EXTRA_ARGS="--layers 2,3")
    assert result.returncode == 2 and not (fakes / "args").exists()
    assert "comma" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Follow-up jobs


@pytest.mark.parametrize("scheduler, release", [("slurm", "scontrol release 7"), ("pbs", "qrls 7")])
def test_the_last_chain_to_finish_releases_the_follow_up(fakes, scheduler, release):
    other = fakes / "other.chain"
    other.write_text("running: job 5, link 3 of the chain\n")
    wait_for = f"{fakes / 'run' / 'trainer.chain'} {other}"
    result = run_driver(fakes, scheduler, 0, FOLLOW_UP="7", FOLLOW_UP_AFTER=wait_for)
    assert result.returncode == 0 and not (fakes / "other").exists()  # the other run is not finished: held
    assert "stays held" in result.stdout

    other.write_text("finished: job 5, link 3 of the chain\n")
    result = run_driver(fakes, scheduler, 0, FOLLOW_UP="7", FOLLOW_UP_AFTER=wait_for)
    assert result.returncode == 0
    assert (fakes / "other").read_text() == release + "\n"


@pytest.mark.parametrize("name", ["visualize.slurm", "visualize.pbs", "report.slurm", "report.pbs"])
def test_a_follow_up_refuses_a_run_that_is_not_finished(fakes, name):
    scheduler = "slurm" if name.endswith(".slurm") else "pbs"
    gan = fakes / "gan"
    gan.mkdir()
    (gan / "gan.chain").write_text("queued: job 12, link 2 of the chain\n")
    result = run_job(fakes, name, scheduler, 0, BASELINE_DIR=str(fakes), GAN_DIR=str(gan))
    assert result.returncode == 2 and not (fakes / "args").exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "gan.chain says 'queued: job 12" in line

    # Finished, or trained outside these jobs (no chain file): it runs.
    (gan / "gan.chain").write_text("finished: job 14, link 3 of the chain\n")
    result = run_job(fakes, name, scheduler, 0, BASELINE_DIR=str(fakes), GAN_DIR=str(gan))
    assert result.returncode == 0, result.stderr
    assert any(word.startswith(str(gan)) for call in calls(fakes, "calls") for word in call)


def test_visualize_writes_the_gif_where_report_reads_it(fakes):
    env = dict(OUT_DIR=str(fakes / "vis"), VIS_DIR=str(fakes / "vis"))
    assert run_job(fakes, "visualize.slurm", "slurm", 0, **env).returncode == 0
    make_gif = calls(fakes, "calls")[-1]
    assert run_job(fakes, "report.slurm", "slurm", 0, **env).returncode == 0
    report = calls(fakes, "calls")[-1]
    assert make_gif[make_gif.index("--output") + 1] == report[report.index("--gif") + 1]


# ---------------------------------------------------------------------------------------------------------
# The multi-GPU job


def test_the_multi_gpu_job_without_gpus_says_so_in_one_line(fakes):
    result = run_job(fakes, "gan_multigpu.slurm", "slurm", 0)
    assert result.returncode == 2 and not (fakes / "args").exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "--gres=gpu:N" in line and "NPROC" in line


@pytest.mark.parametrize("env, nproc", [({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"NPROC": "2"}, "2")])
def test_the_multi_gpu_job_starts_one_process_per_gpu_or_as_asked(fakes, env, nproc):
    result = run_job(fakes, "gan_multigpu.slurm", "slurm", 0, **env)
    assert result.returncode == 0, result.stderr
    args = shlex.split((fakes / "args").read_text())
    assert args[:3] == ["torchrun", "--standalone", f"--nproc_per_node={nproc}"] and args[3] == "train_gan.py"
