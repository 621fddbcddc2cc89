"""The batch jobs that submit others, with the schedulers' commands as fakes on PATH (test_jobs.py's): jobs/pipeline.sh
and its order, how long the rest takes, jobs/sweep.sh's arrays and tables, several nodes, and PBS sites' settings;
tests/test_slurm.py runs the same files on a real Slurm."""
import json
import os
import resource
import shlex
import signal
import subprocess

import pytest

from conftest import REPO
from test_jobs import fakes  # noqa: F401  (the fixture)
from test_jobs import (JOBS, SLURM_RECORD, calls, chain_state, exported, job_env, option, run_driver, run_job,
                       submitted, without_notices)


# ---------------------------------------------------------------------------------------------------------
# jobs/pipeline.sh


def run_pipeline(fakes, scheduler, run_dir="runs/p", **extra):
    env = job_env(fakes, None, 0, SCHEDULER=scheduler, **extra)
    for name in ("OUT_DIR", "EPOCHS", "EXTRA_ARGS"):
        env.pop(name)
    return subprocess.run([os.path.join(JOBS, "pipeline.sh"), str(fakes / run_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_the_slurm_pipeline_holds_visualize_until_the_chains_release_it(fakes):
    run = fakes / "runs" / "p"
    (run / "gan").mkdir(parents=True)
    (run / "gan" / "gan.chain").write_text("finished: job 3, link 1 of the chain\n")  # from an earlier pipeline
    result = run_pipeline(fakes, "slurm", GAN_OPTS="--time=1-00:00:00", SUBMIT_OPTS="-p gpu", WIDTH="128")
    assert result.returncode == 0, result.stderr
    vis, report, baseline, gan = submitted(fakes)
    assert vis[-1] == "jobs/visualize.slurm" and "--hold" in vis
    assert report[-1] == "jobs/report.slurm" and option(report, "--dependency") == "afterok:2"
    assert exported(report)["VIS_DIR"] == exported(vis)["OUT_DIR"] == str(run / "visualization")
    for call, name in ((baseline, "baseline"), (gan, "gan")):
        passed = exported(call)
        assert call[-1] == f"jobs/{name}.slurm" and passed["OUT_DIR"] == str(run / name)
        assert passed["FOLLOW_UP"] == "2" and passed["WIDTH"] == "128"
        assert passed["FOLLOW_UP_AFTER"].split() == [str(run / "baseline" / "baseline.chain"),
                                                     str(run / "gan" / "gan.chain")]
        assert (run / name / f"{name}.chain").read_text().startswith("queued: submitted by jobs/pipeline.sh")
    assert option(gan, "--time") == "1-00:00:00" and option(baseline, "--time") is None
    assert all(call[call.index("-p") + 1] == "gpu" for call in (vis, report, baseline, gan))
    assert all(option(call, "--output") == f"{run}/logs/%x-%j.out" for call in (vis, report, baseline, gan))
    assert len(calls(fakes, "tested")) == 4  # every job checked with --test-only first
    assert f"{run}/report/report.md" in result.stdout
    assert result.stderr.count("NOTICE: the site's submit plugin") == 4 and without_notices(result.stderr) == []
    assert "to go" not in result.stdout and "pace" not in result.stdout  # no epoch has run: no estimate


def test_the_pbs_pipeline_holds_visualize_until_the_chains_release_it(fakes):
    result = run_pipeline(fakes, "pbs", STOP_MARGIN="600")
    assert result.returncode == 0, result.stderr
    vis, report, baseline, gan = submitted(fakes)
    assert vis[0] == "qsub" and "-h" in vis and vis[-1] == "jobs/visualize.pbs"
    assert report[report.index("-W") + 1] == "depend=afterok:2.bw"
    assert exported(baseline)["FOLLOW_UP"] == exported(gan)["FOLLOW_UP"] == "2.bw"
    assert exported(gan)["STOP_MARGIN"] == "600" and gan[-1] == "jobs/gan.pbs"
    assert result.stderr.count("NOTICE") == 4 and "job 5.bw" in result.stdout


def test_the_pipeline_stops_at_a_request_no_node_can_run(fakes):
    result = run_pipeline(fakes, "slurm", GAN_OPTS="--cpus-per-task=512",
                          TEST_ONLY_SAYS="Requested node configuration is not available")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("error: no node can run jobs/visualize.slurm")
    assert "Requested node configuration is not available" in result.stderr
    assert submitted(fakes) == []


def test_the_pipeline_cancels_everything_when_a_job_would_wait_forever(fakes):
    (fakes / "squeue").write_text("2 JobHeldUser\n3 Dependency\n4 None\n5 PartitionTimeLimit\n")
    result = run_pipeline(fakes, "slurm", GAN_OPTS="--time=30-00:00:00")
    assert result.returncode == 2
    assert without_notices(result.stderr)[0].startswith("error: job 5 would wait forever: Slurm says PartitionTimeLimit")
    assert (fakes / "other").read_text() == "scancel 2 3 4 5\n"


@pytest.mark.parametrize("run_dir, extra, message", [("runs/a b", {}, "space or a comma"),
                                                      ("runs/p", {"GAN_ARGS": "--layers 2,3"}, "comma"),
                                                      ("runs/p", {"GAN_JOB": "gan_multigpu"}, "GAN_JOB")])
def test_the_pipeline_refuses_bad_settings_before_submitting(fakes, run_dir, extra, message):
    result = run_pipeline(fakes, "pbs", run_dir, **extra)
    assert result.returncode == 2 and submitted(fakes) == []
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line


@pytest.mark.parametrize("script, setting", [("pipeline.sh", {"STOP_MARGIN": "10m"}), ("pipeline.sh", {"MAX_CHAIN": "twenty"}),
                                             ("pipeline.sh", {"GAN_EPOCHS": "2e2"}), ("sweep.sh", {"SEEDS": "three"}),
                                             ("sweep.sh", {"STOP_MARGIN": "-5"})])
def test_a_setting_that_is_not_a_whole_number_is_refused_before_anything_is_queued(fakes, script, setting):
    env = job_env(fakes, None, 0, SCHEDULER="pbs", **setting)
    result = subprocess.run([os.path.join(JOBS, script), str(fakes / "runs" / "x")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and submitted(fakes) == []
    (name, value), = setting.items()
    (line,) = result.stderr.splitlines()
    assert line == f"error: {name}='{value}' is not a whole number; give it in digits only"


@pytest.mark.parametrize("script", ["pipeline.sh", "sweep.sh"])
def test_a_missing_tmpdir_is_one_line_before_anything_is_queued(fakes, script):
    env = job_env(fakes, None, 0, SCHEDULER="slurm", TMPDIR=str(fakes / "no-such-folder"))
    result = subprocess.run([os.path.join(JOBS, script), str(fakes / "runs" / "x")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and submitted(fakes) == [] and calls(fakes, "tested") == []
    (line,) = result.stderr.splitlines()
    assert line == (f"error: cannot create a temporary file in {fakes / 'no-such-folder'}; set TMPDIR to a writable "
                    "folder")


def test_a_chain_refuses_a_setting_that_is_not_a_whole_number(fakes):
    result = run_driver(fakes, "pbs", 75, MAX_CHAIN="twenty")
    assert result.returncode == 2 and not (fakes / "args").exists() and submitted(fakes) == []
    assert result.stderr.startswith("error: MAX_CHAIN='twenty' is not a whole number")


# ---------------------------------------------------------------------------------------------------------
# How long the rest takes


def write_epochs(path, *records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("last, says", [({"seconds": 30.0}, "2 min to go at the measured pace (epoch 3 of 7 done)"),
                                        ({"seconds": 30.0, "seconds_per_epoch": 1000.1, "eta_s": 0.0},
                                         "1 h 06 min to go at the measured pace (epoch 3 of 7 done)")])
def test_the_chain_state_says_how_long_the_rest_takes(fakes, last, says):
    """From the last epoch record: the measured seconds per epoch (an older file's seconds of that epoch) times the
    epochs left of the job's EPOCHS (7 - 3), whatever the trainer's own eta_s says."""
    write_epochs(fakes / "run" / "trainer_metrics.jsonl", {"type": "epoch", "epoch": 2, "seconds": 99.0},
                 {"type": "monitor", "epoch": 3, "seconds": 1.0}, {"type": "epoch", "epoch": 3, **last})
    assert run_driver(fakes, "slurm", 75).returncode == 0
    assert chain_state(fakes) == f"queued: job 2, link 2 of the chain; {says}\n"


def test_the_pipeline_prints_how_long_the_rest_takes_once_an_epoch_has_run(fakes):
    run = fakes / "runs" / "p"
    write_epochs(run / "gan" / "gan_metrics.jsonl", {"type": "epoch", "epoch": 50, "seconds": 60.0})
    write_epochs(run / "baseline" / "baseline_metrics.jsonl", {"type": "epoch", "epoch": 10, "seconds": 20.0,
                                                               "eta_s": 1800.0})
    result = run_pipeline(fakes, "slurm", GAN_EPOCHS="200", BASELINE_EPOCHS="100")
    assert result.returncode == 0, result.stderr
    assert "baseline: 30 min of training left (epoch 10 of 100 done)" in result.stdout
    assert "gan: 2 h 30 min of training left (epoch 50 of 200 done)" in result.stdout
    assert "the whole: about 2 h 30 min" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Sweeps


def run_sweep(fakes, scheduler, *args, **extra):
    env = job_env(fakes, None, 0, SCHEDULER=scheduler, **extra)
    for name in ("OUT_DIR", "EPOCHS", "EXTRA_ARGS"):
        env.pop(name)
    return subprocess.run([os.path.join(JOBS, "sweep.sh"), str(fakes / "runs" / "s"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


CONFIGS = ("--config", "w128=--width 128 --feature-matching 0.1 | --width 128", "--config", "deep=--arch deep")


def test_a_full_disk_for_the_sweeps_table_is_one_line_before_anything_is_queued(fakes):
    """No file may grow past 0 bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as on a full disk)."""
    def no_room():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    env = job_env(fakes, None, 0, SCHEDULER="slurm")
    result = subprocess.run([os.path.join(JOBS, "sweep.sh"), str(fakes / "runs" / "s")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30, preexec_fn=no_room)
    assert result.returncode == 2 and submitted(fakes) == [] and os.listdir(fakes / "runs" / "s") == []
    (line,) = result.stderr.splitlines()
    assert line == (f"error: cannot write {fakes / 'runs' / 's' / 'baseline.sweep'} (File too large); free space or "
                    "choose another RUN_DIR")


def test_a_slurm_sweep_submits_one_array_per_trainer_and_holds_the_comparison(fakes):
    result = run_sweep(fakes, "slurm", *CONFIGS, GAN_ARGS="--eval-every 5", SUBMIT_OPTS="-p gpu")
    assert result.returncode == 0, result.stderr
    compare, baseline, gan = submitted(fakes)
    sweep = fakes / "runs" / "s"
    assert compare[-1] == "jobs/compare.slurm" and "--hold" in compare and exported(compare)["SWEEP_DIR"] == str(sweep)
    chains = [str(sweep / c / f"seed-{k}" / f"{run}.chain") for run in ("baseline", "gan") for c in ("w128", "deep")
              for k in range(3)]
    assert exported(compare)["CHAINS"].split() == chains
    for call, run in ((baseline, "baseline"), (gan, "gan")):
        passed = exported(call)
        assert call[-1] == f"jobs/{run}.slurm" and option(call, "--array") == "0-5"
        assert passed["SWEEP"] == str(sweep / f"{run}.sweep") and passed["FOLLOW_UP"] == "2"
        assert passed["FOLLOW_UP_AFTER"].split() == chains and "-p" in call
        assert option(call, "--output") == f"{sweep}/logs/%x-%A_%a.out"
    assert (sweep / "gan.sweep").read_text().splitlines()[4] == \
        f"{sweep}/deep/seed-1 --eval-every 5 --arch deep --seed 1"
    assert (sweep / "baseline.sweep").read_text().splitlines()[2] == f"{sweep}/w128/seed-2 --width 128 --seed 2"
    assert (sweep / "gan.sweep").read_text().splitlines()[0] == \
        f"{sweep}/w128/seed-0 --eval-every 5 --width 128 --feature-matching 0.1 --seed 0"
    assert all(open(chain).read().startswith("queued: submitted by jobs/sweep.sh") for chain in chains)
    assert "elements 0-5" in result.stdout and "held until all 12 chains" in result.stdout


def test_an_array_element_trains_its_line_and_its_next_jobs_carry_it_on(fakes):
    assert run_sweep(fakes, "slurm", *CONFIGS, RUNS="gan").returncode == 0
    _, array = submitted(fakes)
    out = str(fakes / "runs" / "s" / "deep" / "seed-1")
    element = run_job(fakes, "gan.slurm", "slurm", 75, SLURM_ARRAY_TASK_ID="4", PROGRESS=f"{out}/gan.ckpt",
                      **exported(array))
    assert element.returncode == 0, element.stderr
    args = shlex.split((fakes / "args").read_text())
    assert args[args.index("--out-dir") + 1] == out and args[-3:] == ["deep", "--seed", "1"]
    nxt = submitted(fakes)[-1]
    passed = exported(nxt)
    assert nxt[-1] == "jobs/gan.slurm" and option(nxt, "--array") is None
    assert passed["OUT_DIR"] == out and passed["EXTRA_ARGS"] == "--arch deep --seed 1"
    # sbatch --export=ALL carries the environment, SWEEP too: the element empties it for the next jobs.
    assert (fakes / "env").read_text().count("\nSWEEP=\n") == 1
    state = (fakes / "runs" / "s" / "deep" / "seed-1" / "gan.chain").read_text()
    assert state.startswith(f"queued: job {len(submitted(fakes)) + 1}, link 2")

    lost = run_job(fakes, "gan.slurm", "slurm", 0, SWEEP=str(fakes / "runs" / "s" / "gan.sweep"))
    assert lost.returncode == 2 and "no array element" in lost.stderr


@pytest.mark.parametrize("array", ["-J", "-t"])
def test_a_pbs_sweep_submits_arrays_with_the_sites_option(fakes, array):
    result = run_sweep(fakes, "pbs", PBS_ARRAY=array, RUNS="gan", PBS_MODULES="bwpy cudatoolkit")
    assert result.returncode == 0, result.stderr
    compare, gan = submitted(fakes)
    assert compare[-1] == "jobs/compare.pbs" and "-h" in compare
    assert gan[gan.index(array) + 1] == "0-2" and gan[-1] == "jobs/gan.pbs"
    assert exported(gan)["PBS_MODULES"] == "bwpy cudatoolkit" and exported(gan)["FOLLOW_UP"] == "2.bw"


def test_a_sweep_of_one_element_is_a_plain_job(fakes):
    assert run_sweep(fakes, "slurm", SEEDS="1", RUNS="gan").returncode == 0
    _, gan = submitted(fakes)
    assert option(gan, "--array") is None and exported(gan)["SWEEP_INDEX"] == "0"


@pytest.mark.parametrize("args, message", [(("--config", "a b=--width 8"), "configuration name 'a b'"),
                                          (("--config", "w=--layers 2,3"), "comma"),
                                          (("--config", "w=", "--config", "w=--arch deep"), "given twice"),
                                          (("--bogus",), "unknown argument '--bogus'")])
def test_a_sweep_refuses_a_bad_table_before_submitting(fakes, args, message):
    result = run_sweep(fakes, "slurm", *args)
    assert result.returncode == 2 and submitted(fakes) == []
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line


def test_a_sweep_reads_a_configs_file(fakes):
    table = fakes / "variants.txt"
    table.write_text("# name  GAN flags | baseline flags\nw196  --width 196\n\nfm  --feature-matching 0.1 |  # none\n")
    assert run_sweep(fakes, "slurm", "--configs", str(table), SEEDS="2").returncode == 0
    sweep = fakes / "runs" / "s"
    assert (sweep / "gan.sweep").read_text().splitlines() == [
        f"{sweep}/w196/seed-0 --width 196 --seed 0", f"{sweep}/w196/seed-1 --width 196 --seed 1",
        f"{sweep}/fm/seed-0 --feature-matching 0.1 --seed 0", f"{sweep}/fm/seed-1 --feature-matching 0.1 --seed 1"]
    assert (sweep / "baseline.sweep").read_text().splitlines()[3] == f"{sweep}/fm/seed-1 --seed 1"


# ---------------------------------------------------------------------------------------------------------
# Several nodes, and PBS sites


def test_the_multi_node_job_starts_one_agent_per_node_meeting_on_the_first(fakes):
    result = run_job(fakes, "gan_multinode.slurm", "slurm", 0, SLURM_GPUS_ON_NODE="4", SLURM_JOB_NUM_NODES="2",
                     SLURM_JOB_NODELIST="node[7-8]", SLURM_JOB_ID="1234", SLURM_CPUS_PER_TASK="32")
    assert result.returncode == 0, result.stderr
    assert (fakes / "srun").read_text().split()[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
                                                         "--cpus-per-task=32"]
    args = shlex.split((fakes / "args").read_text())
    assert args[:7] == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=node7:21234", "--rdzv_id=1234", "--max_restarts=0"]
    assert args[7:9] == ["train_gan.py", "--resume"]


def test_a_chain_on_several_nodes_resubmits_with_as_many_nodes(fakes):
    record = SLURM_RECORD.replace("TRES=cpu=4,mem=8G,", "NumNodes=2 TRES=cpu=8,mem=16G,")
    (fakes / "record").write_text(record + "\n")
    assert run_driver(fakes, "slurm", 75).returncode == 0
    (call,) = submitted(fakes)
    assert option(call, "--nodes") == "2" and option(call, "--mem") == "8G"  # per node, not the job's 16G


def test_pbs_settings_load_modules_and_pick_the_launcher(fakes):
    (fakes / "record").write_text("Job Id:\t1.bw\n\tJob_Name = gan\n\tResource_List.walltime = 01:30:00\n")
    result = run_job(fakes, "gan.pbs", "pbs", 75, PBS_MODULES="bwpy cudatoolkit")
    assert result.returncode == 0, result.stderr
    assert (fakes / "modules").read_text() == "module load bwpy cudatoolkit\n"
    (call,) = submitted(fakes)
    assert call[1:call.index("-v")] == ["-N", "gan", "-l", "walltime=01:30:00"]  # Torque's tabs read too
    passed = exported(call)
    assert passed["PBS_MODULES"] == "bwpy cudatoolkit" and passed["PBS_LAUNCHER"] == "aprun -n 1 -N 1 -d 1"

    (fakes / "bin" / "aprun").unlink()  # a plain PBS Pro site: python runs directly
    assert run_job(fakes, "gan.pbs", "pbs", 0).returncode == 0
    assert shlex.split((fakes / "args").read_text())[:2] == ["python", "train_gan.py"]


def test_pbs_settings_that_do_not_work_say_so_in_one_line(fakes):
    result = run_job(fakes, "gan.pbs", "pbs", 0, PBS_VENV=str(fakes / "no-venv"))
    assert result.returncode == 2 and not (fakes / "args").exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: PBS_VENV=") and "bin/activate" in line
