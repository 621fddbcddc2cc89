"""Steady-state training speed in images/s, and operations per iteration: one baseline step (augmentation +
forward + backward + Adam) and one GAN iteration (augmentation, generator step, discriminator step with the
gradient penalty), each with the Meter's sums the trainers keep, for each path side by side in one process:
    plain         straightforward eager fp32 (PyTorch's default Adam, no cuDNN autotuning)            (CUDA only)
    fp32          the trainers' eager path, --speed plain (on CUDA: fused Adam, cuDNN autotuning)
    channels-last fp32 with the nets and batches in channels_last memory                               (CUDA only)
    gradfix       fp32 with the discriminator's convolutions differentiated into ordinary kernels
    triton-ln     fp32 with LayerNorm in Triton kernels (torch_utils/ops)                              (CUDA only)
    graphs        fp32 with each update captured as a CUDA graph and replayed                         (CUDA only)
    fast          all four together: --speed fast, the trainers' default on one GPU                     (CUDA only)
    fast-native-ln, fast-autograd-conv   fast with PyTorch's LayerNorm, fast with autograd's conv2d    (CUDA only)
    fast-fused-act fast with the blocks' LeakyReLU inside the Triton LayerNorm kernels                  (CUDA only)
    fast-row-kernels   fast with each LayerNorm row's few numbers in one small Triton kernel          (CUDA only)
    fast-fused    fast with both                                                                      (CUDA only)
    bf16, fast-bf16   the eager and the fast path with --precision bf16                     (compute capability 8.0+)
    old-ops       the GAN iteration with nn.LayerNorm's own autograd, the operations of before: its generic
                  second derivative (the same numbers in more kernels)
    one-batch     the GAN iteration with real, fake and interpolated images through the discriminator as one batch
                  and the penalty's double backward over all three (the same loss and gradients)
Each path computes the same numbers as fp32 (tests/test_gpu.py checks that on a GPU, tests/test_models.py the
kernels on the CPU). The ratios printed are each path's to fp32, and fp32's to plain, old-ops and one-batch.

Operations are ATen operations that run a kernel, counted on whatever device runs (views, allocations and
profiler markers do not count): a device-independent lower bound of the kernel launches on a GPU. They are
counted with the fused Adam the trainers use on CUDA, per phase of one iteration, for the eager paths without
Triton kernels (a CUDA graph is one launch; a Triton kernel is no ATen operation).

--profile: after the timing, torch.profiler over --profile-steps steps of each path, with ranges for the phases
(augmentation, generator step, the discriminator's forward on real + fake, the penalty's gradient, its
backward, the optimizer); prints the kernel time per step, the phases' times, the top kernels by self device time
(share, calls, mean) and the convolutions grouped by input shape, and writes a Chrome trace per path to
--trace-dir (open it in chrome://tracing or https://ui.perfetto.dev). On the CPU it profiles CPU operations.
On an eager path a phase's time leaves out the kernels of its backward passes: autograd launches them from a
thread of its own, outside the ranges (a CUDA graph's replay is launched inside them).

    python bench.py                                      # the GPU, width 196, batch 128, every path
    python bench.py --paths fp32,fast --profile          # the two paths, and where their time goes
    python bench.py --width 128 --batch-size 256 --steps 100
    python bench.py --device cpu --width 64 --batch-size 64 --steps 5

Synthetic uint8 images stand in for CIFAR-10 (speed does not depend on the pixels). After --warmup steps each,
the paths take turns for --rounds rounds of --steps steps, each path's best round counting; on CUDA the time
is taken with CUDA events. Prints a table, then one JSON line.
"""
import argparse
import collections
import dataclasses
import functools
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from models import NUM_CLASSES, Discriminator, Generator, class_noise
from torch_utils.cli import UserError, check_range, run_main
from torch_utils.runtime import DEVICE_HELP, GraphedStep, Runtime, Speed, bf16_capable
from training import gan_steps
from training.baseline_step import freeze_critic_head, train_step
from training.data import augment
from training.optim import adam
from training.running_means import Meter


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--width", type=int, default=196, help="channels of the hidden layers (default: 196)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the paths take turns this many times; each one's best round counts (default: 3)")
    parser.add_argument("--paths", metavar="NAMES",
                        help="comma-separated paths to measure, of: " + ", ".join(PATHS) + " (default: every one this "
                             "device runs)")
    parser.add_argument("--profile", action="store_true", help="profile each path after timing it (see above)")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps profiled per path (default: 5)")
    parser.add_argument("--profile-top", type=int, default=12, help="kernels and convolutions listed (default: 12)")
    parser.add_argument("--trace-dir", default="bench_traces", help="where --profile writes its Chrome traces "
                                                                    "(default: bench_traces)")
    return parser.parse_args(argv)


