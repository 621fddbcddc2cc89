"""Check and measure a GPU node in one command: the GPU tests, bench.py, and a short timed run of each trainer
at the assignment's width, in fp32 and (on GPUs of compute capability 8.0 or newer) bf16.

    python check_gpu.py --data-dir data                      # on the GPU node; a few minutes
    python check_gpu.py --data-dir data --width 128          # the narrower net
    python check_gpu.py --data-dir DIR --device cpu --width 8 --batch-size 16 --limit-train 64 --epochs 1 \\
        --bench-steps 1 --bench-warmup 0                     # the command itself, tiny, on a CPU

Writes to --out-dir (default gpu_check/): check.json (everything measured, the outputs' tails), check.md (a
table for the README: images/s, seconds per epoch of the 50,000 training images, the projected time of the full
schedules: baseline 100 epochs, GAN 200 and 500), and one log per step. Each trainer runs --epochs epochs on
--limit-train images; its last epoch is the one timed (the first includes cuDNN's autotuning). Exit status 0
when every step passed, 1 when one failed (the table says which), 2 for bad input.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from files import atomic_write, check_range, output_folder, read_metrics, run_main
from runtime import DEVICE_HELP, bf16_capable, pick_device

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN_IMAGES = 50_000  # CIFAR-10's training split: an epoch of the full schedule
SCHEDULES = {"baseline": (100,), "gan": (200, 500)}  # epochs of the assignment's schedules
TRAINERS = {"baseline": ("train_baseline.py", "baseline_metrics.jsonl"), "gan": ("train_gan.py", "gan_metrics.jsonl")}


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
    parser.add_argument("--bench-steps", type=int, default=30, help="bench.py's --steps (default: 30)")
    parser.add_argument("--bench-warmup", type=int, default=5, help="bench.py's --warmup (default: 5)")
    parser.add_argument("--tests", default=os.path.join(REPO, "tests"), metavar="PATH",
                        help="where pytest looks for the gpu-marked tests (default: this repository's tests/)")
    args = parser.parse_args(argv)
    # The steps run from the repository root: the paths given are taken from here
    args.data_dir, args.out_dir, args.tests = map(os.path.abspath, (args.data_dir, args.out_dir, args.tests))
    return args


def step(name, command, out_dir):
    """Run one command from the repository root; its output goes to <name>.log. Returns (passed, stdout, record)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = os.path.join(out_dir, f"{name}.log")
    atomic_write(log, f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}".encode())
    record = {"command": " ".join(command), "returncode": result.returncode, "seconds": round(seconds, 1),
              "log": log}
    if result.returncode != 0:
        record["error_tail"] = (result.stderr or result.stdout)[-2000:]
    return result.returncode == 0, result.stdout, record


