"""What a run shows of its pace on the console: the per-epoch table, and each epoch's batches under a progress bar
(on a terminal, rank 0), timed for the table's images/s and the schedule's eta."""
import re
import time

from torch_utils.runtime import progress_bar

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


def duration(seconds):
    """Seconds as a short text for the per-epoch table: 45s, 12m05s, 3h07m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pace(seconds, batches, batches_per_epoch, epochs_left):
    """The epoch record's {"seconds_per_epoch", "eta_s"}: the measured training time per batch (seconds over
    batches) times the batches of an epoch, and that times the epochs left: the seconds the rest will take.
    jobs/lib.sh multiplies seconds_per_epoch by the epochs its job asks for."""
    per_epoch = seconds / max(batches, 1) * batches_per_epoch
    return {"seconds_per_epoch": round(per_epoch, 2), "eta_s": round(per_epoch * epochs_left, 1)}


class Progress:
    """The batches of each epoch under a progress bar (enabled: rank 0; shown on a terminal only), timed."""

    def __init__(self, enabled):
        self.enabled, self.bar = enabled, None
        self.epoch_time, self.batches_run, self.batch_size = 0.0, 0, 0
        self.timed_seconds, self.timed_batches = 0.0, 0  # of the epochs timed so far in this process, for pace()

    def batches(self, loader, epoch, start, epochs):
        """The loader's batches of this epoch from `start` on; times the epoch for epoch_speed() and pace()."""
        self.batch_size, self.batches_run = loader.batch_size, 0
        self.bar = progress_bar(total=len(loader) - start, desc=f"epoch {epoch + 1}/{epochs}", enabled=self.enabled)
        start_time = time.perf_counter()
        for item in loader.batches(epoch, start):
            yield item
            self.batches_run += 1
            self.bar.update()
        self.epoch_time = time.perf_counter() - start_time
        self.timed_seconds += self.epoch_time
        self.timed_batches += self.batches_run
        self.close()

    def print(self, text):
        """A line above the bar while there is one."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def show(self, means):
        """Running means in the bar."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)

    def epoch_speed(self):
        """(seconds, images/s of the whole world) of the epoch's batches just run."""
        seconds = max(self.epoch_time, 1e-9)
        return seconds, self.batches_run * self.batch_size / seconds

    def pace(self, epoch, epochs, batches_per_epoch):
        """pace() of the epochs this process has run so far (a resumed run's first, partial epoch counts for its
        batches), after `epoch` (0-based) of `epochs`."""
        return pace(self.timed_seconds, self.timed_batches, batches_per_epoch, epochs - epoch - 1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
