"""The TensorBoard events of both trainers, read back with TensorBoard's own reader: scalars, the grids with
their steps and the configuration, after a run, a resume, and a kill -9 between the events and the checkpoint
(a real process); a reader that was already watching drops the orphaned events; --no-tensorboard writes none."""
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys

import pytest
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_accumulator, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups, plugin_data_pb2

from conftest import REPO
from torch_utils.files import read_metrics
import train_baseline
import train_gan
from training import events, gan_steps, health, scalars
from training.data import CLASSES


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
    """Batches of 4: 52 per epoch, a monitor window every 50 batches. Steps count batches since the run began."""
    out = tmp_path / "run"
    train_gan.main(gan_args(data_dir, out, "--batch-size", 4, "--limit-train", 208, "--epochs", 1))
    first = read(out / "tb" / "gan")
    assert steps(first, "health/grad_norm") == [50] and steps(first, "accuracy/test_acc") == [52]
    train_gan.main(gan_args(data_dir, out, "--batch-size", 4, "--limit-train", 208, "--epochs", 2,
                            "--resume"))
    assert "warning" not in capsys.readouterr().out  # a healthy run raises none

    tb = read(out / "tb" / "gan")
    assert len(os.listdir(out / "tb" / "gan")) == 2  # one event file per process
    for tag in ("health/wasserstein", "health/grad_norm", "accuracy/fake_acc", "losses/g_ce", "losses/g_critic"):
        assert steps(tb, tag) == [50, 100], tag
    for tag in ("accuracy/test_acc", "settings/lr", "speed/images_per_s", "per_class/noise_spread/truck"):
        assert steps(tb, tag) == [52, 104], tag
    # The values are the metrics file's.
    records = read_metrics(out / "gan_metrics.jsonl")[0]
    monitors = [r for r in records if r["type"] == "monitor"]
    assert [e.value for e in tb.Scalars("health/grad_norm")] == pytest.approx([r["grad_norm"] for r in monitors])
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
import os, signal
from training import run as training_run
write_together, calls = training_run.write_together, []
def write_then_die(files, **options):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    write_together(files, **options)
training_run.write_together = write_then_die
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
    # (the events' folder, or its file that the resume trims of the end status of the run's first, finished part)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(out / 'tb' / 'gan'))}(/events\S+)?: File too large; "
                        "free space or choose another --out-dir, or pass --no-tensorboard", result.stderr.strip())
    assert (out / "gan.ckpt").read_bytes() == checkpoint


