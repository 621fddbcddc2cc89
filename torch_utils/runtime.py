"""Where and how a script runs: the device, the processes under torchrun, the stop signals, the speed
switches of the device, and the progress bar on a terminal.

    rt = Runtime("auto")     # the GPU when there is one; under torchrun one process per GPU (NCCL) or CPU (gloo)
    rt.is_rank0              # only rank 0 prints and writes files
    rt.agree(flags)          # the same decision on every process
"""
import atexit
import dataclasses
import importlib.util
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from torch_utils.cli import UserError
from torch_utils.ops import set_kernels

DEVICE_HELP = "cuda, cuda:N, cpu, or auto: cuda when present (default: auto)"
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal, resumable; the job scripts resubmit on it


class Runtime:
    """Device and process group. Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its
    LOCAL_RANK (NCCL) or runs on the CPU (gloo); only rank 0 prints and writes files."""

    def __init__(self, device="auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(device, self.world_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            # DDP imports torch.distributed.nn.functional, whose functions take the default process group as a
            # default argument when it exists: imported after init_process_group, those references would keep
            # the group's threads (gloo's) alive past destroy_process_group into the interpreter's shutdown, where
            # one that frees a tensor aborts the process ("terminate called without an active exception", exit
            # status 1 from torchrun after a successful run). Imported first, the group is destroyed at exit.
            importlib.import_module("torch.distributed.nn.functional")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)
        self.is_rank0 = self.rank == 0
        self._meetings = 0

    def rng(self, seed, *position):
        """A generator on the device seeded by (seed, rank, *position): a batch's randomness follows from
        where it is in training, so a resumed run draws what an uninterrupted one would."""
        g = torch.Generator(self.device)
        key = seed
        for value in (self.rank, *position):
            key = (key * 1_000_003 + value) % (2 ** 62)
        return g.manual_seed(key)

    def agree(self, *flags):
        """Each flag (a bool or a 0-d tensor) made true on every process when it is true on any. One
        all_reduce under torchrun; a single process gets its own flags back, as bools."""
        if self.world_size == 1:
            return [bool(f) for f in flags]
        values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=self.device) for f in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def rank0_first(self, action, others_too=True):
        """action() on rank 0, then (others_too) on the other processes once it has succeeded: a download or a
        cache is written once, then read by the rest. A UserError or an exit on rank 0 ends every process, rank 0
        saying why, instead of leaving the others waiting in their next collective."""
        error = result = None
        if self.is_rank0:
            try:
                result = action()
            except (UserError, SystemExit) as e:  # SystemExit: a stop signal while waiting for the lock
                error = e
        self.wait_for_all()
        if self.agree(error is not None)[0]:
            raise error or SystemExit(2)
        if others_too and not self.is_rank0:
            result = action()
        return result

    def wait_for_all(self):
        """Return once every process has come here, waiting outside any collective. What rank 0 does alone (the
        lock wait, up to --lock-wait; a first download or decode; the evaluator's Inception statistics; a
        measurement) can outlast a collective's timeout (10 minutes under NCCL), which would end the job with a
        traceback; the others count in at the process group's store instead and poll it."""
        if self.world_size == 1:
            return
        self._meetings += 1
        key = f"runtime/meeting{self._meetings}"
        store = dist.distributed_c10d._get_default_store()  # the store torchrun's processes met at
        store.add(key, 1)
        while store.add(key, 0) < self.world_size:
            time.sleep(0.1)


