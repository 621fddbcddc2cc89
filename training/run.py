"""The run plumbing both trainers share, written once: their common flags, the output folder's lock
(outdir_lock.py), resuming or refusing a checkpoint, stopping on a signal, the non-finite loss rule, images/s,
test accuracy, the per-epoch console table, and the metrics written to the metrics file, to TensorBoard
(events.py) and through the health rules (health.py).

A trainer's loop, in this module's terms:

    with Run("gan", "train_gan.py", args, rt, stop, config) as run:   # --out-dir locked; run.checkpoint
        ... the models restored from run.checkpoint, if any ...
        for epoch, batches in run.epochs(train_loader, table):      # from where the checkpoint left off
            for b, images, labels in batches:
                ... one step ...; meter.add(loss=...)
                if run.should_stop(meter, epoch, b, len(train_loader)):  # agreed; raises on a NaN loss
                    run.save_and_stop(state(epoch, b + 1))               # checkpoint, then exit 75
                run.log_window(meter, epoch, b)                          # every LOG_EVERY batches
            seconds, images_per_s = run.epoch_speed()
            run.log(record); run.image("samples", png, epoch + 1)
            run.end_epoch(record, state(epoch + 1, 0), args.epochs)    # save, the table's row, a stop asked for
"""
import contextlib
import io
import os
import re
import shlex
import socket
import sys
import time

import torch

from training import health
from training.checkpoint import load_checkpoint
from torch_utils.cli import UserError, check_range
from training.data import Loader, load_split, to_float
from torch_utils.files import (append_metrics, output_folder, output_parts, read_metrics, rewrite_metrics, torch_bytes,
                               write_together)
from models import ARCHS, DEFAULT_WIDTH
from training.outdir_lock import OutDirLock
from torch_utils.runtime import DEVICE_HELP, EXIT_STOPPED, SPEED_HELP, progress_bar

LOG_EVERY = 50  # batches between running means in the progress bar and the metrics file (each a host sync)
AGREE_EVERY = 10  # batches between the processes' agreement on stopping, under torchrun (each a host sync)


# ---------------------------------------------------------------------------------------------------------
# Flags both trainers take

def add_data_args(parser):
    g = parser.add_argument_group("data and files")
    g.add_argument("--data-dir", default="data",
                   help="CIFAR-10: a folder with train/<class>/* and test/<class>/* images, or with torchvision's "
                        "cifar-10-batches-py/; downloaded here when missing or empty (default: data)")
    g.add_argument("--out-dir", default=".", help="where models, checkpoints and metrics go (default: .)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out-dir (starts fresh when there is none; "
                        "a finished run is left as it is, its model files written again if they are missing)")
    g.add_argument("--limit-train", type=int, metavar="N",
                   help="train on N training images, a random subset that is the same every run (smoke runs)")
    g.add_argument("--limit-test", type=int, metavar="N", help="evaluate on N test images, chosen the same way")
    g.add_argument("--lock-wait", type=float, default=120, metavar="SECONDS",
                   help="how long to wait for another run of this script on the same --out-dir to end before "
                        "refusing to start (default: 120)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="write no TensorBoard events (by default they go to <out-dir>/tb/<job>/: tensorboard "
                        "--logdir <out-dir> shows the run)")


def add_recipe_args(parser, epochs, lr, betas, epochs_note):
    """The flags of the nets, the optimizer and the schedule, with the trainer's defaults (its recipe)."""
    g = parser.add_argument_group("model and optimizer")
    g.add_argument("--arch", choices=tuple(ARCHS), default="hw",
                   help="the discriminator's conv table: hw, the assignment's 8 convs of --width channels; deep, "
                        "10 convs in stages of --width, 2x and 4x channels (default: hw)")
    g.add_argument("--width", type=int,
                   help="channels: of every hidden layer for --arch hw (the assignment: 196, or 128 to halve the "
                        "time), of the first stage for deep; the generator's too (default: "
                        + ", ".join(f"{w} for {a}" for a, w in DEFAULT_WIDTH.items()) + ")")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs to train; {epochs_note} (default: {epochs})")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch size, split across processes under torchrun (default: 128)")
    g.add_argument("--lr", type=float, default=lr, help=f"Adam's learning rate (default: {lr:g})")
    g.add_argument("--betas", type=float, nargs=2, default=list(betas), metavar=("B1", "B2"),
                   help=f"Adam's betas (default: {betas[0]:g} {betas[1]:g})")


