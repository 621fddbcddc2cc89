"""training/run.py, the run plumbing both trainers share: test accuracy, running means, the flags a resume must
keep, the output folder's lock, and the metrics file's trimming on resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from metrics.accuracy import loader_accuracy
from models import Judgement
from torch_utils.cli import UserError
from torch_utils.files import append_metrics, read_metrics
from torch_utils.runtime import Runtime
import train_baseline
import train_gan
from training import data
from training import outdir_lock
from training import running_means
from training import progress
from training import run as training_run


# ---------------------------------------------------------------------------------------------------------
# Test accuracy

class FirstPixelModel(torch.nn.Module):
    """Predicts class (first pixel's 8-bit value) mod 10: a classifier whose answers are known by hand."""

    def forward(self, x):
        value = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return Judgement(torch.zeros(len(x), 1), torch.nn.functional.one_hot(value % 10, 10).float())


def test_accuracy_equals_a_hand_count():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (53, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (53,), generator=g)
    labels[:20] = images[:20, 0, 0, 0].long() % 10  # make some of them right
    hand = sum(int(images[i, 0, 0, 0]) % 10 == int(labels[i]) for i in range(53)) / 53
    assert 20 / 53 <= hand < 1
    loader = data.Loader(images, labels, 10, "cpu", train=False)
    assert loader_accuracy(FirstPixelModel(), loader) == pytest.approx(hand)


def test_accuracy_of_a_discriminator_is_its_argmax_hit_rate_in_eval_mode():
    from models import Discriminator
    torch.manual_seed(0)
    model = Discriminator(8)
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predictions = [model.eval()(data.to_float(images[i:i + 1]))[1].argmax().item() for i in range(30)]
    hand = sum(p == y for p, y in zip(predictions, labels.tolist())) / 30
    model.train()
    assert loader_accuracy(model, data.Loader(images, labels, 7, "cpu", train=False)) == pytest.approx(hand)
    assert model.training, "the trainers go on training after evaluating"


# ---------------------------------------------------------------------------------------------------------
# Running means

def test_meter_means_are_weighted_by_images_and_kept_per_name():
    meter = running_means.Meter("cpu")
    meter.add(4, loss=torch.tensor(1.0), acc=torch.tensor(0.5))
    meter.add(2, loss=torch.tensor(4.0), acc=torch.tensor(1.0))
    meter.add(g_loss=torch.tensor(3.0))  # a value added less often has its own count
    means = meter.means()
    assert means == pytest.approx({"loss": (4 + 8) / 6, "acc": (2 + 2) / 6, "g_loss": 3.0})


def test_meter_window_restarts_where_it_was_taken_and_the_epoch_does_not():
    meter = running_means.Meter("cpu")
    for value in (1.0, 2.0, 3.0):
        meter.add(gp=torch.tensor(value))
    assert meter.take_window() == pytest.approx({"gp": 2.0})
    meter.add(gp=torch.tensor(10.0))
    assert meter.take_window() == pytest.approx({"gp": 10.0})
    assert meter.means() == pytest.approx({"gp": 4.0})


def test_meter_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    meter = running_means.Meter("cpu")
    meter.add(3, loss=torch.tensor(0.25))
    meter.take_window()
    meter.add(1, loss=torch.tensor(2.0))
    torch.save({"meter": meter.state()}, tmp_path / "c.ckpt")
    restored = running_means.Meter("cpu")
    restored.load_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["meter"])
    assert restored.means() == pytest.approx(meter.means())
    assert restored.take_window() == pytest.approx({"loss": 2.0})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_meter_non_finite_rule_is_sticky(bad):
    meter = running_means.Meter("cpu")
    meter.add(loss=torch.tensor(1.0))
    assert bool(meter.finite())
    meter.add(loss=torch.tensor(bad))
    meter.add(loss=torch.tensor(1.0))
    meter.take_window()
    assert not bool(meter.finite()), "a non-finite value once added is never averaged away"


# ---------------------------------------------------------------------------------------------------------
# What a resume must keep: every flag but the declared ones. Each trainer's flags are listed here with another
# value; a flag added to a trainer and missing here fails the first test, so it is never left unchecked.

