"""check_gpu.py, the one command for a GPU node, run whole at tiny scale on the CPU (its GPU tests skip here), and
stopped in each of its steps by a real signal and by --budget: the files keep what ran."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import check_gpu
from conftest import REPO

TINY = ["--device", "cpu", "--width", "8", "--batch-size", "16", "--limit-train", "64", "--limit-test", "20",
        "--epochs", "1", "--bench-steps", "1", "--bench-warmup", "0"]
GPU_TESTS = os.path.join(REPO, "tests", "test_gpu.py")
STEPS = ["bench.py", "baseline fp32", "gan fp32", "GPU tests"]  # the order; no bf16 on the CPU
LOGS = ["bench.log", "baseline_fp32.log", "gan_fp32.log", "gpu_tests.log"]


# A gpu-marked test that starts a process of its own, as test_gpu.py's trainer runs are, and waits in it
SLEEPER = """
import os, subprocess, sys, pytest

@pytest.mark.gpu
def test_starts_a_process_and_waits():
    subprocess.run([sys.executable, "-c", "import os, time; open('{pid}.tmp', 'w').write(str(os.getpid())); "
                                          "os.replace('{pid}.tmp', '{pid}'); time.sleep(600)"])
"""


def command(data_dir, out, *extra, tests=GPU_TESTS):
    return [sys.executable, os.path.join(REPO, "check_gpu.py"), "--data-dir", str(data_dir), "--out-dir", str(out),
            *TINY, "--tests", str(tests), *extra]


def wait_for_file(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path} in {timeout} s"
        time.sleep(0.1)


def ended(pid, timeout=10):
    """Whether the process has ended (or is a zombie its new parent has not reaped) within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def records(report):
    return [report["bench"], *report["runs"], report["tests"]]


def test_check_gpu_measures_first_then_tests_and_writes_the_json_and_the_table(data_dir, tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(command(data_dir, out), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((out / "check.json").read_text())
    table = (out / "check.md").read_text()
    assert report["device"] == "cpu" and report["width"] == 8 and report["stopped"] is None
    steps = records(report)
    assert [r["step"] for r in steps] == STEPS and {r["status"] for r in steps} == {"passed"}
    started = [r["started_s"] for r in steps]
    assert started == sorted(started) and len(set(started)) == len(started)
    assert [line for line in result.stdout.splitlines() if line.endswith(": started")] == \
        [f"  {step}: started" for step in STEPS]
    assert re.fullmatch(r"\d+ (passed|skipped).*", report["tests"]["summary"])
    assert report["bench"]["results"]["gan_fp32"] > 0
    assert [(r["job"], r["precision"]) for r in report["runs"]] == [("baseline", "fp32"), ("gan", "fp32")]
    for run in report["runs"]:
        assert run["images_per_s"] > 0
        assert run["epoch_seconds"] == pytest.approx(50_000 / run["images_per_s"], rel=1e-2)
        epochs = {"baseline": ["100"], "gan": ["200", "500"]}[run["job"]]
        assert list(run["schedule_hours"]) == epochs
        for e in epochs:
            assert run["schedule_hours"][e] == pytest.approx(int(e) * run["epoch_seconds"] / 3600, rel=1e-2, abs=0.01)
        assert f"| {run['job']} | fp32 | {run['images_per_s']:.0f} | {run['epoch_seconds']:.0f} |" in table
    assert sorted(os.listdir(out)) == sorted(["check.json", "check.md", *LOGS])  # the scratch folders are gone
    assert "| gan_fp32 |" in table and report["tests"]["summary"] in table
    assert "not run yet" not in table and "Incomplete" not in table
    assert table in result.stdout


class Lines:
    """A process's stdout, read line by line as it comes (check_gpu.py prints each step's start and end)."""

    def __init__(self, stream):
        self.lines, self._queue = [], queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream):
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text, timeout=300):
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in {timeout} s: {self.lines}")
            if line is None:
                raise AssertionError(f"the output ended before {text!r}: {self.lines}")
            self.lines.append(line)
            if line == text:
                return

    def rest(self):
        """Every line to the end of the output (the process has ended)."""
        self._reader.join(timeout=60)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return self.lines


@pytest.mark.parametrize("step, name", [("bench.py", "SIGINT"), ("baseline fp32", "SIGUSR1"), ("gan fp32", "SIGTERM"),
                                        ("GPU tests", "SIGTERM")])
