"""A run's TensorBoard event files, <out-dir>/tb/<job>/, written through torch.utils.tensorboard's SummaryWriter.

Every event's step is the number of training batches since the run began, so a resumed run continues the same
curves. A run killed after writing events but before its checkpoint would show those steps twice when it
resumes: trim() first removes the events past the checkpoint from the files already there (any reader,
started later, then sees each step once), and the new writer starts with a SessionLog.START at the next step
(purge_step), which a TensorBoard that already read the orphans obeys by dropping them.
"""
import contextlib
import glob
import io
import os
import threading
import time

from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from files import atomic_write, write_error

FLUSH_SECS = 30  # a watching TensorBoard lags the run by at most this; every checkpoint flushes too
HPARAMS_TAG = "_hparams_/session_start_info"  # the hparams plugin's tag of a run's configuration
HINT = "choose another --out-dir, or pass --no-tensorboard"


def quiet_writer_thread(args, default=threading.excepthook):
    """The writer thread's failure (a full disk) is raised again in the main thread, as one line; it is not
    printed as a traceback here."""
    if not isinstance(args.thread, _AsyncWriterThread):
        default(args)


threading.excepthook = quiet_writer_thread


def event_files(folder):
    """The folder's event files in the order readers take them (by name: their creation time first)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*tfevents*")))


def trim(folder, last_step):
    """Drop the events past last_step (-1: all of them) from the event files in folder, rewriting each
    changed file atomically and removing those left without data. Returns whether the run's configuration
    (hparams) is still there."""
    has_hparams = False
    for path in event_files(folder):
        with open(path, "rb") as f:
            before = f.read()
        kept, data = io.BytesIO(), False
        writer = RecordWriter(kept)
        for raw in RawEventFileLoader(path).Load():
            event = Event.FromString(raw)
            if event.HasField("file_version") or event.step <= last_step:
                writer.write(raw)
                data = data or not event.HasField("file_version")
                has_hparams = has_hparams or any(v.tag == HPARAMS_TAG for v in event.summary.value)
        if not data:
            os.remove(path)
        elif kept.getvalue() != before:  # events dropped, or a record cut short by a kill
            atomic_write(path, kept.getvalue(), HINT)
    return has_hparams


def after_existing(folder, patience=2.0):
    """Wait (under a second, as a rule) until a new event file's name, which starts with the time in whole
    seconds, sorts after every file in folder, so that readers take the resumed run's events last."""
    stamps = [int(p) for path in event_files(folder) if (p := os.path.basename(path).split(".")[3]).isdigit()]
    deadline = time.monotonic() + patience  # a file stamped far ahead (another node's clock) is not waited for
    while stamps and int(time.time()) <= max(stamps) and time.monotonic() < deadline:
        time.sleep(0.05)


def plain(value):
    """A configuration value as the hparams plugin takes it: a number, a string or a bool."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class Events:
    """The event writer of one process of a run (rank 0). resumed_at: the step the checkpoint has reached, or
    -1 for a fresh run (whose folder then holds no events of an earlier, unsaved attempt)."""

    def __init__(self, folder, resumed_at, config, metrics):
        self.folder = folder
        with self.writing():
            os.makedirs(folder, exist_ok=True)
            has_hparams = trim(folder, resumed_at)
            after_existing(folder)
            # A SessionLog.START at the first step, a fresh run's too: TensorBoard's server takes a run's first
            # START for its beginning and purges at the later ones only.
            self.writer = SummaryWriter(folder, purge_step=resumed_at + 1, flush_secs=FLUSH_SECS)
            if not has_hparams:
                self.hparams(config, metrics)

    @contextlib.contextmanager
    def writing(self):
        """A failed write (no space, quota, permission) as one line."""
        try:
            yield
        except OSError as e:
            raise write_error(self.folder, e, HINT) from None

    def hparams(self, config, metrics):
        """The run's configuration for TensorBoard's HPARAMS tab, beside the scalar tags it is judged by."""
        for summary in hparams({k: plain(v) for k, v in config.items()}, {tag: 0 for tag in metrics}):
            self.writer.file_writer.add_summary(summary, 0)

    def scalars(self, values, step):
        with self.writing():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag, png, step):
        """A PNG as it is (the same bytes as the file beside it)."""
        with Image.open(io.BytesIO(png)) as image:
            width, height = image.size
            channels = len(image.getbands())
        picture = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
        with self.writing():
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), step)

    def text(self, tag, text, step):
        with self.writing():
            self.writer.add_text(tag, text, step)

    def flush(self):
        with self.writing():
            self.writer.flush()

    def close(self):
        try:
            self.writer.close()
        except OSError:
            pass  # at the end of a run: its last checkpoint flushed every event it holds