def add_system_args(parser):
    g = parser.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, shuffling and augmentation "
                                                       "(default: 0)")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: on CUDA the convolutions round their inputs to TF32 (PyTorch's default, "
                        "torch.backends.cudnn.allow_tf32), the matmuls stay fp32; bf16: autocast the "
                        "discriminator's convolutions and linears to bf16 on CUDA GPUs of compute capability 8.0 "
                        "or newer (faster; fp32 weights; not yet checked against fp32 on a full schedule) "
                        "(default: fp32)")
    g.add_argument("--speed", choices=("auto", "fast", "plain"), default="auto", help=SPEED_HELP)
    g.add_argument("--check-flags", metavar="FILE",
                   help="train nothing: check configurations, one a line of FILE (- for standard input), each line's "
                        "flags added after this command line's as a job would pass them; prints ok or the error for "
                        "each line, exit status 2 if any fails (jobs/sweep.sh checks its configurations so)")


# Settings of the optimization a resume may change, as is common mid-run (a lower --lr after a NaN loss or a
# warning); each change is recorded in the metrics, the checkpoint's history and the events. The trainers add
# their own.
TUNABLE = {"lr"}
# Flags that may differ when a run is resumed: where things are, how to run it, and the TUNABLE settings. All
# others are the run's configuration, saved in its checkpoint, and a resume that changes one is refused.
MAY_CHANGE_ON_RESUME = {"data_dir", "out_dir", "resume", "limit_test", "lock_wait", "device", "precision",
                        "tensorboard", "speed", "check_flags"} | TUNABLE


def run_config(args, may_change=frozenset()):
    """The flags a resumed run must keep: all but MAY_CHANGE_ON_RESUME and the script's own may_change."""
    return {k: v for k, v in vars(args).items() if k not in MAY_CHANGE_ON_RESUME | set(may_change)}


def check_common_args(args):
    """Every common flag in its range; fills in --width from --arch."""
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.arch]
    check_range(args, "epochs", 1, 1_000_000)
    check_range(args, "batch_size", 1, 65_536)
    check_range(args, "width", 1, 2048)
    check_range(args, "lr", 0, 1, low_open=True)
    for beta in args.betas:
        if not 0 <= beta < 1:
            raise UserError(f"--betas takes two numbers in [0, 1), got {' '.join(f'{b:g}' for b in args.betas)}")
    check_range(args, "limit_train", 1)
    check_range(args, "limit_test", 1)
    check_range(args, "lock_wait", 0, 7 * 24 * 3600)
    check_range(args, "seed", 0, 2 ** 63 - 1)


def parse_trainer_args(parser, parse_args, argv):
    """The trainer's flags: the system group added last, --check-flags run (it exits), the common flags checked.
    parse_args: the trainer's own, which --check-flags calls on each configuration."""
    add_system_args(parser)
    args = parser.parse_args(argv)
    if args.check_flags is not None:
        check_configurations(parse_args, argv, args.check_flags)
    check_common_args(args)
    return args


