"""train_baseline.py end to end through its command line, on a tiny image-folder CIFAR: the files it writes,
stopping on SIGTERM and resuming (to the same weights as an uninterrupted run), the one-line errors of bad input,
checkpoint.load_model's refusals, and learning on a separable task."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision

import checkpoint
import data
import models
import train_baseline
from conftest import REPO, write_image_folder
from runtime import UserError

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

stop_after = int(os.environ.get("TEST_STOP_AFTER_EPOCH", "0"))
append_metrics = train_baseline.append_metrics

def append_then_stop(path, record):
    append_metrics(path, record)
    if record["epoch"] == stop_after:
        os.kill(os.getpid(), signal.SIGTERM)

train_baseline.append_metrics = append_then_stop
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
def data_dir(tmp_path_factory):
    """260 train and 100 test images in class folders, with their caches already built (the runs below start
    side by side and would otherwise both write them)."""
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root)
    for split in ("train", "test"):
        data.load_split(root, split)
    return root


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
    assert test.accuracy(loaded) == pytest.approx(metrics(finished_run)[-1]["test_acc"])


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

def bad_input_args(case, root, data_dir, finished):
    """The command-line arguments of a bad-input case; writes what the case needs under root."""
    def new_dir(name):
        path = root / name
        path.mkdir()
        return path

    def with_data(data_path):
        return ["--data-dir", data_path, "--out-dir", new_dir("out"), "--epochs", 2, *COMMON]

    def with_out(out_dir, *extra):
        return ["--data-dir", data_dir, "--out-dir", out_dir, "--epochs", 2, *COMMON, *extra]

    if case == "missing data dir":
        return with_data(root / "nowhere")
    if case == "empty data dir":
        return with_data(new_dir("empty"))
    if case == "data dir with neither layout":
        (new_dir("foreign") / "notes.txt").write_text("no images here")
        return with_data(root / "foreign")
    if case == "class folders without images":
        for name in data.CLASSES:
            (root / "imageless" / "train" / name).mkdir(parents=True)
            (root / "imageless" / "test" / name).mkdir(parents=True)
        return with_data(root / "imageless")
    if case == "checkpoint of another width":
        return with_out(finished, "--resume", "--width", 8)
    if case == "checkpoint without --resume":
        return with_out(finished)
    if case == "generator model as checkpoint":
        out = new_dir("generator")
        checkpoint.save_model(models.Generator(16), str(out / "generator.model"))
        os.rename(out / "generator.model", out / "baseline.ckpt")
        return with_out(out, "--resume")
    if case == "gan checkpoint":
        out = new_dir("gan")
        torch.save({"job": "gan", "config": {"width": 16}, "epoch": 1, "batch": 0}, out / "baseline.ckpt")
        return with_out(out, "--resume")
    if case == "non-torch checkpoint":
        out = new_dir("junk")
        (out / "baseline.ckpt").write_bytes(bytes(range(256)) * 3)
        return with_out(out, "--resume")
    if case == "out-dir below a regular file":
        (root / "a_file").write_text("not a folder")
        return with_out(root / "a_file" / "run")
    if case == "zero epochs":
        return with_out(new_dir("out"), "--epochs", 0)
    if case == "unknown device":
        return with_out(new_dir("out"), "--device", "tpu9")
    raise KeyError(case)


BAD_INPUT = {  # case: a word its message must contain
    "missing data dir": "download",
    "empty data dir": "download",
    "data dir with neither layout": "cifar-10-batches-py",
    "class folders without images": "no images",
    "checkpoint of another width": "--width",
    "checkpoint without --resume": "--resume",
    "generator model as checkpoint": "baseline.ckpt",
    "gan checkpoint": "gan",
    "non-torch checkpoint": "baseline.ckpt",
    "out-dir below a regular file": "out-dir",
    "zero epochs": "--epochs",
    "unknown device": "device",
}


def assert_one_line_error(returncode, stderr, word):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    assert word in lines[0]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, data_dir, finished_run, capsys, monkeypatch):
    downloads = []

    def no_download(*args, **kwargs):
        downloads.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    argv = [str(a) for a in bad_input_args(case, tmp_path, data_dir, finished_run)]
    with pytest.raises(SystemExit) as exit_:
        train_baseline.main(argv)
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, BAD_INPUT[case])
    assert len(downloads) == (1 if case in ("missing data dir", "empty data dir") else 0)


def test_bad_input_through_the_real_command_line(tmp_path, data_dir, finished_run):
    """As a real process too: exit status 2 and one line."""
    case = "checkpoint without --resume"
    result = run_cli(*bad_input_args(case, tmp_path, data_dir, finished_run))
    assert_one_line_error(result.returncode, result.stderr, BAD_INPUT[case])


def test_refused_checkpoints_leave_the_run_untouched(finished_run, tmp_path, data_dir, capsys):
    before = {name: os.stat(finished_run / name).st_mtime_ns for name in os.listdir(finished_run)}
    for case in ("checkpoint of another width", "checkpoint without --resume"):
        with pytest.raises(SystemExit):
            train_baseline.main([str(a) for a in bad_input_args(case, tmp_path / case, data_dir, finished_run)])
    assert {name: os.stat(finished_run / name).st_mtime_ns for name in os.listdir(finished_run)} == before
    assert sorted(before) == ["baseline.ckpt", "baseline_metrics.jsonl", "cifar10.model"]


# ---------------------------------------------------------------------------------------------------------
# checkpoint.load_model refusals

def test_load_model_refuses_a_generator_file_as_discriminator(tmp_path):
    path = str(tmp_path / "generator.model")
    checkpoint.save_model(models.Generator(8), path)
    with pytest.raises(UserError, match="generator"):
        checkpoint.load_model(path, "discriminator")
    assert isinstance(checkpoint.load_model(path, "generator"), models.Generator)


def test_load_model_refuses_weights_that_do_not_fit_the_config(tmp_path):
    path = str(tmp_path / "cifar10.model")
    record = checkpoint.model_record(models.Discriminator(8))
    record["config"]["width"] = 16
    torch.save(record, path)
    with pytest.raises(UserError, match="width"):
        checkpoint.load_model(path, "discriminator")


@pytest.mark.parametrize("content", [b"", b"hello, not a model", bytes(range(256)) * 4])
def test_load_model_refuses_a_file_that_is_not_ours(tmp_path, content):
    path = tmp_path / "cifar10.model"
    path.write_bytes(content)
    with pytest.raises(UserError):
        checkpoint.load_model(str(path), "discriminator")


def test_atomic_save_to_a_place_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        checkpoint.atomic_save({"x": torch.zeros(2)}, str(tmp_path / "a_file" / "baseline.ckpt"))


def test_load_model_of_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nothing.model"), "discriminator")


# ---------------------------------------------------------------------------------------------------------
# Learning

def test_discriminator_learns_a_separable_task(data_dir):
    """A few dozen Adam steps on the tiny class-coloured images reach far above chance on held-out images."""
    torch.manual_seed(0)
    model = models.Discriminator(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = data.Loader(*data.load_split(data_dir, "train"), 64, "cpu", train=True)
    test = data.Loader(*data.load_split(data_dir, "test"), 100, "cpu", train=False)
    before = test.accuracy(model.eval())
    losses = []
    for epoch in range(8):
        model.train()
        for _, images, labels in train.batches(epoch):
            loss = F.cross_entropy(model(data.to_float(images))[1], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    after = test.accuracy(model.eval())
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
        loss, correct = real_step(*args)
        return loss * float("nan"), correct
    monkeypatch.setattr(train_baseline, "train_step", nan_step)
    if stop_signal:
        monkeypatch.setattr(train_baseline.Runtime, "stop_requested", lambda self, stop, batch: True)
    with pytest.raises(SystemExit) as exit_info:
        train_baseline.main([str(a) for a in ("--data-dir", data_dir, "--out-dir", out, "--epochs", 2, *COMMON,
                                              "--resume")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: the loss became nan in epoch 2") and "lower --lr" in message
    assert (out / "baseline.ckpt").read_bytes() == before
