"""A run's records, written by rank 0 to three readers at once: the metrics file (<job>_metrics.jsonl, one JSON
record a line: monitor windows, epochs, evals, warnings, setting changes), TensorBoard's event files (tb/<job>/,
made at the first event) and the health rules, whose warnings become records too. Nothing here knows which
trainer writes: the job's name only names the files."""
import os

from torch_utils.files import append_metrics, read_metrics, rewrite_metrics
from training import health


class Records:
    """ready: called before each write (the folder lock's check); tensorboard: whether to write events; layout: a
    Custom Scalars layout for them; say: how a warning is shown. Run sets resumed_at, per_epoch and, before the
    first event, hparams and texts (written once, at the first step)."""

    def __init__(self, out_dir, job, is_rank0, tensorboard, layout, ready, say):
        self.metrics_path = os.path.join(out_dir, f"{job}_metrics.jsonl")
        self.events_dir = os.path.join(out_dir, "tb", job)
        self.is_rank0, self.tensorboard, self.layout, self.ready, self.say = is_rank0, tensorboard, layout, ready, say
        self.events, self.last_step = None, 0
        self.resumed_at, self.per_epoch, self.hparams, self.texts = -1, None, {}, {}
        self.history = {kind: [] for kind in ("monitor", "epoch", "eval")}  # what the health rules read

    def trim(self, reached, change_history):
        """Keep the records the checkpoint has reached ((epochs done, batches into the next), (0, 0) for a fresh
        run): a run that died after logging but before saving would otherwise log those epochs twice when it
        resumes. The health rules' history starts from those kept."""
        if not os.path.exists(self.metrics_path):
            return
        records, skipped = read_metrics(self.metrics_path)
        # A change record at the checkpoint's position counts once the checkpoint has it in its history
        kept = [r for r in records if record_position(r) <= reached
                and (r.get("type") != "change" or r in change_history)]
        if len(kept) != len(records) or skipped:
            rewrite_metrics(self.metrics_path, kept)
        for kind, history in self.history.items():
            history.extend([r for r in kept if r.get("type", "epoch") == kind][-health.keep(kind):])

    def log(self, record):
        """A metrics record (monitor, epoch or eval) into the metrics file and the events, then the health rules
        that read its kind; each that fires is a warning."""
        if not self.is_rank0:
            return
        self.append(record)
        kind = record.get("type", "epoch")
        if self.writer() is not None:
            self.events.scalars(self.events.tags(kind, record), self.step(record))
        history = self.history.get(kind)
        if history is not None:
            history.append(record)
            del history[:-health.keep(kind)]
            for rule, message in health.warnings(self.history, kind):
                self.warn(rule, message, record)

    def append(self, record):
        """A record into the metrics file alone (a setting's change, which the events get as a text)."""
        if self.is_rank0:
            self.ready()
            append_metrics(self.metrics_path, record)

    def warn(self, rule, message, at):
        """A warning line in the log, a "warning" record in the metrics and a text in the events, at the
        position of the record `at` that raised it."""
        self.say(message)
        position = {k: at[k] for k in ("epoch", "batch") if k in at}
        self.append({"type": "warning", **position, "rule": rule, "message": message})
        if self.writer() is not None:
            self.events.text(f"warnings/{rule}", message, self.step(at))

    def image(self, tag, png, epochs_done):
        """A PNG in the events at the end of epoch epochs_done."""
        if self.writer() is not None:
            self.events.image(tag, png, self.step({"epoch": epochs_done}))

    def step(self, record):
        """The events' step of a record: training batches since the run began."""
        done, batch = record_position(record)
        self.last_step = max(self.last_step, done * self.per_epoch + batch)
        return done * self.per_epoch + batch

    def writer(self):
        """The event writer of rank 0 (None without TensorBoard), made at the first event, so that a run that ends
        before logging anything (a NaN loss) changes no file; it first drops the events past the checkpoint's step
        from the files already there. The texts go in first, at its first step: a process that dies before its
        first checkpoint loses them with its other events."""
        if self.events is None and self.tensorboard and self.is_rank0:
            from training.events import Events  # TensorBoard's modules, only where they are used

            self.events = Events(self.events_dir, self.resumed_at, self.hparams, self.layout)
            for tag, text in self.texts.items():
                self.events.text(tag, text, self.resumed_at + 1)
        return self.events

    def flush(self):
        """The events so far on disk (before a checkpoint, which must not get ahead of them)."""
        if self.events is not None:
            self.events.flush()

    def finish(self):
        """The run's status "success" in TensorBoard (every epoch done; a finished run starts no events)."""
        if self.events is not None:
            self.events.finish(self.last_step)

    def close(self):
        if self.events is not None:
            self.events.close()


def record_position(record):
    """(epochs done, batches into the next epoch) of the training position a metrics record was written at:
    an epoch record after epoch E is (E, 0); a monitor record at batch B of epoch E is (E - 1, B), and so is a
    warning it raised and a setting changed there."""
    if "batch" in record:
        return record.get("epoch", 0) - 1, record.get("batch", 0)
    return record.get("epoch", 0), 0
