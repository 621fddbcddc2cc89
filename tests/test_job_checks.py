"""What jobs/pipeline.sh and jobs/sweep.sh check before anything is queued, with the fakes of test_jobs.py: the
flags each job will pass, checked by the trainers themselves (--check-flags, the real python), a --configs file
written on Windows, and the plan of how long the rest takes, from the records the real trainers write."""
import json

import pytest

from test_job_pipeline import run_pipeline, run_sweep
from test_jobs import fakes, submitted  # noqa: F401  (fakes: the fixture)
import train_baseline
import train_gan


def test_a_configs_file_written_on_windows_reads_as_the_same_table(fakes):
    """CR LF line ends: the CR reached the trainers' flags (invalid choice: 'deep\\r' on every node)."""
    (fakes / "unix.txt").write_text("w196  --width 196\ndeep --arch deep  # 10 convs\nfm --feature-matching 0.1 |\n")
    (fakes / "windows.txt").write_bytes((fakes / "unix.txt").read_bytes().replace(b"\n", b"\r\n"))
    tables = []
    for name in ("unix.txt", "windows.txt"):
        assert run_sweep(fakes, "slurm", "--configs", str(fakes / name), SEEDS="1").returncode == 0
        tables.append([(fakes / "runs" / "s" / f"{run}.sweep").read_bytes() for run in ("baseline", "gan")])
    assert tables[0] == tables[1] and b"\r" not in b"".join(tables[1])


def real_python(fakes):
    """The fakes without their python: the trainers' --check-flags runs for real."""
    (fakes / "bin" / "python").unlink()
    return fakes


@pytest.mark.parametrize("config, says", [
    ("bad=--widht 8", "configuration bad: train_baseline.py would refuse it on every node: unrecognized arguments: "
                      "--widht 8; fix its flags"),
    ("bad=--arch deep | --width 0", "configuration bad: train_baseline.py would refuse it on every node: --width "
                                    "must be in [1, 2048], got 0; fix its flags"),
    ("bad=--arch deep\r", "configuration bad: its flags hold a carriage return; remove it")])
def test_a_configuration_the_trainers_refuse_is_refused_before_anything_is_queued(fakes, config, says):
    result = run_sweep(real_python(fakes), "slurm", "--config", "good=--width 8 --n-critic 2 | --width 8",
                       "--config", config)
    assert result.returncode == 2 and submitted(fakes) == []
    assert result.stderr.splitlines() == [f"error: {says}"]


def test_the_pipeline_refuses_flags_a_trainer_does_not_have_before_anything_is_queued(fakes):
    result = run_pipeline(real_python(fakes), "slurm", GAN_ARGS="--seed 1 --gen-trian 2")
    assert result.returncode == 2 and submitted(fakes) == []
    assert result.stderr.splitlines() == ["error: GAN_ARGS: train_gan.py would refuse it on every node: unrecognized "
                                          "arguments: --gen-trian 2; fix its flags"]


def test_a_python_that_cannot_run_the_trainers_is_one_line(fakes):
    """The login node's python without the jobs' packages: nothing is queued unchecked."""
    (fakes / "bin" / "python").write_text("#!/bin/bash\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\n"
                                          "exit 1\n")
    result = run_sweep(fakes, "slurm", "--config", "w8=--width 8")
    assert result.returncode == 2 and submitted(fakes) == []
    assert result.stderr.splitlines() == [
        "error: cannot check the trainers' flags with 'python train_baseline.py --check-flags' (ModuleNotFoundError: "
        "No module named 'torch'); run this where python has the jobs' packages (activate their environment, or load "
        "their modules)"]


def test_a_rerun_plans_both_trainers_from_their_real_records(fakes, data_dir):
    """The trainers' own metrics files (not records written by hand): the baseline's epochs are counted too, and a
    finished 2-epoch GAN asked for 400 has 398 epochs to go, not the 0 s of its last eta_s."""
    run = fakes / "runs" / "p"
    tiny = ["--data-dir", str(data_dir), "--width", "8", "--device", "cpu", "--limit-train", "64", "--limit-test",
            "20", "--batch-size", "32", "--no-tensorboard"]
    train_baseline.main([*tiny, "--out-dir", str(run / "baseline"), "--epochs", "1"])
    train_gan.main([*tiny, "--out-dir", str(run / "gan"), "--epochs", "2"])
    expected = {}
    for job, done, total in (("baseline", 1, 300), ("gan", 2, 400)):
        last = [json.loads(line) for line in open(run / job / f"{job}_metrics.jsonl")][-1]
        seconds = int(last["seconds_per_epoch"] * (total - done) + 0.5)
        assert seconds > 0
        expected[job] = seconds
    result = run_pipeline(fakes, "slurm", BASELINE_EPOCHS="300", GAN_EPOCHS="400")
    assert result.returncode == 0, result.stderr
    for job, done, total in (("baseline", 1, 300), ("gan", 2, 400)):
        line = f"  {job}: {duration(expected[job])} of training left (epoch {done} of {total} done)"
        assert line in result.stdout.splitlines(), result.stdout


def duration(seconds):
    """jobs/lib.sh's job_duration."""
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"
