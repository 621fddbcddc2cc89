"""Check and measure a GPU node in one command, the answers first: how fast (bench.py), how long (a short timed
run of each trainer at the assignment's width, in fp32 and, on GPUs of compute capability 8.0 or newer, bf16),
then whether every CUDA path works (the GPU tests). At the defaults it took 150 s on an
H200 (the GPU tests 57 s of it).

    python check_gpu.py --data-dir data                      # on the GPU node
    python check_gpu.py --data-dir data --budget 120         # at most 2 minutes; what ran is kept
    python check_gpu.py --data-dir data --width 128          # the narrower net
    python check_gpu.py --data-dir DIR --device cpu --width 8 --batch-size 16 --limit-train 64 --epochs 1 \\
        --bench-steps 1 --bench-warmup 0                     # the command itself, tiny, on a CPU

The steps, in this order, each a process of its own run from the repository root:
    bench.py        images/s of a baseline step and of a GAN iteration on synthetic images: on a GPU the paths
                    fp32 (--speed plain), fast (the default on one GPU) and, where the GPU has bf16, bf16 and fast-bf16;
                    on the CPU each path it runs there (--bench-steps timed steps after --bench-warmup, the best
                    of --bench-rounds rounds)
    baseline fp32, baseline bf16, gan fp32, gan bf16
                    each trainer for --epochs epochs of --limit-train images in a scratch folder, its last epoch
                    timed (the first includes cuDNN's autotuning): images/s, seconds per epoch of the 50,000
                    training images, hours of the full schedules (baseline 100 epochs, GAN 200 and 500)
    GPU tests       python -m pytest -m gpu on --tests: every CUDA path works

Writes to --out-dir (default gpu_check/): check.json (everything measured, each step's status, command, time
and the tail of a failure), check.md (a table for the README) and one log per step. Both are written at the
start, every step "not run yet", and rewritten together, atomically, as each step ends: a check cut short, even
by SIGKILL, keeps every step that finished.

SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (a job's walltime warning) and SIGHUP stop the check, and so does the end of
--budget SECONDS (counted from the first step): the running step's processes get SIGTERM (SIGKILL 10 s later)
and it is marked "stopped", the steps after it "skipped"; the files are written, and the last line printed
says what was cut short and skipped. The budget does not predict: a step that will not fit still starts, and is
stopped when the budget is spent. A second Ctrl-C stops at once, without writing.

Exit status 0 when every step passed, 1 when one failed (the table says which; also when stopped after that),
75 (runtime.EXIT_STOPPED, as the trainers) when stopped before any step failed, 2 for bad input.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

from torch_utils.cli import check_range, run_main
from torch_utils.files import atomic_write, output_folder, read_metrics, write_together
from torch_utils.runtime import DEVICE_HELP, EXIT_STOPPED, StopSignal, bf16_capable, pick_device

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN_IMAGES = 50_000  # CIFAR-10's training split: an epoch of the full schedule
SCHEDULES = {"baseline": (100,), "gan": (200, 500)}  # epochs of the assignment's schedules
TRAINERS = {"baseline": ("train_baseline.py", "baseline_metrics.jsonl"), "gan": ("train_gan.py", "gan_metrics.jsonl")}
STOP_GRACE = 10  # seconds a stopped step gets to end on SIGTERM before SIGKILL (a walltime's SIGKILL comes later)
POLL = 0.1  # seconds between looks for a stop while a step runs
PASSED, FAILED, STOPPED, SKIPPED, PENDING = "passed", "failed", "stopped", "skipped", "not run yet"


class CheckStop(StopSignal):
    """StopSignal, its Ctrl-C message saying what a stop does here."""

    CTRL_C = b"\nCtrl-C: stopping the check, keeping what it measured; press Ctrl-C again to stop at once\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="CIFAR-10 as the trainers take it (default: data)")
    parser.add_argument("--out-dir", default="gpu_check", help="where check.json, check.md and the logs go "
                                                               "(default: gpu_check)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--width", type=int, default=196, help="the nets' width (default: 196, the assignment's)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default: 128)")
    parser.add_argument("--limit-train", type=int, default=5120, metavar="N",
                        help="training images per epoch of the timed runs (default: 5120, 40 batches)")
    parser.add_argument("--limit-test", type=int, default=1000, metavar="N", help="test images (default: 1000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run, the last one timed (default: 2)")
    parser.add_argument("--bench-steps", type=int, default=20, help="bench.py's --steps (default: 20)")
    parser.add_argument("--bench-warmup", type=int, default=5, help="bench.py's --warmup (default: 5)")
    parser.add_argument("--bench-rounds", type=int, default=2, help="bench.py's --rounds (default: 2)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop after this many seconds from the first step, keeping what ran (default: none)")
    parser.add_argument("--tests", default=os.path.join(REPO, "tests"), metavar="PATH",
                        help="where pytest looks for the gpu-marked tests (default: this repository's tests/)")
    args = parser.parse_args(argv)
    # The steps run from the repository root: the paths given are taken from here
    args.data_dir, args.out_dir, args.tests = map(os.path.abspath, (args.data_dir, args.out_dir, args.tests))
    return args


def signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # every process of the group has ended
        pass


class Check:
    """The steps' records in check.json and check.md, and the running of one step: a process group of its own,
    so that a stop reaches what the step started too (the trainers of the GPU tests)."""

    def __init__(self, args, stop, report):
        self.args, self.stop, self.report = args, stop, report
        self.json_path, self.md_path = (os.path.join(args.out_dir, name) for name in ("check.json", "check.md"))
        self.start = time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.start

    def stop_reason(self):
        """Why the check stops now (a signal's name, or the budget), or None."""
        if self.stop.received:
            return self.stop.received
        if self.args.budget is not None and self.elapsed() >= self.args.budget:
            return f"the budget (--budget {self.args.budget:g})"
        return None

    def write(self):
        self.report["seconds"] = round(self.elapsed(), 1)
        write_together([(self.json_path, (json.dumps(self.report, indent=2) + "\n").encode()),
                        (self.md_path, table(self.report).encode())])

    def run(self, record, name, command, ok=(0,)):
        """Run one step's command, its output to <name>.log; fill in record (status passed when the exit status
        is in ok, failed, or stopped) and return the step's stdout."""
        record.update(command=" ".join(command), started_s=round(self.elapsed(), 1))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
            print(f"  {record['step']}: started", flush=True)
            # A scheduler signals every process of the job: the step may have ended on the signal before this did
            stopped = self.wait(process) or (process.returncode not in ok and self.stop.received is not None)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        log = os.path.join(self.args.out_dir, f"{name}.log")
        atomic_write(log, f"$ {' '.join(command)}\n{stdout}\n{stderr}".encode())
        record.update(returncode=process.returncode, seconds=round(self.elapsed() - record["started_s"], 1), log=log,
                      status=STOPPED if stopped else PASSED if process.returncode in ok else FAILED)
        if record["status"] == FAILED:
            record["error_tail"] = (stderr or stdout)[-2000:]
        return stdout

    def wait(self, process):
        """Wait for a step's process; when a stop comes first, end its group and return True."""
        try:
            while True:
                try:
                    process.wait(timeout=POLL)
                    return False
                except subprocess.TimeoutExpired:
                    if self.stop_reason():
                        signal_group(process, signal.SIGTERM)
                        try:
                            process.wait(timeout=STOP_GRACE)
                        except subprocess.TimeoutExpired:
                            pass
                        signal_group(process, signal.SIGKILL)  # what outlived the grace or its parent
                        process.wait()
                        return True
        except BaseException:  # a second Ctrl-C: the step's processes end at once, with this one
            signal_group(process, signal.SIGKILL)
            process.wait()
            raise


def last_json(stdout):
    """The last line of stdout that is a JSON object (bench.py's results), or None."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def bench(check, record):
    args = check.args
    device = torch.device(args.device)
    # On a GPU the paths a user chooses between (bench.py alone measures each switch): --speed plain and fast,
    # and both in bf16 where the GPU has it
    paths = ["--paths", "fp32,fast" + (",bf16,fast-bf16" if bf16_capable(device) else "")] \
        if device.type == "cuda" else []
    stdout = check.run(record, "bench", [sys.executable, "bench.py", "--device", args.device, "--width",
                                         str(args.width), "--batch-size", str(args.batch_size), "--steps",
                                         str(args.bench_steps), "--warmup", str(args.bench_warmup), "--rounds",
                                         str(args.bench_rounds), *paths])
    if record["status"] == PASSED:
        record["results"] = last_json(stdout)
        if record["results"] is None:
            record.update(status=FAILED, error_tail="bench.py printed no JSON line")


def timed_run(check, record):
    """A short run of one trainer in a scratch folder: its last epoch's speed and the full schedules' time."""
    args, job, precision = check.args, record["job"], record["precision"]
    script, metrics = TRAINERS[job]
    with tempfile.TemporaryDirectory(dir=args.out_dir) as scratch:
        command = [sys.executable, script, "--data-dir", args.data_dir, "--out-dir", scratch, "--device",
                   args.device, "--precision", precision, "--width", str(args.width), "--batch-size",
                   str(args.batch_size), "--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test),
                   "--epochs", str(args.epochs)]
        check.run(record, f"{job}_{precision}", command)
        epochs = [r for r in read_metrics(os.path.join(scratch, metrics))[0] if r.get("type", "epoch") == "epoch"] \
            if record["status"] == PASSED else []
    if record["status"] == PASSED and not epochs:
        record.update(status=FAILED, error_tail=f"no epoch record in {metrics}")
    if record["status"] == PASSED:
        images_per_s = epochs[-1]["images_per_s"]
        epoch_seconds = TRAIN_IMAGES / images_per_s
        record.update(images_per_s=round(images_per_s, 1), epoch_seconds=round(epoch_seconds, 1),
                      test_acc=epochs[-1]["test_acc"],
                      schedule_hours={str(e): round(e * epoch_seconds / 3600, 2) for e in SCHEDULES[job]})


def gpu_tests(check, record):
    # pytest exits 5 when nothing ran (no GPU: every test skipped or deselected); that is not a failure
    stdout = check.run(record, "gpu_tests", [sys.executable, "-m", "pytest", "-q", "--durations=10", "-m", "gpu",
                                             check.args.tests], ok=(0, 5))
    summary = [line for line in stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    record["summary"] = summary[-1].strip("= ") if summary else "no summary"


def status_text(record):
    """What a step that did not pass shows in place of its numbers."""
    return {FAILED: f"FAILED: see {record.get('log')}", STOPPED: f"stopped after {record.get('seconds', 0):.0f} s",
            SKIPPED: "skipped", PENDING: PENDING}[record["status"]]


def outcome(record):
    """A finished step in a few words, for the progress lines."""
    if "summary" in record and record["status"] in (PASSED, FAILED):
        return record["summary"] + ("" if record["status"] == PASSED else f" ({status_text(record)})")
    if record["status"] != PASSED:
        return "stopped" if record["status"] == STOPPED else status_text(record)
    return f"{record['images_per_s']:.0f} images/s" if "images_per_s" in record else PASSED


def stop_summary(report):
    stopped = report["stopped"]
    cut = f"{stopped['cut_short']} cut short; " if stopped["cut_short"] else ""
    return (f"stopped by {stopped['by']} after {stopped['after_s']:.0f} s: {cut}skipped "
            f"{', '.join(stopped['skipped']) or 'nothing'}")


def table(report):
    """The markdown for the README; the steps that did not run (yet) say so."""
    lines = [f"{report['device']}, torch {report['torch']}, width {report['width']}, batch {report['batch_size']} "
             f"(`{report['command']}`, {report['date']})", ""]
    if report["stopped"]:
        lines += [f"**Incomplete**: {stop_summary(report)}.", ""]
    lines += ["| trainer | precision | images/s | s per epoch (50,000 images) | full schedule |",
              "|---|---|---|---|---|"]
    for run in report["runs"]:
        if run["status"] == PASSED:
            hours = ", ".join(f"{e} epochs {h:.1f} h" for e, h in run["schedule_hours"].items())
            lines.append(f"| {run['job']} | {run['precision']} | {run['images_per_s']:.0f} | "
                         f"{run['epoch_seconds']:.0f} | {hours} |")
        else:
            lines.append(f"| {run['job']} | {run['precision']} | {status_text(run)} | | |")
    bench_record = report["bench"]
    if bench_record["status"] == PASSED:
        # Whatever bench.py adds, only its top-level numbers of the two jobs go in the table
        speeds = {k: v for k, v in bench_record["results"].items() if k.startswith(("baseline_", "gan_"))
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["", "| bench.py | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in speeds.items()]
    else:
        lines += ["", f"bench.py: {status_text(bench_record)}"]
    tests = report["tests"]
    lines += ["", "GPU tests (`python -m pytest -m gpu tests`): "
              + (outcome(tests) if tests["status"] in (PASSED, FAILED) else status_text(tests))]
    return "\n".join(lines) + "\n"


def run(args, stop):
    for name, low in (("width", 1), ("batch_size", 2), ("limit_train", 2), ("limit_test", 1), ("epochs", 1),
                      ("bench_steps", 1), ("bench_warmup", 0), ("bench_rounds", 1)):
        check_range(args, name, low)
    check_range(args, "budget", 0, low_open=True)
    device = pick_device(args.device)
    args.device = str(device)
    output_folder(args.out_dir, "--out-dir")
    cuda = device.type == "cuda"
    precisions = ["fp32"] + (["bf16"] if bf16_capable(device) else [])
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "command": " ".join(["python", "check_gpu.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "width": args.width, "batch_size": args.batch_size, "budget_s": args.budget, "seconds": 0,
              "stopped": None, "bench": {"step": "bench.py", "status": PENDING},
              "runs": [{"step": f"{job} {precision}", "job": job, "precision": precision, "status": PENDING}
                       for job in TRAINERS for precision in precisions],
              "tests": {"step": "GPU tests", "status": PENDING}}
    steps = [(report["bench"], bench), *((r, timed_run) for r in report["runs"]), (report["tests"], gpu_tests)]
    check = Check(args, stop, report)
    print(f"checking {report['device']}: {', '.join(r['step'] for r, _ in steps)}; {check.md_path} is rewritten "
          "as each step ends", flush=True)
    check.write()
    for record, measure in steps:
        if check.stop_reason():
            record["status"] = SKIPPED
            continue
        measure(check, record)
        print(f"  {record['step']}: {outcome(record)} ({record['seconds']:.0f} s)", flush=True)
        check.write()
    records = [record for record, _ in steps]
    cut = [r["step"] for r in records if r["status"] == STOPPED]
    skipped = [r["step"] for r in records if r["status"] == SKIPPED]
    if cut or skipped:
        report["stopped"] = {"by": check.stop_reason(), "after_s": round(check.elapsed(), 1),
                             "cut_short": cut[0] if cut else None, "skipped": skipped}
    check.write()
    print(table(report) + f"wrote {check.json_path} and {check.md_path}")
    if report["stopped"]:
        print(f"{stop_summary(report)}; what ran is in {check.json_path} and {check.md_path}")
    if any(r["status"] == FAILED for r in records):
        raise SystemExit(1)
    if report["stopped"]:
        raise SystemExit(EXIT_STOPPED)


def main(argv=None):
    with CheckStop() as stop:  # first thing: a signal during start-up stops the check before its first step
        run_main(lambda: run(parse_args(argv), stop))


if __name__ == "__main__":
    main()
