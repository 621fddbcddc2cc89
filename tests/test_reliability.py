"""What a careless or unlucky user causes never costs a run: a full disk or quota (a real failing write), Ctrl-C,
a dropped ssh session, a signal during start-up, a kill while appending to the metrics, a NaN or a stop signal on
one process of several, and flags out of range. Real files, real signals, real subprocesses."""
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_image_folder
from torch_utils.files import read_metrics
import train_baseline
import train_gan
from training import optim

GAN = os.path.join(REPO, "train_gan.py")
BASELINE = os.path.join(REPO, "train_baseline.py")
COMMON = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--limit-test", "40"]


def run(script, *args, patch="", limit_bytes=None, timeout=300):
    """The script as a real process; patch: Python run first in it (to time a signal or a fault exactly where a
    test wants it); limit_bytes: no file it writes may grow past that size (RLIMIT_FSIZE, with SIGXFSZ ignored,
    so that a write past it fails with EFBIG as on a full disk or quota)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    code = (f"import sys; sys.path.insert(0, {REPO!r}); sys.argv[0] = {script!r}\n{patch}\n"
            f"import runpy; runpy.run_path({script!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limited if limit_bytes else None)


def one_error_line(result, code=2):
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# A full disk or quota

@pytest.mark.parametrize("limit, victim", [(400_000, "gan.ckpt"), (150_000, "output/001.png")])
def test_a_full_disk_ends_the_run_in_one_line_and_costs_nothing(data_dir, tmp_path, limit, victim):
    """At width 8 a grid is ~200 KB, the models ~150 KB, the checkpoint ~750 KB: the limit makes the write of
    `victim` in epoch 2 fail. The epoch-1 files stay byte-identical and --resume finishes once there is room."""
    out = tmp_path / "run"
    # (the events' file fills first when they are on: tests/test_tensorboard.py has that case)
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--no-tensorboard"]
    assert run(GAN, *args, "--epochs", 1).returncode == 0
    before = snapshot(out)
    line = one_error_line(run(GAN, *args, "--epochs", 2, "--resume", limit_bytes=limit))
    assert line == f"error: cannot write {out / victim}: File too large; free space or choose another --out-dir"
    assert not list(out.rglob("*.tmp")) and not (out / "gan.lock").exists()
    after = snapshot(out)
    for name in ("gan.ckpt", "generator.model", "discriminator.model", "output/000.png"):
        assert after[name] == before[name], name
    resumed = run(GAN, *args, "--epochs", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(out / "gan_metrics.jsonl")[0]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]
    assert torch.load(out / "gan.ckpt", weights_only=True)["epoch"] == 2


def test_no_room_for_the_image_cache_is_a_note_and_training_goes_on(tmp_path):
    write_image_folder(tmp_path / "data", train_per_class=60, test_per_class=3)
    result = run(BASELINE, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run", "--epochs", 1, *COMMON,
                 limit_bytes=1_000_000)  # the train split's cache is 1.8 MB, the test split's 92 KB
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith(f"note: cannot write {tmp_path / 'data' / 'train.uint8.pt'}")
    assert notes[0].endswith("File too large; going on without the cache (the images are decoded again next time)")
    assert not (tmp_path / "data" / "train.uint8.pt").exists() and not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / "data" / "test.uint8.pt").exists()  # the small one fitted


# No room left on the device for the baseline's model file alone, written after the last epoch's checkpoint
NO_ROOM_FOR_THE_MODEL = """
import errno, os
fsync = os.fsync
def fsync_or_no_room(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("cifar10.model."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fsync(fd)
os.fsync = fsync_or_no_room
"""


def same_model(path, record):
    saved = torch.load(path, weights_only=True)
    return saved["kind"] == record["kind"] and saved["config"] == record["config"] and \
        all(torch.equal(saved["state_dict"][k], v) for k, v in record["state_dict"].items())


def test_a_finished_baseline_writes_the_model_file_a_full_disk_kept_from_it_on_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--limit-train", 64, "--epochs", 1]
    line = one_error_line(run(BASELINE, *args, patch=NO_ROOM_FOR_THE_MODEL))
    assert line == (f"error: cannot write {out / 'cifar10.model'}: No space left on device; free space or choose "
                    "another --out-dir")
    assert not (out / "cifar10.model").exists() and not list(out.rglob("*.tmp"))
    resumed = run(BASELINE, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"wrote the missing {out / 'cifar10.model'} from {out / 'baseline.ckpt'}" in resumed.stdout
    assert same_model(out / "cifar10.model", torch.load(out / "baseline.ckpt", weights_only=True)["model"])


def test_a_finished_gan_writes_its_model_files_moved_away_on_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--out-dir", str(out), *map(str, COMMON), "--limit-train", "64", "--epochs",
            "1"]
    train_gan.main(args)
    for name in ("generator.model", "discriminator.model"):
        (out / name).unlink()
    capsys.readouterr()
    train_gan.main([*args, "--resume"])
    assert f"wrote the missing {out / 'generator.model'} and {out / 'discriminator.model'}" in capsys.readouterr().out
    ckpt = torch.load(out / "gan.ckpt", weights_only=True)
    assert same_model(out / "generator.model", ckpt["generator"])
    assert same_model(out / "discriminator.model", ckpt["discriminator"])


# ---------------------------------------------------------------------------------------------------------
# Signals

# Sends the given signal to the trainer itself when it starts batch 3 of its first epoch.
SIGNAL_AT_BATCH_3 = """
import os, signal
from training import run as training_run
batches = training_run.Run.batches
def batches_then_signal(self, loader, epoch, start, epochs):
    for item in batches(self, loader, epoch, start, epochs):
        if item[0] == 3:
            os.kill(os.getpid(), signal.{name})
        yield item
training_run.Run.batches = batches_then_signal
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP", "SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_a_resumable_checkpoint_and_exits_75(data_dir, tmp_path, name):
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs", 1]
    stopped = run(GAN, *args, patch=SIGNAL_AT_BATCH_3.format(name=name))
    assert stopped.returncode == 75, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert f"stopped by {name} in epoch 1 after batch 4" in stopped.stdout and "--resume" in stopped.stdout
    ckpt = torch.load(out / "gan.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (0, 4)
    resumed = run(GAN, *args, "--resume")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout and "epoch 1, batch 4" in resumed.stdout
    assert torch.load(out / "gan.ckpt", weights_only=True)["epoch"] == 1


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_half_file(data_dir, tmp_path):
    """The first Ctrl-C asks for a checkpoint; a second one while it is being written stops at once: one line,
    exit 130, no temporary file, and no checkpoint (there was none before)."""
    second_while_saving = SIGNAL_AT_BATCH_3.format(name="SIGINT") + """
import threading
fsync = os.fsync
def fsync_interrupted(fd):  # the checkpoint's temporary file is written and is being flushed to disk
    if threading.current_thread() is threading.main_thread():
        os.kill(os.getpid(), signal.SIGINT)
    fsync(fd)
os.fsync = fsync_interrupted
"""
    out = tmp_path / "run"
    result = run(GAN, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs", 1, patch=second_while_saving)
    assert result.returncode == 130, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Ctrl-C")]
    assert lines == ["interrupted"]
    assert not list(out.rglob("*.tmp")) and not (out / "gan.ckpt").exists() and not (out / "gan.lock").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_signal_during_start_up_exits_75_and_leaves_the_checkpoint(data_dir, tmp_path, resume):
    """SIGTERM while the data is loading (a scheduler's walltime warning that comes early)."""
    during_loading = """
import os, signal
from training import data
load_split = data.load_split
def load_split_then_signal(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return load_split(*args)
data.load_split = load_split_then_signal
"""
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON]
    if resume:  # a run stopped in epoch 1
        assert run(BASELINE, *args, "--epochs", 2, patch=SIGNAL_AT_BATCH_3.format(name="SIGTERM")).returncode == 75
    before = snapshot(out) if resume else {}
    result = run(BASELINE, *args, "--epochs", 2, *(["--resume"] if resume else []), patch=during_loading)
    assert result.returncode == 75, result.stderr
    assert "stopped by SIGTERM before training" in result.stdout and "Traceback" not in result.stderr
    after = snapshot(out) if out.exists() else {}
    assert after == before


def test_a_kill_while_appending_metrics_loses_no_epoch(data_dir, tmp_path):
    """Killed (kill -9) halfway through writing epoch 2's metrics line: --resume redoes epoch 2, the file then
    holds every epoch once, and report.py reads all of them."""
    half_line_then_die = """
import os
from training import records
append = records.append_metrics
def append_or_die(path, record):
    if record["epoch"] == 2:
        with open(path, "a") as f:
            f.write('{"epoch": 2, "lr": 0.00')
        os._exit(137)
    append(path, record)
records.append_metrics = append_or_die
"""
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs", 3]
    assert run(BASELINE, *args, patch=half_line_then_die).returncode == 137
    assert run(BASELINE, *args, "--resume").returncode == 0
    records, skipped = read_metrics(out / "baseline_metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and skipped == 0
    report = subprocess.run([sys.executable, os.path.join(REPO, "report.py"), "--baseline-dir", out, "--gan-dir",
                             out, "--vis-dir", tmp_path / "vis", "--out-dir", tmp_path / "report"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "| 3 |" in (tmp_path / "report" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# Several processes: every decision that leads to a write or a stop is agreed first

def torchrun(*args, patch=""):
    """train_gan.py on 2 gloo processes, each running patch first."""
    wrapper = os.path.join(args[0], "wrapped_train_gan.py")
    with open(wrapper, "w") as f:
        f.write(f"import sys; sys.path.insert(0, {REPO!r})\nimport train_gan\n{patch}\ntrain_gan.main()\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper,
               *map(str, args[1:])]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_nan_on_rank_1_leaves_every_file_as_it_was(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON]
    assert run(GAN, *args, "--epochs", 1).returncode == 0
    before = snapshot(out)
    nan_on_rank_1 = """
import os, torch
from training import gan_steps
step = gan_steps.discriminator_step
def step_nan_on_rank_1(*args, **kwargs):
    monitored = step(*args, **kwargs)
    if os.environ["RANK"] == "1":
        monitored["gp"] = monitored["gp"] * float("nan")
    return monitored
gan_steps.discriminator_step = step_nan_on_rank_1
"""
    result = torchrun(tmp_path, *args, "--epochs", 2, "--resume", patch=nan_on_rank_1)
    assert result.returncode != 0
    assert "a loss became NaN or infinite in epoch 2" in result.stderr
    assert snapshot(out) == before


def test_sigterm_on_one_process_stops_both_at_an_epoch_of_8_batches(data_dir, tmp_path):
    """Rank 1 alone gets the signal; with 8 batches an epoch the processes agree at its last batch, finish the
    epoch and stop with 75, leaving a checkpoint that resumes in one process."""
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs", 50]
    sigterm_on_rank_1 = """
import os
if os.environ["RANK"] == "1":
""" + "\n".join("    " + line for line in SIGNAL_AT_BATCH_3.format(name="SIGTERM").strip().splitlines())
    result = torchrun(tmp_path, *args, patch=sigterm_on_rank_1)
    assert "stopped by a signal on another process after epoch 1" in result.stdout, result.stderr[-3000:]
    assert "exitcode  : 75" in result.stderr or result.returncode == 75
    ckpt = torch.load(out / "gan.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0)
    resumed = run(GAN, *args[:-2], "--epochs", 2, "--resume")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr


def test_the_fused_adam_setting_follows_the_device_not_the_checkpoint():
    params = [torch.nn.Parameter(torch.randn(3))]
    saved = torch.optim.Adam(params, lr=1e-3, fused=True).state_dict()  # as written on a GPU
    optimizer = torch.optim.Adam(params, lr=1e-3)
    optim.load_optimizer(optimizer, saved, torch.device("cpu"))
    assert [g["fused"] for g in optimizer.param_groups] == [None]


# ---------------------------------------------------------------------------------------------------------
# Flags out of range: one line each, before any work

BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"), (["--epochs", "10000000000"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--width", "0"], "--width"), (["--width", "100000"], "--width"), (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"), (["--lr", "inf"], "--lr"), (["--betas", "1", "0.9"], "--betas"),
    (["--betas", "0.5", "-0.1"], "--betas"), (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 64)], "--seed"),
    (["--limit-train", "0"], "--limit-train"), (["--limit-test", "-3"], "--limit-test"),
    (["--lock-wait", "-1"], "--lock-wait"), (["--device", "mps"], "--device"), (["--device", "cuda:x"], "--device"),
    (["--device", "cpu:3"], "--device"),
]
GAN_BAD_FLAGS = [
    (["--batch-size", "1"], "--batch-size"), (["--n-critic", "0"], "--n-critic"), (["--gen-train", "0"], "--n-critic"),
    (["--lambda-gp", "-1"], "--lambda-gp"), (["--feature-matching", "nan"], "--feature-matching"),
    (["--eval-n", "5"], "--eval-n"), (["--eval-every", "-1"], "--eval-every"),
]


@pytest.mark.parametrize("trainer, flags, word",
                         [(t, f, w) for t in (train_baseline, train_gan) for f, w in BAD_FLAGS] +
                         [(train_gan, f, w) for f, w in GAN_BAD_FLAGS])
def test_a_flag_out_of_range_is_one_line(trainer, flags, word, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        trainer.main(["--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err
    assert not (tmp_path / "out").exists()