OTHER_VALUE = {
    "width": ["--width", "12"], "batch_size": ["--batch-size", "48"], "lr": ["--lr", "3e-4"],
    "betas": ["--betas", "0.5", "0.99"], "seed": ["--seed", "3"], "limit_train": ["--limit-train", "100"],
    "epochs": ["--epochs", "7"], "n_critic": ["--n-critic", "5"], "lambda_gp": ["--lambda-gp", "5"],
    "arch": ["--arch", "deep"], "feature_matching": ["--feature-matching", "0.5"],
    "minibatch_discrimination": ["--minibatch-discrimination"], "gp_every": ["--gp-every", "2"],
}
TRAINERS = {"baseline": train_baseline, "gan": train_gan}


@pytest.mark.parametrize("job", TRAINERS)
def test_every_flag_is_either_kept_on_resume_or_declared_free(job):
    args = TRAINERS[job].parse_args([])
    rules = TRAINERS[job].RESUME
    config = rules.config(args)
    free = rules.free | rules.tunable
    assert set(config) | free == set(vars(args))
    assert set(config) <= set(OTHER_VALUE), "give the new flag another value in OTHER_VALUE"


@pytest.mark.parametrize("job, flag", [(job, flag) for job, trainer in TRAINERS.items()
                                       for flag in trainer.RESUME.config(trainer.parse_args([]))])