def gpu_tests(args):
    passed, stdout, record = step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", args.tests],
                                  args.out_dir)
    summary = [line for line in stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    record["summary"] = summary[-1].strip("= ") if summary else "no summary"
    # pytest exits 5 when nothing ran (no GPU: every test skipped or deselected); that is not a failure
    record["passed"] = passed or (record["returncode"] == 5)
    return record


def bench(args):
    passed, stdout, record = step("bench", [sys.executable, "bench.py", "--device", args.device, "--width",
                                            str(args.width), "--batch-size", str(args.batch_size), "--steps",
                                            str(args.bench_steps), "--warmup", str(args.bench_warmup)], args.out_dir)
    record["passed"] = passed
    if passed:
        record["results"] = json.loads(stdout.strip().splitlines()[-1])
    return record


def timed_run(args, job, precision):
    """A short run of one trainer in a scratch folder: its last epoch's speed and the full schedules' time."""
    script, metrics = TRAINERS[job]
    with tempfile.TemporaryDirectory(dir=args.out_dir) as scratch:
        command = [sys.executable, script, "--data-dir", args.data_dir, "--out-dir", scratch, "--device",
                   args.device, "--precision", precision, "--width", str(args.width), "--batch-size",
                   str(args.batch_size), "--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test),
                   "--epochs", str(args.epochs)]
        passed, _, record = step(f"{job}_{precision}", command, args.out_dir)
        epochs = [r for r in read_metrics(os.path.join(scratch, metrics))[0] if r.get("type", "epoch") == "epoch"] \
            if passed else []
    record.update(job=job, precision=precision, passed=passed and bool(epochs))
    if record["passed"]:
        images_per_s = epochs[-1]["images_per_s"]
        epoch_seconds = TRAIN_IMAGES / images_per_s
        record.update(images_per_s=round(images_per_s, 1), epoch_seconds=round(epoch_seconds, 1),
                      test_acc=epochs[-1]["test_acc"],
                      schedule_hours={str(e): round(e * epoch_seconds / 3600, 2) for e in SCHEDULES[job]})
    return record


def table(report):
    """The markdown for the README."""
    lines = [f"{report['device']}, torch {report['torch']}, width {report['width']}, batch {report['batch_size']} "
             f"(`{report['command']}`, {report['date']})", "",
             "| trainer | precision | images/s | s per epoch (50,000 images) | full schedule |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        if run["passed"]:
            hours = ", ".join(f"{e} epochs {h:.1f} h" for e, h in run["schedule_hours"].items())
            lines.append(f"| {run['job']} | {run['precision']} | {run['images_per_s']:.0f} | "
                         f"{run['epoch_seconds']:.0f} | {hours} |")
        else:
            lines.append(f"| {run['job']} | {run['precision']} | failed: see {run['log']} | | |")
    bench_record = report["bench"]
    if bench_record["passed"]:
        speeds = {k: v for k, v in bench_record["results"].items() if isinstance(v, (int, float))
                  and k.startswith(("baseline_", "gan_"))}
        lines += ["", "| bench.py | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in speeds.items()]
    else:
        lines += ["", f"bench.py failed: see {bench_record['log']}"]
    lines += ["", f"GPU tests (`python -m pytest -m gpu tests`): {report['tests']['summary']}"
              + ("" if report["tests"]["passed"] else f" (FAILED: see {report['tests']['log']})")]
    return "\n".join(lines) + "\n"


def run(args):
    for name, low in (("width", 1), ("batch_size", 2), ("limit_train", 2), ("limit_test", 1), ("epochs", 1),
                      ("bench_steps", 1), ("bench_warmup", 0)):
        check_range(args, name, low)
    device = pick_device(args.device)
    args.device = str(device)
    output_folder(args.out_dir, "--out-dir")
    cuda = device.type == "cuda"
    precisions = ["fp32"] + (["bf16"] if bf16_capable(device) else [])
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "command": " ".join(["python", "check_gpu.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "width": args.width, "batch_size": args.batch_size}
    print(f"checking {report['device']}: GPU tests, bench.py, timed runs ({', '.join(precisions)})", flush=True)
    report["tests"] = gpu_tests(args)
    print(f"  GPU tests: {report['tests']['summary']}", flush=True)
    report["bench"] = bench(args)
    print(f"  bench.py: {'done' if report['bench']['passed'] else 'FAILED'}", flush=True)
    report["runs"] = []
    for job in TRAINERS:
        for precision in precisions:
            report["runs"].append(timed_run(args, job, precision))
            r = report["runs"][-1]
            print(f"  {job} {precision}: " + (f"{r['images_per_s']:.0f} images/s" if r["passed"] else "FAILED"),
                  flush=True)
    json_path, md_path = os.path.join(args.out_dir, "check.json"), os.path.join(args.out_dir, "check.md")
    atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode(), hint="choose another --out-dir")
    markdown = table(report)
    atomic_write(md_path, markdown.encode(), hint="choose another --out-dir")
    print(markdown + f"wrote {json_path} and {md_path}")
    if not all(part["passed"] for part in (report["tests"], report["bench"], *report["runs"])):
        raise SystemExit(1)


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