def pick_device(device, world_size=1):
    """torch.device for --device, checked against this machine and this PyTorch build, with an explicit GPU
    index (set_device, CUDA generators and NCCL want one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda") or (chosen.type == "cpu" and chosen.index):
        raise UserError(f"unknown --device {device!r}; use cuda, cuda:N, cpu or auto")
    if chosen.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "this PyTorch is built without CUDA" if torch.version.cuda is None else "this machine has no CUDA GPU"
        raise UserError(f"--device {device}, but {build}; use --device cpu")
    if world_size > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        index = torch.cuda.current_device() if chosen.index is None else chosen.index
    if index >= torch.cuda.device_count():
        raise UserError(f"no GPU cuda:{index}: this machine has {torch.cuda.device_count()}")
    check_gpu_supported(index)
    return torch.device("cuda", index)


def check_gpu_supported(index):
    """Refuse, in one line, a GPU this PyTorch build has no kernels for (it would fail at the first kernel)."""
    major, minor = torch.cuda.get_device_capability(index)
    built = torch.cuda.get_arch_list()
    # sm_XY runs on that capability; compute_XY (PTX) on it and every newer one.
    runs = any(arch == f"sm_{major}{minor}" or (arch.startswith("compute_") and int(arch[8:]) <= major * 10 + minor)
               for arch in built)
    if built and not runs:
        raise UserError(f"GPU cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor}) "
                        f"is not supported by this PyTorch {torch.__version__}, built for {' '.join(built)}; install "
                        "a build for it (jobs/README.md) or use --device cpu")


class StopSignal:
    """Turns the signals that end a run into a request to save and stop: SIGTERM and SIGUSR1 (what schedulers
    send at walltime or preemption), SIGINT (Ctrl-C) and SIGHUP (a dropped ssh session). Installed first thing,
    so that a signal during start-up is a request too. A second SIGINT stops at once (KeyboardInterrupt); any
    other repeat changes nothing, up to the exit (srun and the batch shell may both forward the scheduler's
    SIGTERM), so the run still saves and exits 75."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    # What a first Ctrl-C prints (check_gpu.py's subclass says what a stop means there)
    CTRL_C = b"\nCtrl-C: saving a checkpoint after this batch; press Ctrl-C again to stop at once\n"

    def __init__(self):
        self.received = None  # the name of the first stop signal
        self._interrupted = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        # A process on its way out with EXIT_STOPPED ignores further stop signals: a repeated SIGTERM while the
        # interpreter exits would kill it with 143 instead of the 75 that the job scripts resubmit on.
        stopped = isinstance(exc, SystemExit) and exc.code == EXIT_STOPPED
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped and sig != signal.SIGINT else handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._interrupted:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupted = True
            # os.write, not print: a handler may run in the middle of another print.
            try:
                os.write(2, self.CTRL_C)
            except OSError:  # the terminal is gone: the stop goes on without the message
                pass


def progress_bar(iterable=None, total=None, desc=None, enabled=True):
    """tqdm on a terminal; nothing in a batch job's log file, where the scripts' own lines tell the progress."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def bf16_capable(device):
    """Whether bf16 runs natively here: a CUDA GPU of compute capability 8.0 or newer (Ampere and newer).
    torch.cuda.is_bf16_supported() also counts the emulation of older GPUs (T4, RTX 20xx), where bf16
    convolutions are slower than fp32 ones."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def setup_speed(device, precision):
    """Switch on the speed-ups for this device; returns whether to autocast to bf16. On CUDA cuDNN picks the
    fastest convolution algorithms for the fixed shapes (same math). bf16 only where bf16_capable."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision == "bf16":
        if device.type != "cuda":
            raise UserError("--precision bf16 needs a CUDA GPU (Ampere or newer); use --precision fp32")
        if not bf16_capable(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise UserError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer (Ampere or newer); "
                            f"{device} ({torch.cuda.get_device_name(device)}) is {major}.{minor}: use --precision fp32")
    return precision == "bf16"


def autocast(device, enabled):
    """bf16 autocast for forward passes where enabled: convolutions and linears in bf16, the normalizations,
    losses and the weights (fp32 master copies) stay in fp32. bf16 needs no loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


SPEED_HELP = ("how the nets run on a CUDA GPU, the same math either way: fast, channels_last memory, the "
              "penalty's convolutions in ordinary kernels, LayerNorm in Triton kernels and each training step "
              "replayed as a CUDA graph (a GAN iteration 1.63x, a baseline step 1.45x on an H200); plain, "
              "PyTorch's own eager kernels; auto, fast on one GPU, plain on the CPU and under torchrun "
              "(default: auto)")