def test_a_kill_between_the_events_and_the_checkpoint_shows_no_step_twice(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = gan_args(data_dir, out, "--batch-size", 32, "--epochs", 2)  # 8 batches per epoch
    killed = run_patched(os.path.join(REPO, "train_gan.py"), KILL_IN_SECOND_SAVE, *args)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # TensorBoards that were already open read epoch 2's orphans (the server's reader and the plain one)
    server = plugin_event_accumulator.EventAccumulator(str(out / "tb" / "gan"), size_guidance={"tensors": 0})
    server.Reload()
    assert [e.step for e in server.Tensors("accuracy/test_acc")] == [8, 16]
    watching = read(out / "tb" / "gan")
    assert steps(watching, "accuracy/test_acc") == [8, 16]

    train_gan.main([*args, "--resume"])
    assert "resuming" in capsys.readouterr().out
    tb = read(out / "tb" / "gan")
    assert steps(tb, "accuracy/test_acc") == [8, 16] and [g.step for g in tb.Images("samples")] == [8, 16]
    assert tb.Images("samples")[1].encoded_image_string == (out / "output" / "001.png").read_bytes()
    # The orphans are gone from the files themselves, not only hidden: any reader sees each step once.
    written = [e.step for p in events.event_files(str(out / "tb" / "gan")) for e in EventFileLoader(p).Load()
               if any(v.tag == "accuracy/test_acc" for v in e.summary.value)]
    assert written == [8, 16]
    # The readers that were watching all along drop them too, from the new file's SessionLog.START.
    watching.Reload()
    assert steps(watching, "accuracy/test_acc") == [8, 16]
    server.Reload()
    assert [e.step for e in server.Tensors("accuracy/test_acc")] == [8, 16]
    assert [e.value for e in watching.Scalars("accuracy/test_acc")] == \
        [e.value for e in tb.Scalars("accuracy/test_acc")]


def test_events_past_the_checkpoint_are_dropped_from_the_files(tmp_path):
    folder = str(tmp_path / "tb")
    first = events.Events(folder, -1, {"width": 8, "betas": [0.0, 0.9], "limit_train": 64})
    for step in range(1, 11):
        first.scalars({"monitor/x": float(step)}, step)
    first.close()
    second = events.Events(folder, 6, {"width": 8})  # the checkpoint reached step 6
    second.scalars({"monitor/x": 70.0}, 7)
    second.close()
    tb = read(folder)
    assert steps(tb, "monitor/x") == [1, 2, 3, 4, 5, 6, 7]
    assert tb.Scalars("monitor/x")[-1].value == 70.0
    assert configuration(tb)["limit_train"] == 64  # kept from the first process, not written again
    # A fresh run (no checkpoint) in the folder starts without the earlier attempt's events.
    events.Events(folder, -1, {"width": 8}).close()
    assert "monitor/x" not in read(folder).Tags()["scalars"]


def test_the_baseline_writes_its_epochs_and_no_tensorboard_writes_none(data_dir, tmp_path):
    common = ["--data-dir", str(data_dir), "--width", "8", "--device", "cpu", "--batch-size", "64", "--epochs", "2",
              "--limit-test", "20"]
    train_baseline.main([*common, "--out-dir", str(tmp_path / "on")])
    tb = read(tmp_path / "on" / "tb" / "baseline")
    assert steps(tb, "settings/lr") == [4, 8] and steps(tb, "losses/train_loss") == [4, 8]
    assert configuration(tb)["lr"] == pytest.approx(1e-4)

    train_baseline.main([*common, "--out-dir", str(tmp_path / "off"), "--no-tensorboard"])
    assert sorted(os.listdir(tmp_path / "off")) == ["baseline.ckpt", "baseline_metrics.jsonl", "cifar10.model"]


# ---------------------------------------------------------------------------------------------------------
# The view as a GAN user reads it


def test_windows_run_across_epochs_so_a_short_epoch_gets_curves_and_health_rules(data_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """16 batches an epoch (a --limit-train smoke run): the window of batches 1-50 ends in epoch 4. The window
    rules then run on it: grad_norm_off, its range and patience narrowed here, fires there."""
    rules = list(health.RULES)  # the rules' functions hold this list: changed in place, and restored
    health.RULES[:] = [r._replace(sustain=1) if r.name == "grad_norm_off" else r for r in rules]
    monkeypatch.setattr(health, "GRAD_NORM_RANGE", (5.0, 10.0))
    out = tmp_path / "run"
    try:
        train_gan.main(gan_args(data_dir, out, "--batch-size", 4, "--limit-train", 64, "--epochs", 4))
    finally:
        health.RULES[:] = rules
    monitors = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "monitor"]
    assert [(r["epoch"], r["batch"]) for r in monitors] == [(4, 2)]
    assert steps(read(out / "tb" / "gan"), "health/grad_norm") == [50]
    assert "warning: grad_norm_off at epoch 4, batch 2: " in capsys.readouterr().out


@pytest.fixture(scope="module")
def both(data_dir, tmp_path_factory):
    """One out-dir with a finished baseline (1 epoch) and a finished GAN (2 epochs of 26 batches, minibatch
    discrimination: a window at batch 50)."""
    out = tmp_path_factory.mktemp("both")
    common = ["--data-dir", str(data_dir), "--out-dir", str(out), "--width", "8", "--device", "cpu", "--limit-test",
              "20"]
    train_baseline.main([*common, "--epochs", "1", "--batch-size", "32"])
    train_gan.main([*common, "--epochs", "2", "--batch-size", "10", "--minibatch-discrimination"])
    return out


def test_the_scalars_are_grouped_by_what_a_user_looks_for(both):
    tb = read(both / "tb" / "gan")
    groups = {}
    for tag in tb.Tags()["scalars"]:
        groups.setdefault(tag.split("/")[0], []).append(tag.split("/", 1)[1])
    assert set(groups) == {"health", "losses", "accuracy", "speed", "settings", "per_class"}
    assert sorted(groups["health"]) == ["grad_norm", "wasserstein"]
    assert {"test_acc", "real_acc", "fake_acc"} == set(groups["accuracy"])
    assert {"gp", "real_score", "fake_score", "g_loss"} <= set(groups["losses"])
    assert sorted(groups["settings"]) == ["lambda_gp", "lr"]
    assert len(groups["per_class"]) == 10
    baseline = {tag.split("/")[0] for tag in read(both / "tb" / "baseline").Tags()["scalars"]}
    assert baseline == {"losses", "accuracy", "speed", "settings"}


def test_the_gan_view_puts_health_first_and_each_class_in_one_chart(both):
    """TensorBoard's Custom Scalars plugin, as its server merges the runs' layouts: the groups in a GAN user's
    order, and the noise spread as one chart whose lines are the ten classes."""
    plugin = custom_scalars_plugin.CustomScalarsPlugin(tensorboard_context(both))
    layout = json.loads(plugin.layout_impl(tb_context.RequestContext(), ""))
    assert [c["title"] for c in layout["category"]] == ["health", "losses", "accuracy", "speed", "eval"]
    charts = {chart["title"]: chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]}
    spread = next(tags for title, tags in charts.items() if title.startswith("fixed-noise samples' spread"))
    tags = read(both / "tb" / "gan").Tags()["scalars"]
    assert sorted(t for t in tags if re.search(spread[0], t)) == sorted(f"per_class/noise_spread/{c}" for c in CLASSES)
    accuracy = charts["accuracy"]
    both_runs = [t for t in read(both / "tb" / "baseline").Tags()["scalars"] if any(re.search(p, t) for p in accuracy)]
    assert "accuracy/test_acc" in both_runs  # the baseline's test accuracy joins the GAN's chart