def one_batch_discriminator_loss(disc, real, real_labels, fake, fake_labels, alpha, lambda_gp):
    """discriminator_loss as one pass over real, fake and interpolated images: the same loss and gradients, the
    penalty's double backward over all three thirds of the batch (the reference path one-batch; the tests compare)."""
    n = len(real)
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    judged = disc(torch.cat([real, fake, x_hat]))
    scores, logits = judged.score.float(), judged.logits.float()
    gp = gan_steps.gradient_penalty(scores[2 * n:], x_hat, lambda_gp)[0]
    return (scores[n:2 * n].mean() - scores[:n].mean() + F.cross_entropy(logits[:n], real_labels)
            + F.cross_entropy(logits[n:2 * n], fake_labels) + gp)


def old_ops(model):
    """The model with nn.LayerNorm in its blocks (autograd's generic second derivative), as before."""
    for block in model.blocks:
        plain = nn.LayerNorm(block.norm.normalized_shape, eps=block.norm.eps, device=block.norm.weight.device)
        plain.load_state_dict(block.norm.state_dict())
        block.norm = plain
    return model


FAST = Speed(channels_last=True, conv_gradfix=True, triton_layer_norm=True, cuda_graphs=True)
# name: (fused Adam and cuDNN autotuning, bf16 autocast, speed switches, builder options, CUDA only)
PATHS = {
    "plain": (False, False, Speed(), {}, True),
    "fp32": (True, False, Speed(), {}, False),
    "channels-last": (True, False, Speed(channels_last=True), {}, True),
    "gradfix": (True, False, Speed(conv_gradfix=True), {}, False),
    "triton-ln": (True, False, Speed(triton_layer_norm=True), {}, True),
    "graphs": (True, False, Speed(cuda_graphs=True), {}, True),
    "fast": (True, False, FAST, {}, True),
    "fast-native-ln": (True, False, dataclasses.replace(FAST, triton_layer_norm=False), {}, True),
    "fast-autograd-conv": (True, False, dataclasses.replace(FAST, conv_gradfix=False), {}, True),
    "fast-fused-act": (True, False, dataclasses.replace(FAST, fused_leaky_relu=True), {}, True),
    "fast-row-kernels": (True, False, dataclasses.replace(FAST, row_kernels=True), {}, True),
    "fast-fused": (True, False, dataclasses.replace(FAST, fused_leaky_relu=True, row_kernels=True), {}, True),
    "bf16": (True, True, Speed(), {}, True),
    "fast-bf16": (True, True, FAST, {}, True),
    "old-ops": (True, False, Speed(), {"old": True}, False),
    "one-batch": (True, False, Speed(), {"one_batch": True}, False),
}
GAN_ONLY = {"one-batch", "old-ops"}  # the baseline takes no second derivative


