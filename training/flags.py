"""The flags both trainers take, checked before any work, and the rules of what a resume may change."""
import contextlib
import io
import sys

from models import ARCHS, DEFAULT_WIDTH
from torch_utils.cli import UserError, check_range
from torch_utils.runtime import DEVICE_HELP, SPEED_HELP


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


# Flags that may differ when any run is resumed: where things are and how the run is carried out.
WHERE_AND_HOW = frozenset({"data_dir", "out_dir", "resume", "limit_test", "lock_wait", "device", "precision",
                           "tensorboard", "speed", "check_flags"})


class ResumeRules:
    """What a resume of a trainer's run may change: its tunable settings of the optimization (as is common mid-run:
    a lower --lr after a NaN loss or a warning; each change is recorded in the metrics, the checkpoint's history
    and the events), its free flags and WHERE_AND_HOW. Every other flag is the run's configuration, saved in its
    checkpoint: a resume that changes one is refused."""

    def __init__(self, tunable, free=()):
        self.tunable, self.free = frozenset(tunable), frozenset(free) | WHERE_AND_HOW

    def config(self, args):
        """The flags a resumed run must keep."""
        return {k: v for k, v in vars(args).items() if k not in self.tunable | self.free}

    def settings(self, args):
        """The tunable settings as this run has them."""
        return {k: getattr(args, k) for k in sorted(self.tunable)}


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