@dataclasses.dataclass(frozen=True)
class Speed:
    """The speed switches of a run on a CUDA GPU, each the same math as the plain path (torch_utils.ops.set_kernels):
    channels_last: weights and activations NHWC, the layout cuDNN's tensor-core kernels use (no transposes);
    conv_gradfix: the discriminator's convolutions differentiate into ordinary convolution kernels;
    triton_layer_norm: LayerNorm's rows split over the whole GPU (torch_utils/ops/triton_layer_norm.py);
    cuda_graphs: each training step captured once and replayed (GraphedStep), no Python between kernels;
    fused_leaky_relu: with triton_layer_norm, the blocks' LeakyReLU computed inside the LayerNorm kernels;
    row_kernels: with triton_layer_norm, each row's few numbers in one small kernel, not a dozen torch operations.
    The last two are not yet measured on a GPU: bench.py's paths alone, no --speed choice."""

    channels_last: bool = False
    conv_gradfix: bool = False
    triton_layer_norm: bool = False
    cuda_graphs: bool = False
    fused_leaky_relu: bool = False
    row_kernels: bool = False

    @classmethod
    def choose(cls, name, device, world_size=1):
        """The switches of --speed NAME on this device. auto is fast on one GPU, where it was measured faster (an
        H200) and its gradients as accurate as the plain path's (tests/test_kernels.py); under torchrun, where
        fast is unmeasured, auto is plain."""
        if name == "plain" or (name == "auto" and (device.type != "cuda" or world_size > 1)):
            return cls()
        if device.type != "cuda":
            raise UserError("--speed fast needs a CUDA GPU; use --speed plain or auto on the CPU")
        if world_size > 1:  # DDP's hooks run between the kernels: no whole-step graph
            return cls(channels_last=True, conv_gradfix=True)
        # Triton's kernels pay only inside a CUDA graph: launched one by one from Python they were slower than
        # PyTorch's (bench.py, an H200)
        return cls(channels_last=True, conv_gradfix=True, cuda_graphs=True,
                   triton_layer_norm=importlib.util.find_spec("triton") is not None)

    def prepare(self, *models):
        """The models switched to these kernels and memory layout, in place."""
        for model in models:
            set_kernels(model, self.conv_gradfix, "triton" if self.triton_layer_norm else "native",
                        self.fused_leaky_relu, self.row_kernels)
            if self.channels_last:
                model.to(memory_format=torch.channels_last)


class GraphedStep:
    """step(**tensors) -> its tensors, a whole training step (forward, backward and optimizer), run eagerly for
    its first `eager` calls (on a side stream, as capture requires: cuDNN's autotuning, the optimizer's state and
    the allocator settle there), then captured once as a CUDA graph and replayed: one launch for the step's
    hundreds of kernels. Each call's tensors are copied into the graph's inputs; the outputs returned are the
    graph's own, overwritten by the next replay, so read them (in stream order) before that. The step may hold no
    host sync and no random draw of its own: draw outside and pass the draws in. The optimizer must be
    capturable (training.run.adam(..., capturable=True)). Every call is a real step: the eager ones train as the
    replays do. A step whose capture fails runs eagerly from then on, after one line on stderr."""

    EAGER_CALLS = 3

    def __init__(self, step, eager=EAGER_CALLS):
        self.step, self.eager = step, eager
        self.calls, self.graph, self.inputs, self.outputs = 0, None, None, None

    def __call__(self, **inputs):
        self.calls += 1
        if self.graph is None and self.calls == self.eager + 1:
            self._capture(inputs)
        if self.graph is not None:
            for name, value in inputs.items():
                self.inputs[name].copy_(value)
            self.graph.replay()
            return self.outputs
        if self.calls > self.eager:  # the capture failed
            return self.step(**inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(**inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, inputs):
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step(**self.inputs)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"note: CUDA graph capture failed ({first}); this step runs eagerly", file=sys.stderr)
            return
        self.graph = graph