def baseline_step(rt, width, batch, fused, bf16, speed=Speed()):
    """The phases [(name, function)] of one baseline training step on a fixed synthetic batch."""
    device = rt.device
    model = Discriminator(width).to(device)
    speed.prepare(model)
    freeze_critic_head(model)
    optimizer = adam((p for p in model.parameters() if p.requires_grad), 1e-4, (0.9, 0.999), device,
                     speed.cuda_graphs, fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)
    meter, state = Meter(device), {}
    update = functools.partial(train_step, model, optimizer, bf16=bf16)
    if speed.cuda_graphs:
        update = GraphedStep(update)

    def augmentation():
        state["x"] = augment(images, rng)

    def step():
        state["loss"], state["acc"] = update(x=state["x"], labels=labels)
    return [("augmentation", augmentation), ("step", step),
            ("Meter", lambda: meter.add(batch, loss=state["loss"], acc=state["acc"]))]


def gan_iteration(rt, width, batch, fused, bf16, one_batch=False, old=False, speed=Speed()):
    """The phases [(name, function)] of one GAN iteration (G step, then D step) on a fixed synthetic batch, as
    train_gan.py runs it; one_batch: the discriminator step of the reference formulation; old: old-ops."""
    device = rt.device
    gen, disc = Generator(width).to(device), Discriminator(width).to(device)
    if old:
        old_ops(disc)
    speed.prepare(gen, disc)
    opt_g = adam(gen.parameters(), 1e-4, (0.0, 0.9), device, speed.cuda_graphs, fused)
    opt_d = adam(disc.parameters(), 1e-4, (0.0, 0.9), device, speed.cuda_graphs, fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)
    meter, state = Meter(device), {}
    nets = gan_steps.Nets(gen, disc, gen, disc, opt_g, opt_d)
    generator, discriminator = gan_steps.training_steps(nets, gan_steps.Recipe(bf16=bf16), speed.cuda_graphs)

    def augmentation():
        state["real"] = augment(images, rng)

    def generator_step():
        state["generator"] = generator(batch, rng, None)

    def one_batch_step():
        fake_labels = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=rng)
        with torch.no_grad():
            fake = gen(class_noise(fake_labels, rng))
        alpha = torch.rand(batch, device=device, generator=rng)
        loss = one_batch_discriminator_loss(disc, state["real"], labels, fake, fake_labels, alpha, 10.0)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        state["monitored"] = {"loss": loss.detach()}

    def discriminator_step():
        state["monitored"] = discriminator(state["real"], labels, rng, 1)

    def meter_add():
        meter.add(**state["generator"])
        meter.add(**state["monitored"])
    return [("augmentation", augmentation), ("generator step", generator_step),
            ("discriminator step", one_batch_step if one_batch else discriminator_step), ("Meter", meter_add)]


# ---------------------------------------------------------------------------------------------------------
# Counting operations

# Operations that run no kernel beyond what their schema says (a view) or at all
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_unsafe_view", "alias"}


def runs_kernel(op):
    schema = op._schema
    if schema.name.startswith("profiler::") or schema.name.split("::")[-1] in NO_KERNEL:
        return False
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def tensor_bytes(values):
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(values)
               if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Counts, by name, the ATen operations that reach the device below autograd and run a kernel, and the bytes
    they read and write if each read its tensor arguments and wrote its results once (an estimate of the memory
    traffic: a lower bound for elementwise operations and reductions, which on a GPU are bound by it)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.bytes = 0

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        out = op(*args, **(kwargs or {}))
        if runs_kernel(op):
            self.counts[str(op.overloadpacket)] += 1
            self.bytes += tensor_bytes((args, kwargs, out))
        return out


def count_ops(phases, traffic=None):
    """{phase name: operations} of one pass over the phases, and "total"; traffic, a dict, gets the bytes moved."""
    counts = {}
    for name, run in phases:
        with OpCounter() as counter:
            run()
        counts[name] = sum(counter.counts.values())
        if traffic is not None:
            traffic[name] = counter.bytes
    counts["total"] = sum(counts.values())
    return counts


def run_phases(phases):
    for name, run in phases:
        with record_function(name):
            run()


