"""The TensorBoard events of both trainers, read back with TensorBoard's own reader: scalars, the grids with
their steps and the configuration, after a run, a resume, and a kill -9 between the events and the checkpoint
(a real process); a reader that was already watching drops the orphaned events; --no-tensorboard writes none."""
import os
import resource
import signal
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

import events
import train_baseline
import train_gan
from conftest import REPO
from files import read_metrics


def gan_args(data_dir, out, *extra):
    return list(map(str, ["--data-dir", data_dir, "--out-dir", out, "--width", 8, "--device", "cpu",
                          "--limit-test", 20, *extra]))


def read(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator, tag):
    return [e.step for e in accumulator.Scalars(tag)]


def configuration(accumulator):
    content = accumulator.PluginTagToContent("hparams")[events.HPARAMS_TAG]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}


def test_a_run_and_its_resume_continue_the_same_curves(data_dir, tmp_path, capsys):
    """Batches of 4: 52 per epoch, a monitor window at batch 50. Steps count batches since the run began."""
    out = tmp_path / "run"
    train_gan.main(gan_args(data_dir, out, "--batch-size", 4, "--limit-train", 208, "--epochs", 1))
    first = read(out / "tb" / "gan")
    assert steps(first, "monitor/grad_norm") == [50] and steps(first, "epoch/test_acc") == [52]
    train_gan.main(gan_args(data_dir, out, "--batch-size", 4, "--limit-train", 208, "--epochs", 2,
                            "--resume"))
    assert "warning" not in capsys.readouterr().out  # a healthy run raises none

    tb = read(out / "tb" / "gan")
    assert len(os.listdir(out / "tb" / "gan")) == 2  # one event file per process
    for tag in ("monitor/wasserstein", "monitor/grad_norm", "monitor/fake_acc", "monitor/g_ce", "monitor/g_critic"):
        assert steps(tb, tag) == [50, 102], tag
    for tag in ("epoch/test_acc", "epoch/lr", "epoch/wasserstein", "epoch/noise_spread_per_class/truck"):
        assert steps(tb, tag) == [52, 104], tag
    # The values are the metrics file's.
    records = read_metrics(out / "gan_metrics.jsonl")[0]
    monitors = [r for r in records if r["type"] == "monitor"]
    assert [e.value for e in tb.Scalars("monitor/grad_norm")] == pytest.approx([r["grad_norm"] for r in monitors])
    assert not [r for r in records if r["type"] == "warning"]
    # The grid of every epoch, the same PNG as output/NNN.png.
    grids = tb.Images("samples")
    assert [g.step for g in grids] == [52, 104]
    assert grids[1].encoded_image_string == (out / "output" / "001.png").read_bytes()
    # The run's configuration, once.
    config = configuration(tb)
    assert config["width"] == 8 and config["batch_size"] == 4 and config["betas"] == "[0.0, 0.9]"
    assert "device" not in config  # what may change on a resume is not the run's configuration
    assert sum(events.HPARAMS_TAG in tags for tags in
               (read_tags(p) for p in events.event_files(str(out / "tb" / "gan")))) == 1


def read_tags(path):
    return {v.tag for e in EventFileLoader(str(path)).Load() for v in e.summary.value}


# Kills the trainer (SIGKILL, no clean-up) in the save of epoch 2: its events are flushed, its checkpoint is not.
KILL_IN_SECOND_SAVE = """
import os, signal, training
write_together, calls = training.write_together, []
def write_then_die(files, **options):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    write_together(files, **options)
training.write_together = write_then_die
"""


