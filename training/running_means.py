"""Running means of the monitored values that both trainers keep (Meter), on the device and over every process, and
what each monitored value is (Monitor): the steps' tables of them are what the console table, TensorBoard and
report.py follow."""
from typing import NamedTuple

import torch
import torch.distributed as dist


class Monitor(NamedTuple):
    """A value a training step returns every batch (a mean over it), kept as running means: its key in the step's
    dict, the metrics file and TensorBoard (as group/key); report.py's panel of it and its line's label there; and,
    where the console's per-epoch table shows its epoch mean, that column's header and format."""
    key: str
    group: str
    panel: str
    label: str
    column: str = ""
    format: str = ""


class Meter:
    """Running sums of named values (0-d tensors) over the epoch and over the current window of batches. They
    stay on the device, so adding costs no host sync; reading the means costs one. Under torchrun the means
    (and the state) are over every process's batches, one all_reduce per read, so that a log compares with one
    process's: every process reads at the same points.

        meter.add(n, loss=loss, acc=acc)     # values are means over n images (or n=1 per batch)
        meter.means()                        # {"loss": ..., "acc": ...} over the epoch so far
        meter.take_window()                  # the means since the last take_window, then a new window
        meter.reset()                        # a new epoch; the window goes on across it
    """

    def __init__(self, device):
        self.device = device
        # The values of one add() call are summed as one stacked tensor: {names: (sums, count)}
        self.total, self.window = {}, {}

    def reset(self):
        """A new epoch: its sums start over. The window does not: windows of training.LOG_EVERY batches run on across
        epochs, so that an epoch of fewer batches (a smoke run, a small own dataset) still gets them."""
        self.total = {}

    def add(self, n=1, **values):
        names = tuple(values)
        stacked = torch.stack(list(values.values())).detach().float()
        if n != 1:
            stacked = stacked * n
        for sums in (self.total, self.window):
            total, count = sums.get(names, (0.0, 0))
            sums[names] = (stacked + total, count + n)

    @staticmethod
    def _sums(sums):
        """{name: (sum, count)} as floats, summed over the processes under torchrun."""
        if not sums:
            return {}
        values = torch.cat([total for total, _ in sums.values()])
        counts = [count for _, count in sums.values()]
        if dist.is_initialized():
            both = torch.cat([values.double(), torch.tensor(counts, dtype=torch.float64, device=values.device)])
            dist.all_reduce(both)
            values, counts = both[:len(values)], [round(c) for c in both[len(values):].tolist()]
        per_name, values = {}, iter(values.tolist())
        for (names, _), count in zip(sums.items(), counts):
            for name in names:
                s, c = per_name.get(name, (0.0, 0))
                per_name[name] = (s + next(values), c + count)
        return per_name

    def _means(self, sums):
        return {name: s / count for name, (s, count) in self._sums(sums).items()}

    def means(self):
        return self._means(self.total)

    def take_window(self):
        means = self._means(self.window)
        self.window = {}
        return means

    def finite(self):
        """A 0-d bool tensor on the device: whether every sum is finite (a NaN or inf once added stays)."""
        if not self.total:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.cat([total for total, _ in self.total.values()])).all()

    def state(self):
        """Plain floats and counts, for the checkpoint (over every process under torchrun)."""
        return {part: {name: [s, count] for name, (s, count) in self._sums(sums).items()}
                for part, sums in (("total", self.total), ("window", self.window))}

    def load_state(self, state):
        """The sums of a checkpoint; under torchrun rank 0 holds them and the others start from zero (with the
        same names, so that the sums still line up when the processes add them)."""
        keep = not dist.is_initialized() or dist.get_rank() == 0
        for part, sums in (("total", self.total), ("window", self.window)):
            sums.clear()
            for name, (s, count) in state[part].items():
                sums[(name,)] = (torch.tensor([s if keep else 0.0], device=self.device), count if keep else 0)
