"""A run's TensorBoard event files, <out-dir>/tb/<job>/, written through torch.utils.tensorboard's SummaryWriter.

Every event's step is the number of training batches since the run began, so a resumed run continues the same
curves. A run killed after writing events but before its checkpoint would show those steps twice when it
resumes: trim() first removes the events past the checkpoint from the files already there (any reader,
started later, then sees each step once), and the new writer starts with a SessionLog.START at the next step
(purge_step), which a TensorBoard that already read the orphans obeys by dropping them.

The view, as a GAN user reads it: scalars grouped by what one looks for (training.scalars: health, losses,
accuracy, speed, settings, eval, and the per-class lists in per_class), the GAN's Custom Scalars layout (those
groups in that order, a class per line in one chart), the hparams table (each run's configuration; its status "success"
only once the run has finished) and each start's configuration as text.
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
from tensorboard.plugins.custom_scalar.metadata import CONFIG_SUMMARY_TAG
from tensorboard.plugins.hparams import api_pb2, metadata as hparams_metadata, plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from torch_utils.files import atomic_write, write_error
from training import scalars

FLUSH_SECS = 30  # a watching TensorBoard lags the run by at most this; every checkpoint flushes too
HPARAMS_TAG = hparams_metadata.SESSION_START_INFO_TAG  # the hparams plugin's tag of a run's configuration
END_TAG = hparams_metadata.SESSION_END_INFO_TAG  # ... and of its end status
HINT = "choose another --out-dir, or pass --no-tensorboard"

def event_files(folder):
    """The folder's event files in the order readers take them (by name: their creation time first)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*tfevents*")))


def trim(folder, last_step):
    """Drop the events past last_step (-1: all of them) from the event files in folder, and the run's end status
    (a finished run trained further is running again), rewriting each changed file atomically and removing
    those left without data. Returns the tags of the summaries written once per run that are still there (the
    configuration for hparams, the Custom Scalars layout)."""
    once = set()
    for path in event_files(folder):
        with open(path, "rb") as f:
            before = f.read()
        kept, data = io.BytesIO(), False
        writer = RecordWriter(kept)
        for raw in RawEventFileLoader(path).Load():
            event = Event.FromString(raw)
            found = {v.tag for v in event.summary.value}
            if event.HasField("file_version") or (event.step <= last_step and END_TAG not in found):
                writer.write(raw)
                data = data or not event.HasField("file_version")
                once |= found & {HPARAMS_TAG, CONFIG_SUMMARY_TAG}
        if not data:
            os.remove(path)
        elif kept.getvalue() != before:  # events dropped, or a record cut short by a kill
            atomic_write(path, kept.getvalue(), HINT)
    return once


def after_existing(folder, patience=2.0):
    """Wait (under a second, as a rule) until a new event file's name, which starts with the time in whole
    seconds, sorts after every file in folder, so that readers take the resumed run's events last."""
    stamps = [int(p) for path in event_files(folder) if (p := os.path.basename(path).split(".")[3]).isdigit()]
    deadline = time.monotonic() + patience  # a file stamped far ahead (another node's clock) is not waited for
    while stamps and int(time.time()) <= max(stamps) and time.monotonic() < deadline:
        time.sleep(0.05)


class Events:
    """The event writer of one process of a run (rank 0). resumed_at: the step the checkpoint has reached, or
    -1 for a fresh run (whose folder then holds no events of an earlier, unsaved attempt). config: the run's
    settings for the hparams table; layout: a Custom Scalars layout (scalars.GAN_LAYOUT). Both are written once
    per run."""

    def __init__(self, folder, resumed_at, config, layout=None):
        self.folder = folder
        with self.writing():
            os.makedirs(folder, exist_ok=True)
            once = trim(folder, resumed_at)
            after_existing(folder)
            # A SessionLog.START at the first step, a fresh run's too: TensorBoard's server takes a run's first
            # START for its beginning and purges at the later ones only.
            self.writer = SummaryWriter(folder, purge_step=resumed_at + 1, flush_secs=FLUSH_SECS)
            self.quiet_writer_thread()
            if HPARAMS_TAG not in once:
                self.hparams(config)
            if layout and CONFIG_SUMMARY_TAG not in once:
                self.writer.add_custom_scalars(layout)

    @contextlib.contextmanager
    def writing(self):
        """A failed write (no space, quota, permission) as one line."""
        try:
            yield
        except OSError as e:
            raise write_error(self.folder, e, HINT) from None

    def hparams(self, config):
        """The run's configuration for TensorBoard's HPARAMS tab: numbers, strings and booleans as such, a list as
        its text, an unset value (None) left blank. No experiment summary: TensorBoard then makes its columns of
        every run's settings (those of the baseline and of the GAN), not of one run's picked first."""
        info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in config.items():
            if isinstance(value, bool):
                info.hparams[key].bool_value = value
            elif isinstance(value, (int, float)):
                info.hparams[key].number_value = value
            elif value is not None:
                info.hparams[key].string_value = value if isinstance(value, str) else str(value)
        self._hparams_data(HPARAMS_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info), 0)

    def finish(self, step):
        """The run's status "success" in the hparams table, once every epoch is done; a run still training,
        stopped or killed has none."""
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        with self.writing():
            self._hparams_data(END_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end), step)

    def _hparams_data(self, tag, data, step):
        value = Summary.Value(tag=tag, metadata=hparams_metadata.create_summary_metadata(data))
        self.writer.file_writer.add_summary(Summary(value=[value]), step)

    tags = staticmethod(scalars.tags)

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

    def quiet_writer_thread(self):
        """While this writer is open, its thread's failure (a full disk) is not printed as a traceback: the main
        thread raises it again, as one line. Other threads' failures are printed as before."""
        default = threading.excepthook

        def hook(args):
            if not isinstance(args.thread, _AsyncWriterThread):
                default(args)
        threading.excepthook, self.restore_excepthook = hook, default

    def close(self):
        try:
            self.writer.close()
        except OSError:
            pass  # at the end of a run: its last checkpoint flushed every event it holds
        finally:
            threading.excepthook = self.restore_excepthook