def check_configurations(parse_args, argv, source):
    """--check-flags FILE: parse each line of FILE (split on spaces and tabs only, as a job's shell splits
    $EXTRA_ARGS: a carriage return stays in its word) after argv's other flags, as the trainer would before
    training; print ok or the one-line error per line, then exit (status 2 if any failed). Nothing is read or
    written but FILE."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv):
        if word == "--check-flags":
            del argv[i:i + 2]
            break
        if word.startswith("--check-flags="):
            del argv[i]
            break
    try:
        with (contextlib.nullcontext(sys.stdin) if source == "-" else open(source)) as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise UserError(f"--check-flags {source}: {e.strerror}")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line
    failed = 0
    for line in lines:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parse_args(argv + [word for word in line.replace("\t", " ").split(" ") if word])
            verdict = "ok"
        except SystemExit:  # argparse's usage and error lines: the error is the last one
            verdict = "error: " + errors.getvalue().strip().splitlines()[-1].split(" error: ", 1)[-1]
        except UserError as e:
            verdict = f"error: {e}"
        failed += verdict != "ok"
        print(verdict)
    raise SystemExit(2 if failed else 0)


# ---------------------------------------------------------------------------------------------------------
# Optimizer, data and evaluation

def adam(params, lr, betas, device, capturable=False):
    """Adam; on CUDA its fused kernel (one launch for all parameters, the same update). capturable: its state on
    the GPU, so that a CUDA graph can replay its step (runtime.GraphedStep), and its learning rate a tensor there,
    which set_lr changes in place: one graph serves the whole schedule."""
    if capturable:
        lr = torch.tensor(lr, dtype=torch.float32, device=device)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=fused_adam(device), capturable=capturable)


def fused_adam(device):
    return True if device.type == "cuda" else None


def load_optimizer(optimizer, state, device):
    """Restore a saved optimizer; the fused kernel follows the device this run is on, not the saved state
    (a checkpoint written on the CPU resumes fused on a GPU, and the other way round), and so does the learning
    rate this run built it with (--lr may change on resume). The flags are set in the saved groups before
    loading: load_state_dict moves Adam's `step` to the parameter's device only for a fused group, and the fused
    kernel wants all its tensors on one device. capturable, too, follows this run, and the moments take their
    parameter's memory layout."""
    now = {"fused": fused_adam(device), "capturable": optimizer.defaults.get("capturable", False),
           "lr": optimizer.param_groups[0]["lr"]}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **now} for group in state["param_groups"]]})
    # The moments in their parameter's memory layout: CUDA's fused Adam refuses a channels_last weight (--speed
    # fast) with moments saved from a run without it, as a checkpoint of the CPU or of --speed plain has them
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # read by a captured graph: changed in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def training_loaders(args, rt, test_batch=500):
    """(train loader, test loader): this process's share of each shuffled training batch, and every test
    image in batches of test_batch. Rank 0 loads first: it downloads CIFAR-10 or writes the image cache once."""
    splits = rt.rank0_first(lambda: (load_split(args.data_dir, "train", args.limit_train),
                                     load_split(args.data_dir, "test", args.limit_test)))
    train = Loader(*splits[0], args.batch_size, rt.device, train=True, seed=args.seed, rank=rt.rank,
                   world_size=rt.world_size)
    test = Loader(*splits[1], test_batch, rt.device, train=False)
    return train, test


@torch.no_grad()
def accuracy(model, loader):
    """Fraction of the loader's images whose fc10 argmax is the true label; the model is left in train mode."""
    model.eval()
    correct, count = torch.zeros((), device=loader.labels.device), 0
    for _, images, labels in loader.batches():
        correct += (model(to_float(images)).logits.argmax(1) == labels).sum()
        count += len(labels)
    model.train()
    return correct.item() / count


# ---------------------------------------------------------------------------------------------------------
# The per-epoch console table

WIDTH = re.compile(r"[<>^]?(\d+)")  # a format spec's width


class Table:
    """A console table declared once, as columns (heading, value, format spec), so that the header and the rows
    line up by construction. value: a record's key, or a function of the record; the spec's width is the
    column's (the heading right-aligned to it)."""

    def __init__(self, *columns):
        self.columns = columns

    def header(self):
        return " ".join(format(heading, ">" + WIDTH.match(spec).group(1)) for heading, _, spec in self.columns)

    def row(self, record):
        return " ".join(format(value(record) if callable(value) else record[value], spec)
                        for _, value, spec in self.columns)


# ---------------------------------------------------------------------------------------------------------
# A run: its files in --out-dir, and the decisions every process takes together

