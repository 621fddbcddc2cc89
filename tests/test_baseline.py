"""train_baseline.py end to end through its command line, on a tiny image-folder CIFAR: the files it writes,
stopping on SIGTERM and resuming (to the same weights as an uninterrupted run), the one-line errors of bad input,
and learning on a separable task."""
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import REPO
from metrics.accuracy import loader_accuracy
import models
import train_baseline
from training import checkpoint
from training import data

SCRIPT = os.path.join(REPO, "train_baseline.py")
COMMON = ["--width", "16", "--device", "cpu", "--batch-size", "64", "--lr", "1e-3"]
METRIC_FIELDS = {"epoch", "lr", "train_loss", "train_acc", "test_acc", "seconds", "images_per_s"}

# Runs train_baseline.main() in a fresh interpreter that sends itself SIGTERM right after writing the metrics line
# of epoch TEST_STOP_AFTER_EPOCH, as a batch scheduler would; deterministic, unlike timing a kill from outside,
# which could land after the last batch. Sockets fail in it, as a guard against any network access.
WRAPPER = """
import os, signal, socket, sys
sys.path.insert(0, {repo!r})

def no_network(*args, **kwargs):
    raise OSError("network disabled by the test")

socket.getaddrinfo = socket.create_connection = socket.socket.connect = no_network
import train_baseline
from training import records

stop_after = int(os.environ.get("TEST_STOP_AFTER_EPOCH", "0"))
append_metrics = records.append_metrics

def append_then_stop(path, record):
    append_metrics(path, record)
    if record["epoch"] == stop_after:
        os.kill(os.getpid(), signal.SIGTERM)

records.append_metrics = append_then_stop
train_baseline.main()
""".format(repo=REPO)


