"""The job files on a real Slurm: jobs submitted as jobs/README.md says, at smoke size (width 8, 256 images,
2-minute time limits with the walltime warning 60 s before the end): a GAN chain, the pipeline, a 3-seed
sweep (with the multi-node job on this one node alongside), and the PBS files through Debian's Torque
commands over this Slurm (slurm-wlm-torque; skipped without them).

It needs the one-node test cluster that .ci/slurm/start sets up (ClusterName=jobs-test; .ci/run starts it):
    .ci/slurm/start /tmp/slurm && SLURM_CONF=/tmp/slurm/slurm.conf python -m pytest -q tests/test_slurm.py
and is skipped where no Slurm answers, or where the Slurm that answers is another cluster (no jobs are sent
to a real one). The jobs run in a copy of the repository's scripts under the test's temporary folder."""
import datetime
import glob
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import REPO, write_image_folder

TEST_CLUSTER = "jobs-test"
LIMITS = ["--time=2", "--cpus-per-task=1", "--mem=1G"]  # the overrides given to the first submission
MARGIN = 60  # seconds of warning before the time limit: a job runs for 30 to 60 s (Slurm checks every 30 s)
SMOKE = "--limit-train 256 --limit-test 100"
EPOCH_LINE = re.compile(r"^\s+(\d+)\s+\d\.\d{4}\s", re.M)  # a row of the trainers' per-epoch table
WAIT = 240  # seconds: the longest wait for one event before the test gives up


def cluster_name():
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^ClusterName\s*=\s*(\S+)", result.stdout, re.M)
    return found.group(1) if result.returncode == 0 and found else None


pytestmark = pytest.mark.skipif(cluster_name() != TEST_CLUSTER,
                                reason=f"no Slurm test cluster ({TEST_CLUSTER}) answers: .ci/slurm/start sets one up")


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60, **kwargs).stdout


def job_record(job):
    """scontrol's fields of a job (finished ones stay visible for an hour on the test cluster)."""
    line = run("scontrol", "show", "job", "-o", str(job))
    return dict(re.findall(r"(\S+?)=(\S*)", line))


def job_state(job):
    return job_record(job)["JobState"]


def job_time(job, field):
    return datetime.datetime.fromisoformat(job_record(job)[field])


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def wait_for(what, check, poll=1.0):
    """Polls check() until it returns something true, and returns that; fails after WAIT seconds."""
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=WAIT)
    while datetime.datetime.now() < deadline:
        value = check()
        if value:
            return value
        subprocess.run(["sleep", str(poll)])
    pytest.fail(f"waited {WAIT} s for {what}")


def next_link(log):
    """The job id the chain resubmitted, from a job's log, or None."""
    found = re.search(r"resubmitted jobs/\S+ as job (\d+)", read(log))
    return found and found.group(1)


def ended(job):
    return job_state(job) not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")


def epoch_line_while_running(job, log):
    """Waits until the job's log shows a row of the epoch table; returns whether the job was still running
    after the row was read (so the row was written while it ran, not flushed at its exit)."""
    wait_for(f"an epoch row in {log}", lambda: EPOCH_LINE.search(read(log)) or ended(job))
    return job_state(job) == "RUNNING" and EPOCH_LINE.search(read(log)) is not None


LIBRARY = ("training", "metrics", "reporting", "torch_utils")  # the packages the scripts import


