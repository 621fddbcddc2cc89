"""A training run in --out-dir, the plumbing both trainers share: the folder and its lock (training.outdir_lock),
the checkpoint resumed or refused (training.checkpoint), the records (training.records: the metrics file,
TensorBoard, the health rules), the epochs' progress and pace (training.progress), stopping on a signal and the
non-finite loss rule, every decision agreed by all processes first. Only rank 0 writes, each time after checking
that it still holds the lock.

A trainer's loop, in this module's terms:

    with Run("gan", "train_gan.py", args, rt, stop, RESUME) as run:  # --out-dir locked; run.checkpoint
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
import os
import shlex
import socket
import sys
import time

import torch

from torch_utils.cli import UserError
from torch_utils.files import output_folder, output_parts, torch_bytes, write_together
from torch_utils.runtime import EXIT_STOPPED
from training.checkpoint import load_checkpoint
from training.outdir_lock import OutDirLock
from training.progress import Progress
from training.records import Records

LOG_EVERY = 50  # batches between running means in the progress bar and the metrics file (each a host sync)
AGREE_EVERY = 10  # batches between the processes' agreement on stopping, under torchrun (each a host sync)


class Run:
    """The files of one training run in --out-dir (<job>.ckpt, <job>_metrics.jsonl, the lock, tb/<job>/) and what
    every trainer does with them. rules: the trainer's ResumeRules; layout: its TensorBoard Custom Scalars layout;
    models: {model file in --out-dir: the checkpoint's entry of that model}, which finished() writes again when it
    is missing; folders: those the trainer makes in --out-dir. Both are checked before any work, with the run's own
    files."""

    def __init__(self, job, script, args, rt, stop, rules, layout=None, models=None, folders=()):
        self.job, self.script, self.args, self.rt, self.stop = job, script, args, rt, stop
        self.models, self.folders = models or {}, folders
        self.config, self.settings = rules.config(args), rules.settings(args)  # settings: this run's, may change
        self.out_dir = args.out_dir
        self.ckpt_path = os.path.join(args.out_dir, f"{job}.ckpt")
        self.lock, self.table = None, None  # table: set by begin()
        self.progress = Progress(rt.is_rank0)
        self.records = Records(args.out_dir, job, rt.is_rank0, getattr(args, "tensorboard", True), layout,
                               self.check_lock, self.print)
        self.metrics_path = self.records.metrics_path
        rt.rank0_first(lambda: self._claim_out_dir(args.lock_wait), others_too=False)
        try:
            self.checkpoint = load_checkpoint(self.ckpt_path, job, self.config, args.resume)
            # The settings' changes so far, and those this run makes (recorded when it trains: begin())
            self.change_history = list(self.checkpoint.get("history", [])) if self.checkpoint else []
            saved = self.checkpoint["config"] if self.checkpoint else {}
            self.changes = [(k, saved[k], v) for k, v in self.settings.items() if k in saved and saved[k] != v]
            self.change_lines = []
            if rt.is_rank0:
                self.records.trim(self.position(), self.change_history)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.records.finish()
        finally:
            self.close()

    def _claim_out_dir(self, lock_wait):
        output_folder(self.out_dir, "--out-dir")
        # What is in the way of a file or folder the run writes would otherwise cost the epoch before the write
        output_parts(self.out_dir, [f"{self.job}.ckpt", f"{self.job}_metrics.jsonl", f"{self.job}.lock", *self.models],
                     [*self.folders, *([os.path.join("tb", self.job)] if self.records.tensorboard else [])])
        self.lock = OutDirLock(os.path.join(self.out_dir, f"{self.job}.lock"))
        if not self.lock.acquire(lock_wait, self.script, give_up=lambda: self.stop.received is not None):
            self.exit_stopped("while waiting for another run to release the folder")

    def close(self):
        self.progress.close()
        self.records.close()
        if self.lock is not None:
            self.lock.release()

    def position(self):
        """(epoch, batch) the checkpoint has reached; (0, 0) for a fresh run."""
        return (self.checkpoint["epoch"], self.checkpoint["batch"]) if self.checkpoint else (0, 0)

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
        self.progress.print(text)

    def log(self, record):
        self.records.log(record)

    def log_window(self, meter, epoch, batch):
        """Every LOG_EVERY batches since the run began (across epochs): the window's running means in the progress
        bar, the metrics and the events."""
        if (epoch * self.records.per_epoch + batch + 1) % LOG_EVERY == 0:
            window = meter.take_window()
            self.progress.show(window)
            self.log({"type": "monitor", "epoch": epoch + 1, "batch": batch + 1, **window})

    def image(self, tag, png, epochs_done):
        self.records.image(tag, png, epochs_done)

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
            f"- epochs: {args.epochs}, {self.records.per_epoch} batches of {args.batch_size} per epoch",
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
            self.records.flush()  # the events up to the checkpoint, on disk before it
            write_together([*(also() if also else []), (self.ckpt_path, checkpoint)], ready=self.check_lock)

    def check_lock(self):
        """Before rank 0 writes: a UserError if another run has taken the folder over (OutDirLock.check)."""
        if self.lock is not None:
            self.lock.check()

    def batches(self, loader, epoch, start, epochs):
        """The loader's batches of this epoch from `start` on, under a progress bar on a terminal (rank 0), timed
        for epoch_speed() and pace()."""
        self.records.per_epoch = len(loader)
        return self.progress.batches(loader, epoch, start, epochs)

    def epoch_speed(self):
        """(seconds, images/s of the whole world) of the epoch's batches just run."""
        return self.progress.epoch_speed()

    def pace(self, epoch, epochs, batches_per_epoch):
        return self.progress.pace(epoch, epochs, batches_per_epoch)

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
        start_epoch, start_batch = self.position()
        if self.checkpoint is not None:
            self.print(f"resuming {self.ckpt_path} at epoch {start_epoch + 1}, batch {start_batch}")
        self.records.per_epoch = len(loader)
        self.begin(table)
        for epoch in range(start_epoch, self.args.epochs):
            yield epoch, self.batches(loader, epoch, start_batch if epoch == start_epoch else 0, self.args.epochs)

    def begin(self, table):
        """Before the first batch: stop if a signal came during start-up (the checkpoint untouched), else record
        the settings this resume changes, tell the records how this process runs and print the header of the
        per-epoch Table."""
        if self.stop_requested():
            self.exit_stopped("before training")
        for setting, old, new in self.changes:
            self.record_change(setting, old, new)
        epoch, batch = self.position()
        self.records.resumed_at = epoch * self.records.per_epoch + batch if self.checkpoint else -1
        self.records.hparams = {**self.config, **self.settings}
        self.records.texts = {"run/configuration": self.configuration()}
        if self.change_lines:
            self.records.texts["run/changes"] = "\n\n".join(self.change_lines)
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
        epoch, batch = self.position()
        flag = "--" + setting.replace("_", "-")
        record = {"type": "change", "epoch": epoch + 1, "batch": batch, "setting": setting, "from": old, "to": new}
        self.change_history.append(record)
        self.change_lines.append(f"{flag} changes from {old:g} to {new:g} at epoch {epoch + 1}, batch {batch}")
        self.print(f"note: {self.change_lines[-1]}; recorded in {self.metrics_path} and the checkpoint's history")
        self.records.append(record)

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
