"""The batch job scripts in jobs/: they parse, they pass only flags the Python scripts know, and the chain
logic of jobs/lib.sh resubmits a stopped run (and only a stopped one) and passes the scheduler's stop signal
on to the trainer. qsub, sbatch, the trainers (and on PBS aprun and module) are small fakes on PATH."""
import contextlib
import io
import os
import re
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
PY_SCRIPTS = ("train_baseline.py", "train_gan.py", "visualize.py", "make_gif.py")
TRAINING_JOBS = ("baseline.pbs", "gan.pbs", "baseline.slurm", "gan.slurm", "gan_multigpu.slurm")
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
        words = shlex.split(line, comments=True)
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


def test_the_jobs_call_every_trainer_and_visualize():
    called = {script for calls in ALL_CALLS.values() for script, _, _ in calls}
    assert {"train_baseline.py", "train_gan.py", "visualize.py"} <= called


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
    (script, _, flags), = ALL_CALLS[name]
    assert script.startswith("train_") and "--resume" in flags


# ---------------------------------------------------------------------------------------------------------
# The chain logic, with fakes on PATH

FAKE_SUBMIT = """#!/bin/bash
# Records its command line, one call a line, and answers as the real one would.
printf '%q ' "$(basename "$0")" "$@" >> "$FAKES/submitted"
echo >> "$FAKES/submitted"
echo "Submitted batch job 2"
"""

# The trainers' contract in miniature: exit STATUS at once, or with "sleep" wait for SIGUSR1 or SIGTERM,
# write its name to $FAKES/signal and then exit STATUS. Arguments are recorded in $FAKES/args.
FAKE_TRAINER = """#!/bin/bash
printf '%q ' "$@" > "$FAKES/args"
trap 'echo USR1 > "$FAKES/signal"; exit "$STATUS"' USR1
trap 'echo TERM > "$FAKES/signal"; exit "$STATUS"' TERM
case " $* " in *" sleep "*) ;; *) exit "$STATUS" ;; esac
touch "$FAKES/started"
for _ in $(seq 200); do sleep 0.05; done
exit 99
"""

FAKE_APRUN = """#!/bin/bash
while [ "${1#-}" != "$1" ]; do shift 2; done  # aprun's -n 1 -N 1 -d 16
exec "$@"
"""

DRIVER = """. "$REPO/jobs/lib.sh"
JOB_SCRIPT=jobs/some.job
JOB_VARS="OUT_DIR EPOCHS EXTRA_ARGS"
run_chain trainer "$@"
"""