@pytest.fixture
def workdir(tmp_path, capsys):
    """A submit directory with the repository's scripts, their packages and a small image-folder data set; afterwards every
    job still alive from it is cancelled."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for path in glob.glob(os.path.join(REPO, "*.py")):
        shutil.copy(path, repo)
    for folder in ("jobs", *LIBRARY):
        shutil.copytree(os.path.join(REPO, folder), repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_image_folder(tmp_path / "data", train_per_class=30, test_per_class=10)
    yield repo
    for line in run("squeue", "-h", "-o", "%i %Z").splitlines():
        job, folder = line.split(maxsplit=1)
        if folder == str(repo):
            subprocess.run(["scancel", job])


def say(capsys, text):
    """A line on the terminal, also under pytest -q: the submitted job ids belong in the CI log."""
    with capsys.disabled():
        print(f"\n[slurm] {text}", flush=True)


def submit_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_JOB", "SBATCH_", "PYTHONUNBUFFERED"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_a_gan_chain_resubmits_at_the_walltime_with_its_overrides_and_ends_on_scancel(workdir, capsys):
    out = workdir / "gan"
    data = workdir.parent / "data"
    first = run("sbatch", "--parsable", *LIMITS,
                f"--export=ALL,DATA_DIR={data},OUT_DIR={out},EPOCHS=500,WIDTH=8,EXTRA_ARGS={SMOKE}",
                "jobs/gan.slurm", cwd=workdir, env=submit_env(SBATCH_SIGNAL=f"B:USR1@{MARGIN}")).strip()
    log1 = workdir / f"gan-{first}.out"
    say(capsys, f"GAN chain: job {first} submitted with {' '.join(LIMITS)}, the warning {MARGIN} s early")
    assert epoch_line_while_running(first, log1), read(log1)

    # Slurm's own walltime warning ends the first job, which resubmits the chain.
    second = wait_for(f"job {first} to resubmit the chain", lambda: next_link(log1) or (ended(first) and "none"))
    assert second != "none", read(log1)
    say(capsys, f"GAN chain: job {first} was warned of its time limit and resubmitted the chain as job {second}")
    assert "received SIGUSR1" in read(log1) and "stopped by SIGUSR1" in read(log1)
    record = job_record(second)
    assert record["TimeLimit"] == "00:02:00" and record["CPUs/Task"] == "1" and "mem=1G" in record["TRES"]
    assert record["TresPerNode"] == "gres:gpu:1"  # the job file's own request holds as well

    log2 = workdir / f"gan-{second}.out"
    assert epoch_line_while_running(second, log2), read(log2)
    assert re.search(r"resuming \S+gan.ckpt at epoch \d+", read(log2))
    run("scancel", second)
    wait_for(f"job {second} to end", lambda: ended(second))
    text = read(log2)
    say(capsys, f"GAN chain: scancel {second} ended the chain; its log: {text.splitlines()[-1][:100]}...")
    assert "was cancelled" in text and "not resubmitting" in text and next_link(log2) is None
    assert read(out / "gan.chain").startswith(f"stopped: job {second} was cancelled")
    assert not [line for line in run("squeue", "-h", "-o", "%Z").splitlines() if line == str(workdir)]

    # The command the log gives continues the run from its checkpoint.
    command = text.split("to continue it: ")[1].strip()
    result = subprocess.run(["bash", "-c", command], cwd=workdir,
                            env=submit_env(SBATCH_SIGNAL=f"B:USR1@{MARGIN}"), capture_output=True, text=True)
    third = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    log3 = workdir / f"gan-{third}.out"
    say(capsys, f"GAN chain: the command from the log submitted job {third}")
    wait_for(f"job {third} to resume", lambda: "resuming" in read(log3) or ended(third))
    assert re.search(r"resuming \S+gan.ckpt at epoch \d+", read(log3)), read(log3)
    assert job_record(third)["TimeLimit"] == "00:02:00"
    run("scancel", third)
    wait_for(f"job {third} to end", lambda: ended(third))


def test_the_pipeline_runs_visualize_and_report_only_after_the_whole_chain(workdir, capsys):
    epochs = 8
    run_dir = workdir / "runs" / "smoke"
    result = subprocess.run(
        ["jobs/pipeline.sh", str(run_dir)], cwd=workdir, capture_output=True, text=True, timeout=120,
        env=submit_env(DATA_DIR=str(workdir.parent / "data"), WIDTH="8", BASELINE_EPOCHS="2",
                       GAN_EPOCHS=str(epochs), BASELINE_ARGS=SMOKE, GAN_ARGS=SMOKE,
                       VISUALIZE_ARGS="--iterations 2 --layers 2 --batch-size 20", SUBMIT_OPTS=" ".join(LIMITS),
                       STOP_MARGIN=str(MARGIN)))
    assert result.returncode == 0, result.stderr
    jobs = dict(re.findall(r"^\s+(baseline|gan|visualize|report)\s+job (\d+)", result.stdout, re.M))
    say(capsys, f"pipeline: jobs {jobs}")
    assert job_state(jobs["visualize"]) == "PENDING" and job_record(jobs["visualize"])["Reason"] == "JobHeldUser"

    # A second link for sure: the warning Slurm would send, sent as soon as the first link has trained.
    logs = run_dir / "logs"
    first = jobs["gan"]
    assert epoch_line_while_running(first, logs / f"gan-{first}.out")
    run("scancel", "--batch", "--signal=USR1", first)
    links = [first]
    while True:
        job = links[-1]
        wait_for(f"GAN link {job} to end", lambda: ended(job))
        nxt = next_link(logs / f"gan-{job}.out")
        if nxt is None:
            break
        links.append(nxt)
    say(capsys, f"pipeline: the GAN chain took jobs {links}")
    assert len(links) >= 2 and job_state(links[-1]) == "COMPLETED"

    wait_for("report to end", lambda: ended(jobs["report"]))
    vis = jobs["visualize"]
    assert job_state(vis) == "COMPLETED", read(logs / f"visualize-{vis}.out")
    assert job_time(vis, "StartTime") >= job_time(links[-1], "EndTime")
    assert "released follow-up job " + vis in read(logs / f"gan-{links[-1]}.out") + read(
        logs / f"baseline-{jobs['baseline']}.out")

    gan = run_dir / "gan"
    with open(gan / "gan_metrics.jsonl") as f:
        finished = [r["epoch"] for r in map(json.loads, f) if r["type"] == "epoch"]
    assert finished == list(range(1, epochs + 1))
    assert sorted(os.listdir(gan / "output")) == [f"{e:03d}.png" for e in range(epochs)]
    assert Image.open(run_dir / "visualization" / "progress.gif").n_frames == epochs
    assert glob.glob(f"{run_dir}/**/*.tmp", recursive=True) == []
    # report.py's --baseline-dir, --gan-dir and --gif.
    assert job_state(jobs["report"]) == "COMPLETED", read(logs / f"report-{jobs['report']}.out")
    assert (run_dir / "report" / "report.md").exists()


@pytest.mark.parametrize("gan_opts, says", [("--cpus-per-task=64", "no node can run jobs/"),
                                            ("--time=13:00:00", "would wait forever: Slurm says Partition")])
def test_the_pipeline_refuses_a_request_that_no_node_can_run(workdir, gan_opts, says):
    result = subprocess.run(["jobs/pipeline.sh", "runs/big"], cwd=workdir, capture_output=True, text=True,
                            timeout=120, env=submit_env(GAN_OPTS=gan_opts))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and says in result.stderr
    assert [line for line in run("squeue", "-h", "-o", "%Z").splitlines() if line == str(workdir)] == []


# ---------------------------------------------------------------------------------------------------------
# A sweep as job arrays


def test_a_sweep_of_three_seeds_runs_to_the_end_and_the_comparison_reads_it(workdir, capsys):
    # Alongside, on the CPUs: the multi-node job on this one node, its srun starting one agent with 2 workers,
    # warned of its time limit as soon as it has trained (below).
    data = workdir.parent / "data"
    multinode = run("sbatch", "--parsable", *LIMITS, "--nodes=1", "--gres=none",
                    f"--export=ALL,NPROC=2,DATA_DIR={data},OUT_DIR={workdir / 'multinode'},EPOCHS=6,WIDTH=8,"
                    f"EXTRA_ARGS={SMOKE}", "jobs/gan_multinode.slurm", cwd=workdir,
                    env=submit_env(SBATCH_SIGNAL=f"B:USR1@{MARGIN}")).strip()
    run_dir = workdir / "runs" / "seeds"
    result = subprocess.run(
        ["jobs/sweep.sh", str(run_dir), "--config", "w8=--width 8"], cwd=workdir, capture_output=True, text=True,
        timeout=120, env=submit_env(SEEDS="3", DATA_DIR=str(workdir.parent / "data"), BASELINE_EPOCHS="1",
                                    GAN_EPOCHS="2", BASELINE_ARGS=SMOKE, GAN_ARGS=SMOKE,
                                    SUBMIT_OPTS=" ".join(LIMITS), STOP_MARGIN=str(MARGIN)))
    assert result.returncode == 0, result.stderr
    jobs = dict(re.findall(r"^\s+(baseline|gan|compare)\s+job (\d+)", result.stdout, re.M))
    say(capsys, f"sweep: jobs {jobs}")
    assert job_record(jobs["compare"])["Reason"] == "JobHeldUser"
    assert job_record(f"{jobs['gan']}_2")["ArrayTaskId"] == "2"  # an array of three

    log = workdir / f"gan-multinode-{multinode}.out"
    assert epoch_line_while_running(multinode, log), read(log)
    run("scancel", "--batch", "--signal=USR1", multinode)
    say(capsys, f"multi-node job {multinode}: the walltime warning sent after its first epoch")

    seeds = [run_dir / "w8" / f"seed-{k}" for k in range(3)]
    chains = [seed / f"{name}.chain" for seed in seeds for name in ("baseline", "gan")]
    wait_for("every chain of the sweep to finish",
             lambda: all(read(chain).startswith("finished:") for chain in chains), poll=3)
    wait_for("the comparison to end", lambda: ended(jobs["compare"]))
    say(capsys, f"sweep: the chains finished; compare job {jobs['compare']}: {job_state(jobs['compare'])}")

    last_end = max(job_time(re.search(r"job (\S+),", read(chain)).group(1), "EndTime") for chain in chains)
    assert job_time(jobs["compare"], "StartTime") >= last_end
    for k, seed in enumerate(seeds):
        with open(seed / "gan_metrics.jsonl") as f:
            assert [r["epoch"] for r in map(json.loads, f) if r["type"] == "epoch"] == [1, 2]
        assert (seed / "cifar10.model").exists() and (seed / "generator.model").exists()
    logs = run_dir / "logs"
    assert read(run_dir / "gan.sweep").splitlines()[2].endswith("--width 8 --seed 2")
    assert EPOCH_LINE.search(read(logs / f"gan-{jobs['gan']}_2.out"))  # each element's own log
    first, second = (checkpoint_weights(seed / "generator.model") for seed in seeds[:2])
    assert any(not (a == b).all() for a, b in zip(first, second)), "two seeds trained the same generator"

    wait_for(f"the multi-node job {multinode} to end", lambda: ended(multinode))
    text = read(log)
    assert re.search(r"srun --ntasks-per-node=1 .*torchrun --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d "
                     rf"--rdzv_endpoint={re.escape(job_record(multinode)['NodeList'])}:\d+", text), text
    # The batch shell's and the node's task's lines: srun forwarded the warning, the workers saved and stopped.
    assert text.count("received SIGUSR1") >= 2 and "stopped by " in text, text
    second = wait_for("the multi-node chain to resubmit", lambda: next_link(log))
    wait_for(f"the multi-node job {second} to end", lambda: ended(second))
    assert job_state(second) == "COMPLETED", read(workdir / f"gan-multinode-{second}.out")
    assert read(workdir / "multinode" / "gan.chain").startswith(f"finished: job {second}")
    with open(workdir / "multinode" / "gan_metrics.jsonl") as f:
        assert [r["epoch"] for r in map(json.loads, f) if r["type"] == "epoch"] == list(range(1, 7))

    compare_log = read(logs / f"compare-{jobs['compare']}.out")
    assert job_state(jobs["compare"]) == "COMPLETED", compare_log
    with open(run_dir / "compare.json") as f:
        row, = json.load(f)["configurations"]
    assert row["config"] == "w8" and row["baseline"]["test_acc"]["n"] == 3 and row["gan"]["test_acc"]["n"] == 3
    assert (run_dir / "compare.md").exists() and (run_dir / "compare.png").exists()


def checkpoint_weights(path):
    import torch
    return list(torch.load(path, weights_only=True)["state_dict"].values())


# ---------------------------------------------------------------------------------------------------------
# PBS, through Debian's Torque commands over this Slurm (slurm-wlm-torque)

# What a site's PBS does and the wrappers do not: a job's PBS_JOBID and PBS_O_WORKDIR (and PBS_ARRAYID), and
# qsub -v values with spaces (the wrapper would split them into words of sbatch's command line). The qsub
# here hands the -v variables over with the environment (-V) instead; the job's shell reads PBS_ENV first.
PBS_QSUB = """#!/bin/bash
args=()
while [ $# -gt 0 ]; do
    if [ "$1" = -v ]; then
        IFS=, read -ra pairs <<<"$2"
        for pair in "${pairs[@]}"; do export "$pair"; done
        shift 2
    else
        args+=("$1"); shift
    fi
done
export BASH_ENV=@DIR@/pbs_env.sh
exec @QSUB@ -V "${args[@]}"
"""
PBS_ENV = """export PBS_JOBID=$SLURM_JOB_ID PBS_O_WORKDIR=$SLURM_SUBMIT_DIR
[ -z "${SLURM_ARRAY_TASK_ID:-}" ] || export PBS_ARRAYID=$SLURM_ARRAY_TASK_ID
unset BASH_ENV
"""


@pytest.fixture
def pbs_env(tmp_path):
    """The environment for submitting PBS jobs: the bridging qsub first on PATH."""
    real = shutil.which("qsub")
    if real is None:
        pytest.skip("no qsub: .ci/run installs slurm-wlm-torque")
    bridge = tmp_path / "pbs-bridge"
    bridge.mkdir()
    (bridge / "qsub").write_text(PBS_QSUB.replace("@DIR@", str(bridge)).replace("@QSUB@", real))
    (bridge / "qsub").chmod(0o755)
    (bridge / "pbs_env.sh").write_text(PBS_ENV)
    return submit_env(PATH=f"{bridge}:{os.environ['PATH']}")


def pbs_log(workdir, job):
    """A PBS job's output: the wrappers write NAME.oJOB and NAME.eJOB (they ignore -j oe), NAME being -N's or
    the file's name."""
    return "".join(read(path) for path in sorted(glob.glob(f"{workdir}/*.[oe]{job}")))


FOLLOW_UP = """#!/bin/bash
#PBS -N follow-up
cd "$PBS_O_WORKDIR" && . jobs/lib.sh && job_require_finished "$GAN_DIR/gan.chain" && date +%s > "$GAN_DIR/followed"
"""


def test_pbs_a_chain_resubmits_at_its_walltime_through_qsub_and_the_pipeline_runs(workdir, pbs_env, capsys):
    """All at once (a chain mostly waits for its walltime): a gan.pbs chain whose 60 s walltime, read back with
    qstat -f, makes it stop and resubmit through qsub, then ends on qdel; a short chain releasing a held job
    with qrls; and SCHEDULER=pbs jobs/pipeline.sh at smoke size."""
    data, long, short = workdir.parent / "data", workdir / "long", workdir / "short"
    (workdir / "follow_up.pbs").write_text(FOLLOW_UP)
    qsub = ["qsub", "-l", "walltime=00:01:00"]
    common = f"DATA_DIR={data},WIDTH=8,EXTRA_ARGS={SMOKE},STOP_MARGIN=30"
    held = run(*qsub, "-h", "-v", f"GAN_DIR={short}", "follow_up.pbs", cwd=workdir, env=pbs_env).strip()
    first = run(*qsub, "-v", f"{common},OUT_DIR={long},EPOCHS=1000", "jobs/gan.pbs", cwd=workdir, env=pbs_env).strip()
    quick = run(*qsub, "-v", f"{common},OUT_DIR={short},EPOCHS=1,FOLLOW_UP={held},FOLLOW_UP_AFTER={short}/gan.chain",
                "jobs/gan.pbs", cwd=workdir, env=pbs_env).strip()
    say(capsys, f"PBS: chain {first} (walltime 60 s, STOP_MARGIN=30), chain {quick} releasing {held}")
    assert job_record(held)["Reason"] == "JobHeldUser"

    run_dir = workdir / "runs" / "pbs"
    result = subprocess.run(
        ["jobs/pipeline.sh", str(run_dir)], cwd=workdir, capture_output=True, text=True, timeout=120,
        env=dict(pbs_env, SCHEDULER="pbs", DATA_DIR=str(data), WIDTH="8", BASELINE_EPOCHS="1",
                 GAN_EPOCHS="2", BASELINE_ARGS=SMOKE, GAN_ARGS=SMOKE, SUBMIT_OPTS="-l walltime=00:05:00",
                 VISUALIZE_ARGS="--iterations 2 --layers 2 --batch-size 20"))
    assert result.returncode == 0, result.stderr
    jobs = dict(re.findall(r"^\s+(baseline|gan|visualize|report)\s+job (\S+)", result.stdout, re.M))
    say(capsys, f"PBS pipeline: jobs {jobs}")

    wait_for("the follow-up to run", lambda: ended(held))
    assert job_state(held) == "COMPLETED" and (short / "followed").exists(), pbs_log(workdir, held)
    assert read(short / "gan.chain").startswith(f"finished: job {quick}")
    assert job_time(held, "StartTime") >= job_time(quick, "EndTime")
    assert f"released follow-up job {held}" in pbs_log(workdir, quick)

    wait_for(f"PBS job {first} to resubmit its chain",
             lambda: re.search(r"resubmitted jobs/gan.pbs as job (\S+),", pbs_log(workdir, first)) or ended(first))
    log1 = pbs_log(workdir, first)
    second = re.search(r"resubmitted jobs/gan.pbs as job (\S+),", log1).group(1)
    assert "will ask the trainer to stop in 30 s" in log1 and "received SIGUSR1" in log1
    # The walltime read back with qstat -f: the second link asked for the first's, not the file's 24 hours.
    assert job_record(second)["TimeLimit"] == "00:01:00"
    wait_for(f"PBS job {second} to resume", lambda: "resuming" in pbs_log(workdir, second) or ended(second))
    run("qdel", second, env=pbs_env)
    wait_for(f"PBS job {second} to end", lambda: ended(second))
    say(capsys, f"PBS chain: {first}, resubmitted as {second}, ended with qdel")
    assert "was cancelled" in pbs_log(workdir, second), pbs_log(workdir, second)
    assert read(long / "gan.chain").startswith(f"stopped: job {second} was cancelled; continue with: qsub -N gan")

    wait_for("the PBS pipeline's report to end", lambda: ended(jobs["report"]), poll=3)
    for job in jobs.values():
        assert job_state(job) == "COMPLETED", pbs_log(workdir, job)
    assert read(run_dir / "gan" / "gan.chain").startswith("finished:")
    assert job_time(jobs["visualize"], "StartTime") >= max(job_time(jobs[n], "EndTime") for n in ("baseline", "gan"))
    assert Image.open(run_dir / "visualization" / "progress.gif").n_frames == 2
    assert (run_dir / "report" / "report.md").exists()