def test_resuming_with_any_kept_flag_changed_is_refused(job, flag, tmp_path, capsys):
    trainer = TRAINERS[job]
    base = ["--data-dir", tmp_path / "no-data", "--out-dir", tmp_path, "--device", "cpu", "--limit-train", "64",
            "--epochs", "4"]
    base = [str(a) for a in base]
    config = trainer.RESUME.config(trainer.parse_args(base))
    torch.save({"job": job, "config": config, "epoch": 1, "batch": 0}, tmp_path / f"{job}.ckpt")
    with pytest.raises(SystemExit) as exit_:
        trainer.main(base + OTHER_VALUE[flag] + ["--resume"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and f"--{flag.replace('_', '-')}" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# One run per output folder

def test_a_second_holder_waits_then_refuses_naming_the_first(tmp_path):
    first = outdir_lock.OutDirLock(str(tmp_path / "gan.lock"))
    first.acquire(0, "train_gan.py")
    start = time.monotonic()
    with pytest.raises(UserError, match=f"another train_gan.py run .*pid {os.getpid()}"):
        outdir_lock.OutDirLock(str(tmp_path / "gan.lock")).acquire(0.5, "train_gan.py")
    assert time.monotonic() - start >= 0.5
    first.release()
    assert not (tmp_path / "gan.lock").exists()
    second = outdir_lock.OutDirLock(str(tmp_path / "gan.lock"))
    second.acquire(0, "train_gan.py")
    second.release()


def test_a_stop_signal_ends_the_wait_without_touching_the_holders_lock(tmp_path):
    holder = outdir_lock.OutDirLock(str(tmp_path / "gan.lock"))
    holder.acquire(0, "train_gan.py")
    before = (tmp_path / "gan.lock").read_bytes()
    waiter = outdir_lock.OutDirLock(str(tmp_path / "gan.lock"))
    start = time.monotonic()
    assert waiter.acquire(60, "train_gan.py", give_up=lambda: time.monotonic() - start > 0.5) is False
    assert time.monotonic() - start < 5
    waiter.release()
    assert (tmp_path / "gan.lock").read_bytes() == before
    holder.release()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "gan.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "then", "beat": 0}))
    lock = outdir_lock.OutDirLock(str(path))
    lock.acquire(0, "train_gan.py")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_stale_once_its_heartbeat_stops(tmp_path, monkeypatch):
    path = tmp_path / "gan.lock"
    path.write_text(json.dumps({"host": "crashed-node", "pid": 1, "since": "then", "beat": 7}))
    monkeypatch.setattr(outdir_lock.OutDirLock, "STALE_AFTER", 1.5)
    with pytest.raises(UserError, match="crashed-node"):
        outdir_lock.OutDirLock(str(path)).acquire(1, "train_gan.py")  # not watched long enough yet
    lock = outdir_lock.OutDirLock(str(path))
    lock.acquire(5, "train_gan.py")
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()


def test_the_holder_beats_so_it_is_never_taken_for_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir_lock.OutDirLock, "HEARTBEAT", 0.2)
    monkeypatch.setattr(outdir_lock.OutDirLock, "STALE_AFTER", 1.0)
    holder = outdir_lock.OutDirLock(str(tmp_path / "gan.lock"))
    holder.token["host"] = "another-node"  # as seen from here: no pid to check, only the heartbeat
    holder.acquire(0, "train_gan.py")
    time.sleep(0.5)
    with pytest.raises(UserError, match="another-node"):
        outdir_lock.OutDirLock(str(tmp_path / "gan.lock")).acquire(2.5, "train_gan.py")
    holder.release()
    assert not (tmp_path / "gan.lock").exists()


def gan_command(data_dir, out, *extra):
    return [sys.executable, os.path.join(REPO, "train_gan.py"), "--data-dir", str(data_dir), "--out-dir", str(out),
            "--width", "8", "--batch-size", "32", "--device", "cpu", "--limit-test", "20", *map(str, extra)]


def test_two_trainers_on_one_folder_never_run_at_once(tiny_image_folder, tmp_path):
    """The classic cluster mistake: a job resubmitted while the old one still runs. A second trainer refuses
    after its wait; one that waits long enough starts when the first has stopped, from its checkpoint."""
    out = tmp_path / "run"
    first = subprocess.Popen(gan_command(tiny_image_folder, out, "--epochs", 500), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "gan.ckpt").exists():  # the first has trained an epoch and holds the lock
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)

    refused = subprocess.run(gan_command(tiny_image_folder, out, "--epochs", 500, "--resume", "--lock-wait", 1),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: another train_gan.py run is using {out}")
    assert f"pid {first.pid}" in refused.stderr

    waiting = subprocess.Popen(gan_command(tiny_image_folder, out, "--epochs", 500, "--resume", "--lock-wait", 120),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert waiting.poll() is None and first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    assert "resuming" in waiting.stdout.readline()
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=120) == 75, waiting.stderr.read()

    epochs = [r["epoch"] for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1
    assert not (out / "gan.lock").exists() and not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# The metrics file on resume

NO_SIGNAL = SimpleNamespace(received=None)  # a StopSignal that has received nothing

def test_records_past_the_checkpoint_are_dropped_on_resume(tmp_path, monkeypatch):
    """A run that logged epoch 3 (and a monitor line of epoch 4) but died before saving its checkpoint of
    epoch 3: resuming from epoch 2 keeps each epoch's record once."""
    path = tmp_path / "gan_metrics.jsonl"
    for record in [{"type": "monitor", "epoch": 1, "batch": 50}, {"type": "epoch", "epoch": 1},
                   {"type": "monitor", "epoch": 2, "batch": 50}, {"type": "epoch", "epoch": 2},
                   {"type": "monitor", "epoch": 3, "batch": 50}, {"type": "epoch", "epoch": 3},
                   {"type": "monitor", "epoch": 4, "batch": 50}]:
        append_metrics(path, record)
    args = train_gan.parse_args(["--out-dir", str(tmp_path), "--resume", "--device", "cpu"])
    config = train_gan.RESUME.config(args)
    torch.save({"job": "gan", "config": config, "epoch": 2, "batch": 0}, tmp_path / "gan.ckpt")
    with training_run.Run("gan", "train_gan.py", args, Runtime("cpu"), NO_SIGNAL, train_gan.RESUME) as run:
        assert run.checkpoint["epoch"] == 2
    records, skipped = read_metrics(path)
    assert [(r["type"], r["epoch"]) for r in records] == [("monitor", 1), ("epoch", 1), ("monitor", 2),
                                                          ("epoch", 2)]
    assert skipped == 0


def test_a_fresh_run_starts_a_fresh_metrics_file(tmp_path):
    append_metrics(tmp_path / "baseline_metrics.jsonl", {"epoch": 1})
    args = train_baseline.parse_args(["--out-dir", str(tmp_path), "--device", "cpu"])
    rules = train_baseline.RESUME
    with training_run.Run("baseline", "train_baseline.py", args, Runtime("cpu"), NO_SIGNAL, rules) as run:
        assert run.checkpoint is None
    assert read_metrics(tmp_path / "baseline_metrics.jsonl") == ([], 0)


def test_a_table_declared_as_columns_lines_up_its_header_and_rows():
    table = progress.Table(("epoch", "epoch", "5d"), ("test acc", "test_acc", "8.4f"),
                           ("eta", lambda record: progress.duration(record["eta_s"]), ">7"))
    assert table.header() == "epoch test acc     eta"
    assert table.row({"epoch": 3, "test_acc": 0.5, "eta_s": 61}) == "    3   0.5000   1m01s"


def test_the_pace_is_the_measured_time_per_batch_times_the_batches_left():
    assert progress.pace(10.0, 5, 100, 3) == {"seconds_per_epoch": 200.0, "eta_s": 600.0}
    assert progress.pace(0.0, 0, 100, 3) == {"seconds_per_epoch": 0.0, "eta_s": 0.0}