@pytest.fixture
def fakes(tmp_path):
    """A folder FAKES with bin/ (qsub, sbatch, trainer, python, aprun, module) and the driver script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("qsub", FAKE_SUBMIT), ("sbatch", FAKE_SUBMIT), ("trainer", FAKE_TRAINER),
                       ("python", FAKE_TRAINER), ("aprun", FAKE_APRUN), ("module", "#!/bin/bash\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "driver.sh").write_text(DRIVER)
    return tmp_path


def job_env(fakes, scheduler, status, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    env.update(PATH=f"{fakes / 'bin'}:{env['PATH']}", FAKES=str(fakes), REPO=REPO, STATUS=str(status),
               OUT_DIR=str(fakes / "run"), EPOCHS="7", EXTRA_ARGS="--seed 1 --lr 2e-4")
    env.update({"slurm": {"SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": REPO},
                "pbs": {"PBS_JOBID": "1.bw", "PBS_O_WORKDIR": REPO}, None: {}}[scheduler])
    env.update(extra)
    return env


def submitted(fakes):
    """The recorded qsub/sbatch calls, each as its list of words."""
    path = fakes / "submitted"
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


def exported(call):
    """The NAME=value pairs a recorded qsub -v / sbatch --export call passes on."""
    spec = call[2] if call[0] == "qsub" else call[1].removeprefix("--export=ALL,")
    return dict(item.split("=", 1) for item in spec.split(","))


def run_driver(fakes, scheduler, status, *args, **env):
    return subprocess.run(["bash", str(fakes / "driver.sh"), *args], env=job_env(fakes, scheduler, status, **env),
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_stopped_run_is_resubmitted_with_the_same_variables(fakes, scheduler):
    result = run_driver(fakes, scheduler, 75)
    assert result.returncode == 0, result.stderr
    (call,) = submitted(fakes)
    assert call[0] == {"pbs": "qsub", "slurm": "sbatch"}[scheduler] and call[-1] == "jobs/some.job"
    assert exported(call) == {"OUT_DIR": str(fakes / "run"), "EPOCHS": "7", "EXTRA_ARGS": "--seed 1 --lr 2e-4",
                              "MAX_CHAIN": "20", "STOP_MARGIN": "300", "JOB_CHAIN": "2"}


@pytest.mark.parametrize("status", [0, 2, 1])
def test_finished_or_failed_run_is_not_resubmitted(fakes, status):
    result = run_driver(fakes, "slurm", status)
    assert result.returncode == status
    assert submitted(fakes) == []
    if status:
        assert f"failed with status {status}" in result.stderr


@pytest.mark.parametrize("name", ["gan.slurm", "gan.pbs"])
def test_a_chain_of_real_job_scripts_runs_75_then_0_then_2(fakes, name):
    """The job script itself: python gets the same command every time; 75 resubmits with the variables,
    the next job's 0 ends the chain, and a 2 (bad input) fails the job."""
    scheduler = "slurm" if name.endswith(".slurm") else "pbs"
    env = job_env(fakes, scheduler, 75, WIDTH="128")
    first = subprocess.run(["bash", os.path.join(JOBS, name)], env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stdout + first.stderr
    (call,) = submitted(fakes)
    assert call[-1] == f"jobs/{name}"
    passed = exported(call)
    assert passed["WIDTH"] == "128" and passed["EPOCHS"] == "7" and passed["JOB_CHAIN"] == "2"
    args = (fakes / "args").read_text()
    assert args.startswith("train_gan.py --resume") and "--width 128" in args and "--seed 1 --lr 2e-4" in args

    # The next job gets only what was passed on (and what the scheduler sets).
    for status, code in ((0, 0), (2, 2)):
        env = job_env(fakes, scheduler, status, **passed)
        nxt = subprocess.run(["bash", os.path.join(JOBS, name)], env=env, capture_output=True, text=True, timeout=30)
        assert nxt.returncode == code, nxt.stdout + nxt.stderr
        assert (fakes / "args").read_text() == args
        assert len(submitted(fakes)) == 1


def run_until_started(fakes, scheduler, status, **env):
    proc = subprocess.Popen(["bash", str(fakes / "driver.sh"), "sleep"], env=job_env(fakes, scheduler, status, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (fakes / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the fake trainer did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_the_schedulers_signal_reaches_the_trainer(fakes, sig):
    proc = run_until_started(fakes, "slurm", 75)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert (fakes / "signal").read_text().strip() == sig.name.removeprefix("SIG")
    assert proc.returncode == 0, out + err
    assert len(submitted(fakes)) == 1


def test_a_launcher_failing_after_the_stop_signal_counts_as_stopped(fakes):
    """torchrun exits 1 after its workers stopped with 75."""
    proc = run_until_started(fakes, "slurm", 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, out + err
    assert len(submitted(fakes)) == 1


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
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 75 and submitted(fakes) == []


def test_a_chain_stops_at_max_chain(fakes):
    result = run_driver(fakes, "slurm", 75, JOB_CHAIN="20")
    assert result.returncode == 75 and submitted(fakes) == []
    assert "MAX_CHAIN" in result.stderr


def test_outside_a_scheduler_a_stopped_run_says_how_to_continue(fakes):
    result = run_driver(fakes, None, 75)
    assert result.returncode == 75 and submitted(fakes) == []
    assert "submit it again by hand" in result.stderr


def test_a_comma_in_a_variable_is_refused_before_training(fakes):
    result = run_driver(fakes, "slurm", 0, EXTRA_ARGS="--layers 2,3")
    assert result.returncode == 2 and not (fakes / "args").exists()
    assert "comma" in result.stderr