def test_every_discriminator_monitor_reaches_its_group_window_and_chart():
    """The readers follow gan_steps.MONITORED: each value's window is a scalar of its group, an epoch record leaves
    it out, and the Custom Scalars chart of its report panel shows it; the console table has its column."""
    charts = {title: patterns for group in scalars.GAN_LAYOUT.values() for title, (_, patterns) in group.items()}
    for m in gan_steps.MONITORED:
        assert scalars.tags("window", {m.key: 0.5}) == {f"{m.group}/{m.key}": 0.5}
        assert scalars.tags("epoch", {m.key: 0.5}) == {}
        assert any(re.search(p, f"{m.group}/{m.key}") for p in charts[m.panel])
        assert (m.column in [heading for heading, _, _ in train_gan.TABLE.columns]) == bool(m.column)


def test_a_new_generator_term_is_a_windowed_loss_in_the_generators_chart():
    """A g_ term added to gan.generator_loss reaches its group, its window curve and its chart by its prefix."""
    assert scalars.tags("window", {"g_new": 0.5, "g_ce": 2.0}) == {"losses/g_new": 0.5, "losses/g_ce": 2.0}
    assert scalars.tags("epoch", {"g_new": 0.5, "test_acc": 0.3}) == {"accuracy/test_acc": 0.3}
    chart, = scalars.GAN_LAYOUT["losses"]["generator loss and its terms"][1]
    assert [t for t in ("losses/g_loss", "losses/g_critic", "losses/g_fm", "losses/g_new", "losses/g_ce")
            if re.search(chart, t)] == ["losses/g_loss", "losses/g_critic", "losses/g_fm", "losses/g_new"]


def tensorboard_context(logdir):
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    return base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)


def hparams_table(logdir):
    """(columns {name: type}, {run: (status, {name: value kind})}) as TensorBoard's hparams plugin computes them."""
    backend = backend_context.Context(tensorboard_context(logdir))
    request = tb_context.RequestContext()
    content = backend.hparams_metadata(request, "")
    experiment = backend.experiment_from_metadata(request, "", False, content,
                                                  backend.hparams_from_data_provider(request, "", None))
    columns = {h.name: api_pb2.DataType.Name(h.type) for h in experiment.hparam_infos}
    groups = list_session_groups.Handler(request, backend, "", api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=list(api_pb2.Status.values()))).run()
    return columns, {s.name: (api_pb2.Status.Name(s.status), {k: v.WhichOneof("kind") for k, v in g.hparams.items()})
                     for g in groups.session_groups for s in g.sessions}