class Run:
    """The files of one training run in --out-dir (<job>.ckpt, <job>_metrics.jsonl, the lock) and what every
    trainer does with them. Only rank 0 writes, each time after checking that it still holds the lock; every
    decision that leads to a write or a stop (a non-finite loss, a stop signal) is agreed by all processes
    first."""

    def __init__(self, job, script, args, rt, stop, config, tunable=(), models=None, folders=()):
        """models: {model file in --out-dir: the checkpoint's entry of that model}, which finished() writes again
        when it is missing; folders: those the trainer makes in --out-dir. Both are checked before any work, with
        the run's own files."""
        self.job, self.script, self.args, self.rt, self.stop, self.config = job, script, args, rt, stop, config
        self.models, self.folders = models or {}, folders
        self.settings = {k: getattr(args, k) for k in sorted(TUNABLE | set(tunable))}  # this run's, may change
        self.out_dir = args.out_dir
        self.ckpt_path = os.path.join(args.out_dir, f"{job}.ckpt")
        self.metrics_path = os.path.join(args.out_dir, f"{job}_metrics.jsonl")
        self.lock, self._bar, self.table = None, None, None  # table: set by begin()
        self._epoch_time, self._batches_run, self._batch_size = 0.0, 0, 0
        self._timed_seconds, self._timed_batches = 0.0, 0  # of the epochs timed so far in this process, for pace()
        self.events_dir = os.path.join(args.out_dir, "tb", job)
        self._tensorboard, self.events, self._per_epoch = getattr(args, "tensorboard", True), None, None
        self._last_step = 0  # of the events written
        self._history = {kind: [] for kind in ("monitor", "epoch", "eval")}  # what the health rules read
        rt.rank0_first(lambda: self._claim_out_dir(args.lock_wait), others_too=False)
        try:
            self.checkpoint = load_checkpoint(self.ckpt_path, job, config, args.resume)
            # The settings' changes so far, and those this run makes (recorded when it trains: begin())
            self.change_history = list(self.checkpoint.get("history", [])) if self.checkpoint else []
            saved = self.checkpoint["config"] if self.checkpoint else {}
            self.changes = [(k, saved[k], v) for k, v in self.settings.items() if k in saved and saved[k] != v]
            self.change_lines = []
            if rt.is_rank0:
                self._trim_metrics()
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None and self.events is not None:  # every epoch done (a finished run starts no events)
                self.events.finish(self._last_step)
        finally:
            self.close()

    def _claim_out_dir(self, lock_wait):
        output_folder(self.out_dir, "--out-dir")
        # What is in the way of a file or folder the run writes would otherwise cost the epoch before the write
        output_parts(self.out_dir, [f"{self.job}.ckpt", f"{self.job}_metrics.jsonl", f"{self.job}.lock", *self.models],
                     [*self.folders, *([os.path.join("tb", self.job)] if self._tensorboard else [])])
        self.lock = OutDirLock(os.path.join(self.out_dir, f"{self.job}.lock"))
        if not self.lock.acquire(lock_wait, self.script, give_up=lambda: self.stop.received is not None):
            self.exit_stopped("while waiting for another run to release the folder")

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self.events is not None:
            self.events.close()
        if self.lock is not None:
            self.lock.release()

    def _trim_metrics(self):
        """Keep the metrics records the checkpoint has reached: a run that died after logging but before
        saving would otherwise log those epochs twice when it resumes. A fresh run starts a fresh file."""
        if not os.path.exists(self.metrics_path):
            return
        records, skipped = read_metrics(self.metrics_path)
        reached = (self.checkpoint["epoch"], self.checkpoint["batch"]) if self.checkpoint else (0, 0)
        # A change record at the checkpoint's position counts once the checkpoint has it in its history
        kept = [r for r in records if record_position(r) <= reached
                and (r.get("type") != "change" or r in self.change_history)]
        if len(kept) != len(records) or skipped:
            rewrite_metrics(self.metrics_path, kept)
        for kind, history in self._history.items():
            history.extend([r for r in kept if r.get("type", "epoch") == kind][-health.keep(kind):])

    def finished(self, epochs):
        """Whether the checkpoint has all the epochs asked for; says so. Model files it lacks (a full disk after
        the last checkpoint, a file moved away) are written again from the checkpoint, which holds the same nets."""
        if self.checkpoint is None or self.checkpoint["epoch"] < epochs:
            return False
        self.print(f"{self.ckpt_path}: {self.checkpoint['epoch']} epochs are done (asked for {epochs}); "
                   "nothing to resume")
        missing = [(path, key) for name, key in self.models.items()
                   if not os.path.exists(path := os.path.join(self.out_dir, name))]
        if missing and self.rt.is_rank0:
            self.check_lock()
            write_together([(path, torch_bytes(self.checkpoint[key])) for path, key in missing], ready=self.check_lock)
            self.print(f"wrote the missing {' and '.join(path for path, _ in missing)} from {self.ckpt_path}")
        return True

    def print(self, text):
        if self.rt.is_rank0:
            (self._bar.write if self._bar is not None else print)(text)

    def log(self, record):
        """A metrics record (monitor, epoch or eval) into the metrics file and the events (rank 0), then the
        health rules that read its kind; each that fires is a warning."""
        if not self.rt.is_rank0:
            return
        self.check_lock()
        append_metrics(self.metrics_path, record)
        kind = record.get("type", "epoch")
        if self._writer() is not None:
            self.events.scalars(self.events.tags(kind, record), self.step(record))
        history = self._history.get(kind)
        if history is not None:
            history.append(record)
            del history[:-health.keep(kind)]
            for rule, message in health.warnings(self._history, kind):
                self.warn(rule, message, record)

    def warn(self, rule, message, at):
        """A warning line in the log, a "warning" record in the metrics and a text in the events, at the
        position of the record `at` that raised it."""
        self.print(message)
        position = {k: at[k] for k in ("epoch", "batch") if k in at}
        append_metrics(self.metrics_path, {"type": "warning", **position, "rule": rule, "message": message})
        if self._writer() is not None:
            self.events.text(f"warnings/{rule}", message, self.step(at))

    def log_window(self, meter, epoch, batch):
        """Every LOG_EVERY batches since the run began (across epochs): the window's running means in the progress
        bar, the metrics and the events."""
        if (epoch * self._per_epoch + batch + 1) % LOG_EVERY == 0:
            window = meter.take_window()
            self.show(window)
            self.log({"type": "monitor", "epoch": epoch + 1, "batch": batch + 1, **window})

    def image(self, tag, png, epochs_done):
        """A PNG in the events at the end of epoch epochs_done (rank 0)."""
        if self._writer() is not None:
            self.events.image(tag, png, self.step({"epoch": epochs_done}))

    def step(self, record):
        """The events' step of a record: training batches since the run began."""
        done, batch = record_position(record)
        self._last_step = max(self._last_step, done * self._per_epoch + batch)
        return done * self._per_epoch + batch

    def _writer(self):
        """The event writer of rank 0 (None with --no-tensorboard), made at the first event, so that a run that
        ends before logging anything (a NaN loss) changes no file; it first drops the events past the
        checkpoint's step from the files already there. How this process runs, and the settings it changes, go in
        first, at its first step: a process that dies before its first checkpoint loses them with its other
        events."""
        if self.events is None and self._tensorboard and self.rt.is_rank0:
            from training.events import GAN_LAYOUT, Events  # TensorBoard's modules, only where they are used

            ckpt = self.checkpoint
            reached = ckpt["epoch"] * self._per_epoch + ckpt["batch"] if ckpt else -1
            self.events = Events(self.events_dir, reached, {**self.config, **self.settings},
                                 GAN_LAYOUT if self.job == "gan" else None)
            self.events.text("run/configuration", self.configuration(), reached + 1)
            if self.changes:
                self.events.text("run/changes", "\n\n".join(self.change_lines), reached + 1)
        return self.events

    def configuration(self):
        """How this process runs, as Markdown: its command line, data, device, precision and schedule."""
        args, rt, ckpt = self.args, self.rt, self.checkpoint
        device = str(rt.device)
        if rt.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(rt.device)})"
        images = f", {args.limit_train} training images" if args.limit_train else ""
        start = f"resumed at epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}" if ckpt else "a fresh run"
        return "\n".join([
            "    " + shlex.join(["python", *sys.argv]), "",
            f"- data: {os.path.abspath(args.data_dir)}{images}",
            f"- device: {device}, {rt.world_size} process(es), precision {args.precision}",
            f"- epochs: {args.epochs}, {self._per_epoch} batches of {args.batch_size} per epoch",
            f"- out-dir: {os.path.abspath(args.out_dir)}",
            f"- start: {start}, {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}, "
            f"torch {torch.__version__}"])

    def save(self, state, also=None):
        """The checkpoint, with the job and its configuration, and the files (path, bytes) that also() lists,
        written together by rank 0: a write that fails (a full disk) changes none of them."""
        if self.rt.is_rank0:
            self.check_lock()
            checkpoint = torch_bytes({"job": self.job, "config": {**self.config, **self.settings},
                                      "history": self.change_history, **state})
            if self.events is not None:
                self.events.flush()  # the events up to the checkpoint, on disk before it
            write_together([*(also() if also else []), (self.ckpt_path, checkpoint)], ready=self.check_lock)

    def check_lock(self):
        """Before rank 0 writes: a UserError if another run has taken the folder over (OutDirLock.check)."""
        if self.lock is not None:
            self.lock.check()

    def batches(self, loader, epoch, start, epochs):
        """The loader's batches of this epoch from `start` on, under a progress bar on a terminal (rank 0); also
        times the epoch for epoch_speed() and pace()."""
        self._batch_size, self._batches_run, self._per_epoch = loader.batch_size, 0, len(loader)
        bar = progress_bar(total=len(loader) - start, desc=f"epoch {epoch + 1}/{epochs}", enabled=self.rt.is_rank0)
        self._bar = bar
        start_time = time.perf_counter()
        for item in loader.batches(epoch, start):
            yield item
            self._batches_run += 1
            bar.update()
        self._epoch_time = time.perf_counter() - start_time
        self._timed_seconds += self._epoch_time
        self._timed_batches += self._batches_run
        bar.close()
        self._bar = None

    def show(self, means):
        """Running means in the progress bar."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)

    def epoch_speed(self):
        """(seconds, images/s of the whole world) of the epoch's batches just run."""
        seconds = max(self._epoch_time, 1e-9)
        return seconds, self._batches_run * self._batch_size / seconds

    def pace(self, epoch, epochs, batches_per_epoch):
        """pace() of the epochs this process has run so far (a resumed run's first, partial epoch counts for its
        batches), after `epoch` (0-based) of `epochs`."""
        return pace(self._timed_seconds, self._timed_batches, batches_per_epoch, epochs - epoch - 1)

    @staticmethod
    def duration(seconds):
        """Seconds as a short text for the per-epoch table: 45s, 12m05s, 3h07m."""
        seconds = round(seconds)
        if seconds < 60:
            return f"{seconds}s"
        if seconds < 3600:
            return f"{seconds // 60}m{seconds % 60:02d}s"
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

    def should_stop(self, meter, epoch, batch, batches):
        """Whether to stop after this batch: a stop signal reached any process. At the same points, and every
        LOG_EVERY batches and at the epoch's last batch, the losses must be finite; a non-finite one ends the
        run without writing anything. One process checks the signal every batch; under torchrun the processes
        agree every AGREE_EVERY batches and at the epoch's last, so that all stop after the same batch. A stop at
        the epoch's last batch waits for the end of the epoch (see stop_requested)."""
        last = batch + 1 == batches
        if self.rt.world_size == 1:
            stop = self.stop.received is not None
            if stop or last or (batch + 1) % LOG_EVERY == 0:
                self.require_finite(bool(meter.finite()), epoch, batch)
            return stop and not last
        if not (last or (batch + 1) % AGREE_EVERY == 0):
            return False
        not_finite, stop = self.rt.agree(~meter.finite(), self.stop.received is not None)
        self.require_finite(not not_finite, epoch, batch)
        return stop and not last  # at the last batch the epoch ends first; stop_requested() then stops

    def require_finite(self, finite, epoch, batch):
        if not finite:
            lower = f"--lr {self.settings['lr'] / 2:g}"
            if os.path.exists(self.ckpt_path):
                advice = (f"the last good checkpoint {self.ckpt_path} is kept; to go on from it at half the learning "
                          f"rate, run the same command with --resume {lower}")
            else:
                advice = f"nothing was saved; run the same command with {lower} (half the learning rate)"
            raise UserError(f"a loss became NaN or infinite in epoch {epoch + 1} by batch {batch + 1}; {advice}")

    def epochs(self, loader, table):
        """The epochs left of --epochs, each as (epoch, its batches: see batches), from the checkpoint's epoch and
        batch on. Before the first: the resume's position printed, then begin(table)."""
        start_epoch, start_batch = (self.checkpoint["epoch"], self.checkpoint["batch"]) if self.checkpoint else (0, 0)
        if self.checkpoint is not None:
            self.print(f"resuming {self.ckpt_path} at epoch {start_epoch + 1}, batch {start_batch}")
        self.begin(table)
        for epoch in range(start_epoch, self.args.epochs):
            yield epoch, self.batches(loader, epoch, start_batch if epoch == start_epoch else 0, self.args.epochs)

    def begin(self, table):
        """Before the first batch: stop if a signal came during start-up (the checkpoint untouched), else record
        the settings this resume changes and print the header of the per-epoch Table."""
        if self.stop_requested():
            self.exit_stopped("before training")
        for setting, old, new in self.changes:
            self.record_change(setting, old, new)
        self.table = table
        self.print(table.header())

    def end_epoch(self, record, state, epochs, also=None):
        """After an epoch whose record is logged: the checkpoint (state) and also()'s files saved together, the
        record's row of the table printed, then a stop asked for during the epoch ends the run (exit 75), unless
        that was the last of `epochs`."""
        self.save(state, also)
        self.print(self.table.row(record))
        if record["epoch"] < epochs and self.stop_requested():
            self.exit_stopped(f"after epoch {record['epoch']}")

    def record_change(self, setting, old, new):
        """A setting changed on resume: a note in the log, a "change" record in the metrics and in the history
        the next checkpoint keeps, and a text in the events, at the checkpoint's position."""
        epoch, batch = self.checkpoint["epoch"], self.checkpoint["batch"]
        flag = "--" + setting.replace("_", "-")
        record = {"type": "change", "epoch": epoch + 1, "batch": batch, "setting": setting, "from": old, "to": new}
        self.change_history.append(record)
        self.change_lines.append(f"{flag} changes from {old:g} to {new:g} at epoch {epoch + 1}, batch {batch}")
        self.print(f"note: {self.change_lines[-1]}; recorded in {self.metrics_path} and the checkpoint's history")
        if self.rt.is_rank0:
            self.check_lock()
            append_metrics(self.metrics_path, record)

    def stop_requested(self):
        """A stop signal reached any process (agreed; between epochs and before the first)."""
        return self.rt.agree(self.stop.received is not None)[0]

    def exit_stopped(self, where):
        self.print(f"stopped by {self.stop.received or 'a signal on another process'} {where}; {self.ckpt_path} "
                   "holds the run; run the same command with --resume to continue")
        raise SystemExit(EXIT_STOPPED)

    def save_and_stop(self, state):
        self.save(state)
        self.exit_stopped(f"in epoch {state['epoch'] + 1} after batch {state['batch']}")


def pace(seconds, batches, batches_per_epoch, epochs_left):
    """The epoch record's {"seconds_per_epoch", "eta_s"}: the measured training time per batch (seconds over
    batches) times the batches of an epoch, and that times the epochs left: the seconds the rest will take.
    jobs/lib.sh multiplies seconds_per_epoch by the epochs its job asks for."""
    per_epoch = seconds / max(batches, 1) * batches_per_epoch
    return {"seconds_per_epoch": round(per_epoch, 2), "eta_s": round(per_epoch * epochs_left, 1)}


def record_position(record):
    """(epochs done, batches into the next epoch) of the training position a metrics record was written at:
    an epoch record after epoch E is (E, 0); a monitor record at batch B of epoch E is (E - 1, B), and so is a
    warning it raised and a setting changed there."""
    if "batch" in record:
        return record.get("epoch", 0) - 1, record.get("batch", 0)
    return record.get("epoch", 0), 0