def test_a_stop_in_each_step_ends_it_keeps_what_ran_and_skips_the_rest(data_dir, tmp_path, step, name):
    """The GPU tests here: one that starts a process and waits; the stop reaches that process too."""
    out, at, sleeper = tmp_path / "check", STEPS.index(step), tmp_path / "sleeper.pid"
    (tmp_path / "test_sleeper.py").write_text(SLEEPER.format(pid=sleeper))
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command(data_dir, out, tests=tmp_path / "test_sleeper.py"),
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path)
    try:
        output = Lines(process.stdout)
        output.wait_for(f"  {step}: started")
        if step == "GPU tests":
            wait_for_file(sleeper)
        # The files as the steps before left them: those passed, this one and the rest not run yet
        partial = json.loads((out / "check.json").read_text())
        assert [r["status"] for r in records(partial)] == ["passed"] * at + ["not run yet"] * (len(STEPS) - at)
        assert (out / "check.md").read_text().count("not run yet") == len(STEPS) - at
        process.send_signal(getattr(signal, name))
        assert process.wait(timeout=60) == 75, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    lines = output.rest()
    report = json.loads((out / "check.json").read_text())
    table = (out / "check.md").read_text()
    skipped = STEPS[at + 1:]
    assert [r["status"] for r in records(report)] == ["passed"] * at + ["stopped"] + ["skipped"] * len(skipped)
    assert report["stopped"]["by"] == name and report["stopped"]["cut_short"] == step
    assert report["stopped"]["skipped"] == skipped
    summary = (f"stopped by {name} after {report['stopped']['after_s']:.0f} s: {step} cut short; skipped "
               f"{', '.join(skipped) or 'nothing'}")
    assert lines[-1] == f"{summary}; what ran is in {out / 'check.json'} and {out / 'check.md'}"
    assert f"**Incomplete**: {summary}." in table and "not run yet" not in table
    assert table.count("skipped") == len(skipped) + 1  # each skipped step, and the summary
    stopped = records(report)[at]
    assert f"stopped after {stopped['seconds']:.0f} s" in table
    assert stopped["seconds"] < check_gpu.STOP_GRACE + 30
    # The stopped step's log is written; its scratch folder (a trainer's) is gone
    assert sorted(os.listdir(out)) == sorted(["check.json", "check.md", *LOGS[:at + 1]])
    assert (out / LOGS[at]).read_text().startswith("$ ")
    if name == "SIGINT":
        assert "Ctrl-C: stopping the check" in (tmp_path / "stderr").read_text()
    if step == "GPU tests":
        assert ended(int(sleeper.read_text())), "the process the GPU tests started outlived the stop"


def children(pid):
    """The processes whose parent is pid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # not a process, or one that ended meanwhile
            continue
        if parent == pid:
            found.append(int(entry))
    return found


def test_a_signal_to_every_process_of_the_job_is_a_stop_not_a_failure(data_dir, tmp_path):
    """A scheduler's SIGTERM reaches the step's process too, which may end on it before check_gpu.py sees its own."""
    out = tmp_path / "check"
    process = subprocess.Popen(command(data_dir, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=tmp_path)
    try:
        Lines(process.stdout).wait_for("  bench.py: started")
        step, = children(process.pid)
        os.kill(step, signal.SIGTERM)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 75
    finally:
        if process.poll() is None:
            process.kill()
    report = json.loads((out / "check.json").read_text())
    assert [r["status"] for r in records(report)] == ["stopped", "skipped", "skipped", "skipped"]


def test_the_budget_stops_the_step_it_runs_out_in_and_skips_the_rest(data_dir, tmp_path):
    """bench.py cannot import torch, build and time its nets within a second."""
    out = tmp_path / "check"
    result = subprocess.run(command(data_dir, out, "--budget", "1"), capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 75, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((out / "check.json").read_text())
    assert [r["status"] for r in records(report)] == ["stopped", "skipped", "skipped", "skipped"]
    assert report["stopped"]["by"] == "the budget (--budget 1)" and report["budget_s"] == 1
    assert 1 <= report["stopped"]["after_s"] < 1 + check_gpu.STOP_GRACE
    assert result.stdout.splitlines()[-1].startswith(
        f"stopped by the budget (--budget 1) after {report['stopped']['after_s']:.0f} s: bench.py cut short; "
        "skipped baseline fp32, gan fp32, GPU tests; what ran is in ")


def test_the_table_marks_the_steps_not_run_and_takes_only_bench_numbers_it_knows():
    report = {"device": "NVIDIA H200", "torch": "2.14.1", "width": 196, "batch_size": 128, "command": "python x",
              "date": "2026-01-01", "stopped": None,
              "bench": {"step": "bench.py", "status": "passed", "results": {
                  "device": "NVIDIA H200", "baseline_fp32": 9000.0, "gan_bf16": 2500, "gan_profile": {"fp32": 1.0},
                  "baseline_tuned": True, "ops": {"gan_fp32": {"total": 600}}, "steps": 30}},
              "runs": [{"step": "baseline fp32", "job": "baseline", "precision": "fp32", "status": "failed",
                        "log": "gpu_check/baseline_fp32.log"},
                       {"step": "gan fp32", "job": "gan", "precision": "fp32", "status": "not run yet"}],
              "tests": {"step": "GPU tests", "status": "not run yet"}}
    table = check_gpu.table(report)
    assert "| baseline | fp32 | FAILED: see gpu_check/baseline_fp32.log | | |" in table
    assert "| gan | fp32 | not run yet | | |" in table
    assert "GPU tests (`python -m pytest -m gpu tests`): not run yet" in table
    assert re.findall(r"^\| (\w+) \| [\d.]+ \|$", table, re.M) == ["baseline_fp32", "gan_bf16"]


def test_bench_results_are_its_last_json_line():
    assert check_gpu.last_json('table\n{"a": 1}\n{"gan_fp32": 2.5, "ops": {"x": {"total": 3}}}\n') == \
        {"gan_fp32": 2.5, "ops": {"x": {"total": 3}}}
    assert check_gpu.last_json('{"a": 1}\n[1, 2]\nprofile written to x.json\n') == {"a": 1}
    assert check_gpu.last_json("no json here\n") is None


@pytest.mark.parametrize("flag, value, message", [("--width", "0", "--width must be at least 1, got 0"),
                                                  ("--budget", "0", "--budget must be above 0, got 0")])
def test_check_gpu_refuses_bad_input_in_one_line(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit:
        check_gpu.main([flag, value])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