def start_cli(*args, stop_after_epoch=None):
    """train_baseline.py with args in a subprocess; through WRAPPER when it is to stop after an epoch."""
    args = [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if stop_after_epoch is None:
        command = [sys.executable, SCRIPT] + args
    else:
        command = [sys.executable, "-c", WRAPPER] + args
        env["TEST_STOP_AFTER_EPOCH"] = str(stop_after_epoch)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(*args, **kwargs):
    return finish(start_cli(*args, **kwargs))


def metrics(out_dir):
    with open(os.path.join(out_dir, "baseline_metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "cifar10.model"), weights_only=True)["state_dict"]


def assert_ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The same 2-epoch run twice, side by side: uninterrupted in `finished`, and in `resumed` stopped by SIGTERM
    after epoch 1 (result `stopped`, leaving `metrics_when_stopped`) and then resumed (result `resume`)."""
    finished, resumed = tmp_path_factory.mktemp("finished"), tmp_path_factory.mktemp("resumed")
    args = ["--data-dir", data_dir, "--epochs", 2, *COMMON]
    uninterrupted = start_cli(*args, "--out-dir", finished)
    stopped = finish(start_cli(*args, "--out-dir", resumed, stop_after_epoch=1))
    assert_ok(finish(uninterrupted))
    metrics_when_stopped = metrics(resumed) if os.path.exists(resumed / "baseline_metrics.jsonl") else []
    model_when_stopped = os.path.exists(resumed / "cifar10.model")
    resume = run_cli(*args, "--out-dir", resumed, "--resume")
    return SimpleNamespace(finished=finished, resumed=resumed, stopped=stopped, resume=resume,
                           metrics_when_stopped=metrics_when_stopped, model_when_stopped=model_when_stopped)


@pytest.fixture(scope="module")
def finished_run(runs):
    """Out-dir of an uninterrupted 2-epoch run."""
    return runs.finished


# ---------------------------------------------------------------------------------------------------------
# A normal run

def test_metrics_file_has_one_line_per_epoch_with_all_fields(finished_run):
    lines = metrics(finished_run)
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_FIELDS <= set(m)
        assert 0 <= m["train_acc"] <= 1 and 0 <= m["test_acc"] <= 1
        assert m["seconds"] > 0 and m["images_per_s"] > 0 and m["train_loss"] > 0
    # The spec's schedule (lr / 10 from half the epochs on) scaled to 2 epochs.
    assert [m["lr"] for m in lines] == pytest.approx([1e-3, 1e-4])


def test_lr_schedule_follows_the_spec_at_100_epochs():
    args = train_baseline.parse_args(["--epochs", "100"])
    assert args.lr == 1e-4 and args.batch_size == 128 and args.width == 196
    lrs = [train_baseline.lr_at(epoch, args) for epoch in range(100)]
    assert lrs[:50] == pytest.approx([1e-4] * 50)
    assert lrs[50:75] == pytest.approx([1e-5] * 25)
    assert lrs[75:] == pytest.approx([1e-6] * 25)


def test_model_file_loads_with_weights_only_into_a_fresh_discriminator(finished_run, data_dir):
    record = torch.load(finished_run / "cifar10.model", weights_only=True)
    fresh = models.Discriminator(width=16)
    fresh.load_state_dict(record["state_dict"])
    loaded = checkpoint.load_model(str(finished_run / "cifar10.model"), "discriminator")
    assert isinstance(loaded, models.Discriminator) and loaded.width == 16 and not loaded.training
    for name, value in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    # It is the final model: its test accuracy is the last epoch's reported one.
    test = data.Loader(*data.load_split(data_dir, "test"), 500, "cpu", train=False)
    assert loader_accuracy(loaded, test) == pytest.approx(metrics(finished_run)[-1]["test_acc"])


def test_loss_falls_during_a_cli_run(finished_run):
    first, last = metrics(finished_run)
    assert last["train_loss"] < first["train_loss"]


# ---------------------------------------------------------------------------------------------------------
# Stop and resume

def test_sigterm_saves_a_checkpoint_and_exits_75(runs):
    stopped = runs.stopped
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    assert "SIGTERM" in stopped.stdout and "--resume" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert [m["epoch"] for m in runs.metrics_when_stopped] == [1]
    assert not runs.model_when_stopped  # only a finished run writes cifar10.model


def test_resume_continues_where_the_run_stopped(runs):
    assert_ok(runs.resume)
    assert "resuming" in runs.resume.stdout
    assert [m["epoch"] for m in metrics(runs.resumed)] == [1, 2]
    assert os.path.exists(runs.resumed / "cifar10.model")


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(runs):
    resumed, uninterrupted = weights(runs.resumed), weights(runs.finished)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    # Epoch 2 was split across the two processes; its totals are still those of the whole epoch.
    for a, b in zip(metrics(runs.resumed), metrics(runs.finished)):
        for field in ("train_loss", "train_acc", "test_acc"):
            assert a[field] == pytest.approx(b[field], rel=1e-5), field


def test_resume_of_a_finished_run_changes_nothing(runs, data_dir):
    out = runs.resumed
    files = ["baseline.ckpt", "cifar10.model", "baseline_metrics.jsonl"]
    before = {name: os.stat(out / name).st_mtime_ns for name in files}
    result = run_cli("--data-dir", data_dir, "--out-dir", out, "--epochs", 2, *COMMON, "--resume")
    assert_ok(result)
    assert "done" in result.stdout and "resuming" not in result.stdout
    assert {name: os.stat(out / name).st_mtime_ns for name in files} == before


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback. The cases call train_baseline.main(argv) in this
# process (an interpreter start per case would cost seconds); one also runs as a real process below.
# Each case writes what it needs under root and returns the arguments after the common ones.

def new_dir(root, name):
    path = root / name
    path.mkdir()
    return path


def missing_data_dir(root, data_dir, finished):
    return ["--data-dir", root / "nowhere", "--out-dir", new_dir(root, "out")]


def empty_data_dir(root, data_dir, finished):
    return ["--data-dir", new_dir(root, "empty"), "--out-dir", new_dir(root, "out")]


def data_dir_with_neither_layout(root, data_dir, finished):
    (new_dir(root, "foreign") / "notes.txt").write_text("no images here")
    return ["--data-dir", root / "foreign", "--out-dir", new_dir(root, "out")]


def class_folders_without_images(root, data_dir, finished):
    for name in data.CLASSES:
        (root / "imageless" / "train" / name).mkdir(parents=True)
        (root / "imageless" / "test" / name).mkdir(parents=True)
    return ["--data-dir", root / "imageless", "--out-dir", new_dir(root, "out")]


def checkpoint_of_another_width(root, data_dir, finished):
    return ["--data-dir", data_dir, "--out-dir", finished, "--resume", "--width", 8]


def checkpoint_of_other_betas(root, data_dir, finished):
    return ["--data-dir", data_dir, "--out-dir", finished, "--resume", "--betas", 0.5, 0.999]


def checkpoint_without_resume(root, data_dir, finished):
    return ["--data-dir", data_dir, "--out-dir", finished]


def generator_model_as_checkpoint(root, data_dir, finished):
    out = new_dir(root, "generator")
    checkpoint.save_model(models.Generator(16), str(out / "baseline.ckpt"))
    return ["--data-dir", data_dir, "--out-dir", out, "--resume"]


def gan_checkpoint(root, data_dir, finished):
    out = new_dir(root, "gan")
    torch.save({"job": "gan", "config": {"width": 16}, "epoch": 1, "batch": 0}, out / "baseline.ckpt")
    return ["--data-dir", data_dir, "--out-dir", out, "--resume"]


def non_torch_checkpoint(root, data_dir, finished):
    out = new_dir(root, "junk")
    (out / "baseline.ckpt").write_bytes(bytes(range(256)) * 3)
    return ["--data-dir", data_dir, "--out-dir", out, "--resume"]


def out_dir_below_a_regular_file(root, data_dir, finished):
    (root / "a_file").write_text("not a folder")
    return ["--data-dir", data_dir, "--out-dir", root / "a_file" / "run"]


def zero_epochs(root, data_dir, finished):
    return ["--data-dir", data_dir, "--out-dir", new_dir(root, "out"), "--epochs", 0]


def unknown_device(root, data_dir, finished):
    return ["--data-dir", data_dir, "--out-dir", new_dir(root, "out"), "--device", "tpu9"]


BAD_INPUT = [  # (case, a word its message must contain)
    (missing_data_dir, "download"),
    (empty_data_dir, "download"),
    (data_dir_with_neither_layout, "cifar-10-batches-py"),
    (class_folders_without_images, "no images"),
    (checkpoint_of_another_width, "--width"),
    (checkpoint_of_other_betas, "pass --betas 0.9 0.999 to resume it"),
    (checkpoint_without_resume, "--resume"),
    (generator_model_as_checkpoint, "baseline.ckpt"),
    (gan_checkpoint, "gan"),
    (non_torch_checkpoint, "baseline.ckpt"),
    (out_dir_below_a_regular_file, "out-dir"),
    (zero_epochs, "--epochs"),
    (unknown_device, "device"),
]
DOWNLOADING = (missing_data_dir, empty_data_dir)


def bad_input_argv(case, root, data_dir, finished):
    return [str(a) for a in ["--epochs", 2, *COMMON, *case(root, data_dir, finished)]]


def assert_one_line_error(returncode, stderr, word):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    assert word in lines[0]


@pytest.mark.parametrize("case, word", BAD_INPUT, ids=[case.__name__ for case, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(case, word, tmp_path, data_dir, finished_run, capsys, monkeypatch):
    downloads = []

    def no_download(*args, **kwargs):
        downloads.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    with pytest.raises(SystemExit) as exit_:
        train_baseline.main(bad_input_argv(case, tmp_path, data_dir, finished_run))
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, word)
    assert len(downloads) == (1 if case in DOWNLOADING else 0)


def test_bad_input_through_the_real_command_line(tmp_path, data_dir, finished_run):
    """As a real process too: exit status 2 and one line."""
    result = run_cli(*bad_input_argv(checkpoint_without_resume, tmp_path, data_dir, finished_run))
    assert_one_line_error(result.returncode, result.stderr, "--resume")


def test_refused_checkpoints_leave_the_run_untouched(finished_run, tmp_path, data_dir, capsys):
    before = {name: os.stat(finished_run / name).st_mtime_ns for name in os.listdir(finished_run)}
    for case in (checkpoint_of_another_width, checkpoint_without_resume):
        (tmp_path / case.__name__).mkdir()
        with pytest.raises(SystemExit):
            train_baseline.main(bad_input_argv(case, tmp_path / case.__name__, data_dir, finished_run))
    assert {name: os.stat(finished_run / name).st_mtime_ns for name in os.listdir(finished_run)} == before
    assert sorted(before) == ["baseline.ckpt", "baseline_metrics.jsonl", "cifar10.model", "tb"]


# ---------------------------------------------------------------------------------------------------------
# Learning

def test_discriminator_learns_a_separable_task(data_dir):
    """A few dozen Adam steps on the tiny class-coloured images reach far above chance on held-out images."""
    torch.manual_seed(0)
    model = models.Discriminator(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = data.Loader(*data.load_split(data_dir, "train"), 64, "cpu", train=True)
    test = data.Loader(*data.load_split(data_dir, "test"), 100, "cpu", train=False)
    before = loader_accuracy(model, test)
    losses = []
    for epoch in range(8):
        model.train()
        for _, images, labels in train.batches(epoch):
            loss = F.cross_entropy(model(data.to_float(images)).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    after = loader_accuracy(model, test)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    assert after >= 0.6 and after > before + 0.3


@pytest.mark.parametrize("stop_signal", [False, True])
def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoint(stop_signal, data_dir, finished_run, tmp_path,
                                                            monkeypatch, capsys):
    """A run resumed after epoch 1 whose loss turns NaN: neither the end of the epoch nor a stop signal may
    overwrite the last good checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    ckpt = torch.load(finished_run / "baseline.ckpt", weights_only=True)
    ckpt["epoch"] = 1  # as if the run had stopped after epoch 1
    torch.save(ckpt, out / "baseline.ckpt")
    before = (out / "baseline.ckpt").read_bytes()
    real_step = train_baseline.train_step

    def nan_step(*args):
        if stop_signal:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer's handler: a request to save and stop
        loss, accuracy = real_step(*args)
        return loss * float("nan"), accuracy
    monkeypatch.setattr(train_baseline, "train_step", nan_step)
    with pytest.raises(SystemExit) as exit_info:
        train_baseline.main([str(a) for a in ("--data-dir", data_dir, "--out-dir", out, "--epochs", 2, *COMMON,
                                              "--resume")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    # Checked at once when stopping, else at the epoch's last batch (260 images in batches of 64: 4).
    checked_at = 1 if stop_signal else 4
    assert message.startswith(f"error: a loss became NaN or infinite in epoch 2 by batch {checked_at};")
    assert message.endswith(f"is kept; to go on from it at half the learning rate, run the same command with "
                            f"--resume --lr 0.0005")
    assert (out / "baseline.ckpt").read_bytes() == before