def run_patched(script, patch, *args, limit_bytes=None):
    """The script as a real process, patch run first; limit_bytes: no file it writes may grow past that size
    (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG as on a full disk)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    code = (f"import sys; sys.path.insert(0, {REPO!r}); sys.argv[0] = {script!r}\n{patch}\n"
            f"import runpy; runpy.run_path({script!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limited if limit_bytes else None)


def test_a_full_disk_under_the_events_is_one_line_and_costs_no_checkpoint(data_dir, tmp_path):
    """The resumed run's event file cannot take epoch 2's grid (~200 KB at width 8): one line naming the events'
    folder, and the epoch-1 checkpoint as it was."""
    out = tmp_path / "run"
    args = gan_args(data_dir, out, "--batch-size", 32)
    train_gan.main([*args, "--epochs", "1"])
    checkpoint = (out / "gan.ckpt").read_bytes()
    result = run_patched(os.path.join(REPO, "train_gan.py"), "", *args, "--epochs", "2", "--resume",
                         limit_bytes=150_000)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: cannot write {out / 'tb' / 'gan'}: File too large; free space or "
                                     "choose another --out-dir, or pass --no-tensorboard")
    assert (out / "gan.ckpt").read_bytes() == checkpoint


def test_a_kill_between_the_events_and_the_checkpoint_shows_no_step_twice(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = gan_args(data_dir, out, "--batch-size", 32, "--epochs", 2)  # 8 batches per epoch
    killed = run_patched(os.path.join(REPO, "train_gan.py"), KILL_IN_SECOND_SAVE, *args)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # TensorBoards that were already open read epoch 2's orphans (the server's reader and the plain one)
    server = plugin_event_accumulator.EventAccumulator(str(out / "tb" / "gan"), size_guidance={"tensors": 0})
    server.Reload()
    assert [e.step for e in server.Tensors("epoch/test_acc")] == [8, 16]
    watching = read(out / "tb" / "gan")
    assert steps(watching, "epoch/test_acc") == [8, 16]

    train_gan.main([*args, "--resume"])
    assert "resuming" in capsys.readouterr().out
    tb = read(out / "tb" / "gan")
    assert steps(tb, "epoch/test_acc") == [8, 16] and [g.step for g in tb.Images("samples")] == [8, 16]
    assert tb.Images("samples")[1].encoded_image_string == (out / "output" / "001.png").read_bytes()
    # The orphans are gone from the files themselves, not only hidden: any reader sees each step once.
    written = [e.step for p in events.event_files(str(out / "tb" / "gan")) for e in EventFileLoader(p).Load()
               if any(v.tag == "epoch/test_acc" for v in e.summary.value)]
    assert written == [8, 16]
    # The readers that were watching all along drop them too, from the new file's SessionLog.START.
    watching.Reload()
    assert steps(watching, "epoch/test_acc") == [8, 16]
    server.Reload()
    assert [e.step for e in server.Tensors("epoch/test_acc")] == [8, 16]
    assert [e.value for e in watching.Scalars("epoch/test_acc")] == [e.value for e in tb.Scalars("epoch/test_acc")]


def test_events_past_the_checkpoint_are_dropped_from_the_files(tmp_path):
    folder = str(tmp_path / "tb")
    first = events.Events(folder, -1, {"width": 8, "betas": [0.0, 0.9], "limit_train": None}, ["epoch/test_acc"])
    for step in range(1, 11):
        first.scalars({"monitor/x": float(step)}, step)
    first.close()
    second = events.Events(folder, 6, {"width": 8}, ["epoch/test_acc"])  # the checkpoint reached step 6
    second.scalars({"monitor/x": 70.0}, 7)
    second.close()
    tb = read(folder)
    assert steps(tb, "monitor/x") == [1, 2, 3, 4, 5, 6, 7]
    assert tb.Scalars("monitor/x")[-1].value == 70.0
    assert configuration(tb)["limit_train"] == "None"  # kept from the first process, not written again
    # A fresh run (no checkpoint) in the folder starts without the earlier attempt's events.
    events.Events(folder, -1, {"width": 8}, []).close()
    assert "monitor/x" not in read(folder).Tags()["scalars"]


def test_the_baseline_writes_its_epochs_and_no_tensorboard_writes_none(data_dir, tmp_path):
    common = ["--data-dir", str(data_dir), "--width", "8", "--device", "cpu", "--batch-size", "64", "--epochs", "2",
              "--limit-test", "20"]
    train_baseline.main([*common, "--out-dir", str(tmp_path / "on")])
    tb = read(tmp_path / "on" / "tb" / "baseline")
    assert steps(tb, "epoch/lr") == [4, 8] and steps(tb, "epoch/train_loss") == [4, 8]
    assert configuration(tb)["lr"] == pytest.approx(1e-4)

    train_baseline.main([*common, "--out-dir", str(tmp_path / "off"), "--no-tensorboard"])
    assert sorted(os.listdir(tmp_path / "off")) == ["baseline.ckpt", "baseline_metrics.jsonl", "cifar10.model"]
