"""What the training scripts share beyond data and checkpoints: the common flags, device and process-group
setup (plain, or one process per GPU under torchrun), the stop signals of batch schedulers, seeding, the
metrics file and the one-line errors."""
import atexit
import json
import os
import signal
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one line, without a traceback."""


def run_main(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def add_common_args(parser, epochs, lr):
    """The flags both trainers take, with the defaults of their job."""
    g = parser.add_argument_group("data and files")
    g.add_argument("--data-dir", default="data",
                   help="CIFAR-10: a folder with train/<class>/* and test/<class>/* images, or with torchvision's "
                        "cifar-10-batches-py/; downloaded here when missing or empty (default: data)")
    g.add_argument("--out-dir", default=".", help="where models, checkpoints and metrics go (default: .)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out-dir (starts fresh when there is none; "
                        "a finished run is left as it is)")
    g.add_argument("--limit-train", type=int, metavar="N",
                   help="train on N training images, a random subset that is the same every run (smoke runs)")
    g.add_argument("--limit-test", type=int, metavar="N", help="evaluate on N test images, chosen the same way")
    g = parser.add_argument_group("model and optimizer")
    g.add_argument("--width", type=int, default=196, help="channels of every hidden layer (default: 196; the "
                                                          "assignment allows 128 to halve the time)")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs to train (default: {epochs})")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch size, split across processes under torchrun (default: 128)")
    g.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default: {lr:g})")
    g = parser.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, shuffling and augmentation")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto: cuda when present (default)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the discriminator's convolutions and linears to bf16 on CUDA (faster; "
                        "fp32 weights; not yet checked against fp32 on a full schedule) (default: fp32)")


def check_common_args(args):
    for name in ("epochs", "batch_size", "width", "limit_train", "limit_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")


class Runtime:
    """Device and process group. Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its
    LOCAL_RANK (NCCL) or runs on the CPU (gloo); only rank 0 prints and writes files."""

    def __init__(self, device="auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown --device {device!r}; use cuda, cuda:N, cpu or auto")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError("--device cuda, but this machine has no CUDA GPU; use --device cpu")
            # An explicit index: set_device, CUDA generators and NCCL want one.
            if self.world_size > 1:
                index = int(os.environ.get("LOCAL_RANK", "0"))
            else:
                index = torch.cuda.current_device() if self.device.index is None else self.device.index
            if index >= torch.cuda.device_count():
                raise UserError(f"no GPU cuda:{index}: this machine has {torch.cuda.device_count()}")
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)
        self.main = self.rank == 0

    def rng(self, seed, *position):
        """A generator on the device seeded by (seed, rank, *position): a batch's randomness follows from
        where it is in training, so a resumed run draws what an uninterrupted one would."""
        g = torch.Generator(self.device)
        key = seed
        for value in (self.rank, *position):
            key = (key * 1_000_003 + value) % (2 ** 62)
        return g.manual_seed(key)

    def stop_requested(self, stop, batch):
        """Whether any process has received a stop signal. The processes agree every 10 batches, so they
        all stop after the same batch; a single process stops at once."""
        if self.world_size == 1:
            return stop.received is not None
        if batch % 10 != 9:
            return False
        flag = torch.tensor([float(stop.received is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def setup_speed(device, precision):
    """Switch on the speed-ups for this device; returns whether to autocast to bf16. On CUDA cuDNN picks the
    fastest convolution algorithms for the fixed shapes (same math). bf16 runs on CUDA GPUs that have it
    (Ampere and newer)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision == "bf16" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise UserError("--precision bf16 needs a CUDA GPU with bf16 (Ampere or newer); use --precision fp32")
    return precision == "bf16"


def autocast(device, enabled):
    """bf16 autocast for forward passes where enabled: convolutions and linears in bf16, the normalizations,
    losses and the weights (fp32 master copies) stay in fp32. bf16 needs no loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def adam(params, lr, betas, device):
    """Adam; on CUDA its fused kernel (one launch for all parameters, the same update)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if device.type == "cuda" else None)


class StopSignal:
    """Catches SIGTERM and SIGUSR1 (what schedulers send at walltime or preemption) so the trainer can save
    a checkpoint at the next batch and exit, instead of dying mid-write."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def prepare_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable folder")


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path):
    """The records of a metrics file; a last line cut short (a job killed while appending) is skipped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except ValueError:
        pass
    return records


def progress_bar(iterable, total, desc, enabled):
    """tqdm on a terminal; none in a batch job's log file, where the per-epoch lines tell the progress."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False,
                dynamic_ncols=True)