def seconds(step, steps, device):
    """The time `steps` calls of step take (on CUDA measured with events, after the queue has drained)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def profile_path(key, step, args, device):
    """--profile: where one path's time goes over --profile-steps steps, printed and written as a Chrome trace."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, acc_events=True) as prof:
        for _ in range(args.profile_steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    os.makedirs(args.trace_dir, exist_ok=True)
    trace = os.path.join(args.trace_dir, f"{key}.json")
    prof.export_chrome_trace(trace)
    where = "device" if cuda else "cpu"
    self_time = lambda e: getattr(e, f"self_{where}_time_total")
    events = prof.key_averages()
    phases = {}  # a range is listed on the host and, on CUDA, again on the device: the larger time counts
    for e in events:
        if e.key in PHASE_NAMES:
            phases[e.key] = max(phases.get(e.key, 0), getattr(e, f"{where}_time_total"))
    kernels = [e for e in events if self_time(e) > 0 and e.key not in PHASE_NAMES
               and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    total = sum(self_time(e) for e in kernels) or 1
    per_step = lambda us: us / 1000 / args.profile_steps
    print(f"\nprofile of {key} ({args.profile_steps} steps; trace {trace}); ms per step, {where} time")
    print(f"  {'every kernel' if cuda else 'every operation'} (self time){'':<18} {per_step(total):9.3f}")
    for name, us in sorted(phases.items(), key=lambda item: -item[1]):
        print(f"  {name:<40} {per_step(us):9.3f}")
    print(f"  top {'kernels' if cuda else 'operations'} by self {where} time:")
    top = []
    for e in sorted(kernels, key=lambda e: -self_time(e))[:args.profile_top]:
        top.append({"name": e.key, "share": self_time(e) / total, "calls": e.count // args.profile_steps,
                    "mean_us": self_time(e) / e.count})
        print(f"  {100 * top[-1]['share']:5.1f}% {top[-1]['calls']:5d} calls/step {top[-1]['mean_us']:9.1f} us  "
              f"{e.key[:90]}")
    convolutions = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in CONVOLUTION_OPS:
            convolutions.append({"op": e.key, "shapes": str(e.input_shapes[:2]), "calls": e.count // args.profile_steps,
                                 "ms_per_step": per_step(getattr(e, f"{where}_time_total"))})
    convolutions.sort(key=lambda c: -c["ms_per_step"])
    print("  convolutions by input shape (input, weight):")
    for c in convolutions[:args.profile_top]:
        print(f"  {c['ms_per_step']:8.3f} ms {c['calls']:4d} calls/step  {c['op']} {c['shapes']}")
    return {"trace": trace, "kernel_ms": per_step(total), "top": top, "convolutions": convolutions[:args.profile_top],
            "phases_ms": {name: per_step(us) for name, us in phases.items()}}


PHASE_NAMES = {"augmentation", "generator step", "discriminator step", "Meter", "step", "generator forward + backward",
               "discriminator forward (real + fake)", "penalty gradient", "discriminator backward", "optimizer",
               "generator forward (fake batch)"}
CONVOLUTION_OPS = {"aten::convolution", "aten::convolution_backward"}


def chosen_paths(args, cuda, bf16):
    """The names of the paths to measure on this device."""
    runs = [name for name, (_, half, _, _, cuda_only) in PATHS.items() if (cuda or not cuda_only) and (bf16 or not half)]
    if args.paths is None:
        return runs
    asked = [name.strip() for name in args.paths.split(",") if name.strip()]
    for name in asked:
        if name not in runs:
            raise UserError(f"--paths: {name!r} is not a path on this device; choose from {', '.join(runs)}")
    return asked


def run(args):
    check_range(args, "width", 1, 2048)
    check_range(args, "batch_size", 2, 65_536)
    check_range(args, "steps", 1, 100_000)
    check_range(args, "warmup", 0, 100_000)
    check_range(args, "rounds", 1, 1000)
    check_range(args, "profile_steps", 1, 1000)
    rt = Runtime(args.device)
    device = rt.device
    cuda = device.type == "cuda"
    names = chosen_paths(args, cuda, bf16_capable(device))
    if any(PATHS[name][2].cuda_graphs for name in names) and args.warmup <= GraphedStep.EAGER_CALLS:
        raise UserError(f"--warmup {args.warmup}: the CUDA-graph paths capture after {GraphedStep.EAGER_CALLS} eager "
                        f"steps; use --warmup {GraphedStep.EAGER_CALLS + 2} or more")
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
               "width": args.width, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
               "paths": names, "ops": {}, "traffic_gb": {}}
    steps = {}
    for name in names:
        tuned, bf16, speed, options, _ = PATHS[name]
        for job, build in (("baseline", baseline_step), ("gan", gan_iteration)):
            if name in GAN_ONLY and job == "baseline":
                continue
            key = f"{job}_{name.replace('-', '_')}"
            torch.backends.cudnn.benchmark = tuned
            torch.manual_seed(0)
            phases = build(rt, args.width, args.batch_size, tuned, bf16, speed=speed, **options)
            if not (speed.cuda_graphs or speed.triton_layer_norm):
                # The operations with fused Adam, as on CUDA; after a first step, which creates the optimizer's state
                counted = phases if tuned or cuda else build(rt, args.width, args.batch_size, True, bf16, speed=speed,
                                                             **options)
                run_phases(counted)
                traffic = {}
                results["ops"][key] = count_ops(counted, traffic)
                results["traffic_gb"][key] = sum(traffic.values()) / 1e9
            steps[key] = (tuned, lambda phases=phases: run_phases(phases))
            seconds(steps[key][1], args.warmup, device)
    # The paths take turns, --rounds times, and each one's best round counts: a machine busy with other work
    # slows them alike
    best = {}
    for _ in range(args.rounds):
        for key, (tuned, step) in steps.items():
            torch.backends.cudnn.benchmark = tuned
            best[key] = min(best.get(key, float("inf")), seconds(step, args.steps, device))
    results.update({key: args.batch_size * args.steps / best[key] for key in steps})
    print_table(results, names, args)
    if args.profile:
        results["profile"] = {}
        for key, (tuned, step) in steps.items():
            torch.backends.cudnn.benchmark = tuned
            results["profile"][key] = profile_path(key, step, args, device)
    print(json.dumps(results))


def print_table(results, names, args):
    """The images/s of each path, its ratio to fp32 (and fp32's to the references) and the operations."""
    ops = results["ops"]
    print(f"{results['device']}, torch {results['torch']}, width {args.width}, batch {args.batch_size}, best of "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"{'path':<13} {'baseline img/s':>15} {'GAN img/s':>10} {'vs fp32':>17} {'baseline ops':>13} {'GAN ops':>8}")
    for name in names:
        key = name.replace("-", "_")
        cells = []
        for job in ("baseline", "gan"):
            value = results.get(f"{job}_{key}")
            cells.append(f"{value:.0f}" if value else "")
            if value and f"{job}_fp32" in results and name != "fp32":
                results[f"{job}_{key}_vs_fp32"] = value / results[f"{job}_fp32"]
        ratios = [results.get(f"{job}_{key}_vs_fp32") for job in ("baseline", "gan")]
        ratio_text = " ".join(f"{r:7.2f}x" if r else f"{'':>8}" for r in ratios)
        counts = [str(ops[f"{job}_{key}"]["total"]) if f"{job}_{key}" in ops else "-" for job in ("baseline", "gan")]
        print(f"{name:<13} {cells[0]:>15} {cells[1]:>10} {ratio_text:>17} {counts[0]:>13} {counts[1]:>8}")
    for key in ("baseline_fp32", "gan_fp32", "gan_old_ops", "gan_fast", "gan_gradfix"):
        if key in ops:
            parts = ", ".join(f"{name} {n}" for name, n in ops[key].items() if name != "total")
            print(f"operations per {'step' if key.startswith('baseline') else 'iteration'}, {key.replace('_', ' ')}: "
                  f"{ops[key]['total']} ({parts}); {results['traffic_gb'][key]:.2f} GB read and written (estimate)")


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