def test_the_hparams_table_has_every_trainers_columns_and_booleans(both):
    columns, runs = hparams_table(both)
    # The GAN's own settings are columns though the baseline's run comes first, and a flag is a boolean.
    assert {"lambda_gp", "n_critic", "feature_matching", "lr", "width"} <= set(columns)
    assert columns["minibatch_discrimination"] == "DATA_TYPE_BOOL"
    assert runs["tb/gan"][1]["minibatch_discrimination"] == "bool_value"
    assert {status for status, _ in runs.values()} == {"STATUS_SUCCESS"}  # both have finished
    assert not any(events.hparams_metadata.EXPERIMENT_TAG in read_tags(p) for p in
                   events.event_files(str(both / "tb" / "gan")) + events.event_files(str(both / "tb" / "baseline")))


# Sends the trainer SIGTERM as it appends the record of epoch 1: it saves and exits 75 after that epoch.
STOP_AFTER_EPOCH_1 = """
import os, signal
from training import records
append_metrics = records.append_metrics
def append_then_stop(path, record):
    append_metrics(path, record)
    if record.get("type") == "epoch" and record["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGTERM)
records.append_metrics = append_then_stop
"""


def test_a_run_reads_as_finished_only_once_it_has(data_dir, tmp_path):
    """Stopped after epoch 1 (exit 75): no status. Resumed to its end: success. Trained further (a GAN's larger
    --epochs) and stopped again: no status until it ends."""
    out = tmp_path / "run"
    args = gan_args(data_dir, out, "--batch-size", 32, "--limit-train", 64)
    status = lambda: hparams_table(out)[1]["tb/gan"][0]  # noqa: E731
    stopped = run_patched(os.path.join(REPO, "train_gan.py"), STOP_AFTER_EPOCH_1, *args, "--epochs", "2")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert status() == "STATUS_UNKNOWN"
    train_gan.main([*args, "--epochs", "2", "--resume"])
    assert status() == "STATUS_SUCCESS"
    killed = run_patched(os.path.join(REPO, "train_gan.py"), KILL_IN_SECOND_SAVE.replace("== 2", "== 1"), *args,
                         "--epochs", "3", "--resume")
    assert killed.returncode == -9
    train_gan.main([*args, "--epochs", "4", "--resume"])
    assert status() == "STATUS_SUCCESS"
    ends = [e.step for p in events.event_files(str(out / "tb" / "gan")) for e in EventFileLoader(p).Load()
            if events.END_TAG in {v.tag for v in e.summary.value}]
    assert ends == [8]  # once, at the last step (4 epochs of 2 batches)


def test_each_start_writes_how_it_runs_as_text(data_dir, tmp_path):
    out = tmp_path / "run"
    args = gan_args(data_dir, out, "--batch-size", 32, "--limit-train", 64, "--epochs", 1)
    for extra in ([], ["--epochs", "2", "--resume"]):
        result = subprocess.run([sys.executable, os.path.join(REPO, "train_gan.py"), *args, *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    tb = EventAccumulator(str(out / "tb" / "gan"), size_guidance={"tensors": 0})
    tb.Reload()
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in tb.Tensors("run/configuration/text_summary")]
    assert [step for step, _ in texts] == [0, 3]
    fresh, resumed = (text for _, text in texts)
    assert fresh.splitlines()[0] == "    " + shlex.join(["python", os.path.join(REPO, "train_gan.py"), *args])
    for line in (f"- data: {data_dir}, 64 training images", "- device: cpu, 1 process(es), precision fp32",
                 "- epochs: 1, 2 batches of 32 per epoch", f"- out-dir: {out}"):
        assert line in fresh.splitlines()
    assert "- start: a fresh run, " in fresh and "- start: resumed at epoch 2, batch 0, " in resumed
    assert "- epochs: 2, 2 batches of 32 per epoch" in resumed.splitlines()
