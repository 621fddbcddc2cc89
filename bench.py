"""Steady-state training speed in images/s, and operations per iteration: one baseline step (augmentation +
forward + backward + Adam) and one GAN iteration (augmentation, generator step, discriminator step with the
gradient penalty), each with the Meter's sums the trainers keep, for each path side by side in one process:
    plain     straightforward eager fp32 (PyTorch's default Adam, no cuDNN autotuning)         (CUDA only)
    fp32      what the trainers run by default (on CUDA: fused Adam, cuDNN autotuning; the same math)
    bf16      the trainers with --precision bf16 (autocast; fp32 weights)                         (CUDA only)
    old-ops   fp32 in the operations of before: nn.LayerNorm's generic second derivative and the augmentation
              as it was written then (the same numbers in about twice the kernels; kept as the reference the
              fewer operations are measured against)
    one-batch the GAN iteration as it was before the penalty got its own pass: real, fake and interpolated
              images through the discriminator as one batch, the penalty's double backward over all three
              (the same loss and gradients; kept here as the reference the split is measured against)
The ratios to the references are printed too: each path to plain on CUDA, fp32 to old-ops, and the GAN
iteration to one-batch.

Operations are ATen operations that run a kernel, counted on whatever device runs (views, allocations and
profiler markers do not count): a device-independent lower bound of the kernel launches on a GPU. They are
counted with the fused Adam the trainers use on CUDA (one operation per step; on the CPU the trainers step
parameter by parameter), per phase of one iteration.

    python bench.py                                      # the GPU, width 196, batch 128
    python bench.py --width 128 --batch-size 256 --steps 100
    python bench.py --device cpu --width 64 --batch-size 64 --steps 5

Synthetic uint8 images stand in for CIFAR-10 (speed does not depend on the pixels). After --warmup steps each,
the paths take turns for --rounds rounds of --steps steps, each path's best round counting; on CUDA the time
is taken with CUDA events. Prints a table, then one JSON line.
"""
import argparse
import collections
import json
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train_baseline
import train_gan
from data import CROP_SCALE, JITTER, augment
from files import check_range, run_main
from models import Discriminator, Generator, LayerNorm, class_noise
from runtime import DEVICE_HELP, Runtime, bf16_capable
from training import Meter


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--width", type=int, default=196, help="channels of the hidden layers (default: 196)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the paths take turns this many times; each one's best round counts (default: 3)")
    return parser.parse_args(argv)


def adam(params, betas, fused):
    return torch.optim.Adam(params, lr=1e-4, betas=betas, fused=fused or None)


def one_batch_discriminator_loss(disc, real, real_labels, fake, fake_labels, alpha, lambda_gp):
    """train_gan.discriminator_loss as one pass over real, fake and interpolated images (the reference: same
    loss, same gradients, the penalty's double backward over all three thirds of the batch)."""
    n = len(real)
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    scores, logits = (t.float() for t in disc(torch.cat([real, fake, x_hat])))
    gp = train_gan.gradient_penalty(scores[2 * n:], x_hat, lambda_gp)[0]
    return (scores[n:2 * n].mean() - scores[:n].mean() + F.cross_entropy(logits[:n], real_labels)
            + F.cross_entropy(logits[n:2 * n], fake_labels) + gp)


def old_ops(model):
    """The model with nn.LayerNorm's own autograd (its generic second derivative), as before."""
    for module in model.modules():
        if isinstance(module, LayerNorm):
            module.compact_double_backward = False
    return model


def baseline_step(rt, width, batch, fused, bf16, old=False):
    """The phases [(name, function)] of one baseline training step on a fixed synthetic batch; old: old-ops."""
    device = rt.device
    model = Discriminator(width).to(device)
    if old:
        old_ops(model)
    train_baseline.freeze_critic_head(model)
    optimizer = adam((p for p in model.parameters() if p.requires_grad), (0.9, 0.999), fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)
    meter, state = Meter(device), {}

    def augmentation():
        state["x"] = (old_augment if old else augment)(images, rng)

    def step():
        state["loss"], state["acc"] = train_baseline.train_step(model, optimizer, state["x"], labels, bf16)
    return [("augmentation", augmentation), ("step", step),
            ("Meter", lambda: meter.add(batch, loss=state["loss"], acc=state["acc"]))]


def gan_iteration(rt, width, batch, fused, bf16, one_batch=False, old=False):
    """The phases [(name, function)] of one GAN iteration (G step, then D step) on a fixed synthetic batch;
    one_batch: the discriminator step of the reference formulation; old: old-ops."""
    device = rt.device
    gen, disc = Generator(width).to(device), Discriminator(width).to(device)
    if old:
        old_ops(disc)
    opt_g, opt_d = adam(gen.parameters(), (0.0, 0.9), fused), adam(disc.parameters(), (0.0, 0.9), fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)
    meter, state = Meter(device), {}

    def augmentation():
        state["real"] = (old_augment if old else augment)(images, rng)

    def generator_step():
        state["generator"] = train_gan.generator_step(gen, disc, opt_g, batch, rng, bf16)

    def one_batch_step():
        fake_labels = torch.randint(0, 10, (batch,), device=device, generator=rng)
        with torch.no_grad():
            fake = gen(class_noise(fake_labels, rng))
        alpha = torch.rand(batch, device=device, generator=rng)
        loss = one_batch_discriminator_loss(disc, state["real"], labels, fake, fake_labels, alpha, 10.0)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        state["monitored"] = {"loss": loss.detach()}

    def discriminator_step():
        state["monitored"] = train_gan.discriminator_step(disc, disc, gen, opt_d, state["real"], labels, rng, 10.0,
                                                          bf16)

    def meter_add():
        meter.add(**state["generator"])
        meter.add(**state["monitored"])
    return [("augmentation", augmentation), ("generator step", generator_step),
            ("discriminator step", one_batch_step if one_batch else discriminator_step), ("Meter", meter_add)]


# ---------------------------------------------------------------------------------------------------------
# The augmentation as it was written before (old-ops): the same transformation from the same random draws
# (tests/test_speed.py checks it against data.augment), in about three times the operations.

def _old_blend(x, other, factor):
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def _old_grayscale(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _old_rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    chroma = maxc - minc
    grey = chroma == 0
    s = chroma / torch.where(grey, torch.ones_like(maxc), maxc)
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h)
    return torch.stack([(h / 6).remainder(1), s, maxc], 1)


def _old_hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    sector = sector.long().remainder(6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack([torch.stack(c, 1) for c in
                           [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 1)
    return choices.gather(1, sector[:, None, None].expand(-1, 1, 3, *h.shape[1:])).squeeze(1)


def old_color_jitter(x, brightness, contrast, saturation, hue):
    x = _old_blend(x, torch.zeros_like(x), brightness)
    x = _old_blend(x, _old_grayscale(x).mean((1, 2, 3), keepdim=True), contrast)
    x = _old_blend(x, _old_grayscale(x), saturation)
    hsv = _old_rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + hue.view(-1, 1, 1)).remainder(1)
    return _old_hsv_to_rgb(hsv)


def old_resized_crop_flip(x, left, top, side, flip):
    n, _, height, width = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = side / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + side) / width - 1
    theta[:, 1, 1] = side / height
    theta[:, 1, 2] = (2 * top + side) / height - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    low = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], 1).view(n, 1, 1, 2)
    high = torch.stack([(2 * (left + side) - 1) / width - 1, (2 * (top + side) - 1) / height - 1], 1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, high), low)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def old_augment(images, rng):
    n, _, size, _ = images.shape
    draw = lambda low, high: torch.empty(n, device=images.device).uniform_(low, high, generator=rng)
    side = size * draw(*CROP_SCALE).sqrt()
    left, top = (size - side) * draw(0, 1), (size - side) * draw(0, 1)
    flip = draw(0, 1) < 0.5
    x = old_resized_crop_flip(images.float() / 255, left, top, side, flip)
    x = old_color_jitter(x, draw(1 - JITTER, 1 + JITTER), draw(1 - JITTER, 1 + JITTER),
                         draw(1 - JITTER, 1 + JITTER), draw(-JITTER, JITTER))
    return x * 2 - 1


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
    for _, run in phases:
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


def run(args):
    check_range(args, "width", 1, 2048)
    check_range(args, "batch_size", 2, 65_536)
    check_range(args, "steps", 1, 100_000)
    check_range(args, "warmup", 0, 100_000)
    check_range(args, "rounds", 1, 1000)
    rt = Runtime(args.device)
    device = rt.device
    cuda = device.type == "cuda"
    # (name, fused Adam and cuDNN autotuning, bf16 autocast)
    paths = [("plain", False, False), ("fp32", True, False)] if cuda else [("fp32", False, False)]
    if bf16_capable(device):
        paths.append(("bf16", True, True))
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "width": args.width,
               "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "ops": {}, "traffic_gb": {}}
    jobs = []  # (result key, builder, tuned, bf16, builder options)
    for path, tuned, bf16 in paths:
        jobs += [(f"baseline_{path}", baseline_step, tuned, bf16, {}), (f"gan_{path}", gan_iteration, tuned, bf16, {})]
        if path == "fp32":
            jobs += [("baseline_old_ops", baseline_step, tuned, bf16, {"old": True}),
                     ("gan_old_ops", gan_iteration, tuned, bf16, {"old": True}),
                     ("gan_one_batch", gan_iteration, tuned, bf16, {"one_batch": True})]

    steps = {}
    for key, build, tuned, bf16, options in jobs:
        torch.backends.cudnn.benchmark = tuned
        torch.manual_seed(0)
        phases = build(rt, args.width, args.batch_size, tuned, bf16, **options)
        # The operations with fused Adam, as on CUDA; after a first step, which creates the optimizer's state
        counted = phases if tuned or cuda else build(rt, args.width, args.batch_size, True, bf16, **options)
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
    results["gan_split_speedup"] = results["gan_fp32"] / results["gan_one_batch"]
    for job in ("baseline", "gan"):
        results[f"{job}_fewer_ops_speedup"] = results[f"{job}_fp32"] / results[f"{job}_old_ops"]
    print(f"{results['device']}, width {args.width}, batch {args.batch_size}, best of {args.rounds} rounds of "
          f"{args.steps} steps")
    print(f"{'path':<9} {'baseline img/s':>15} {'GAN img/s':>10} {'baseline ops':>13} {'GAN ops':>8}"
          + (f" {'vs plain':>17}" if cuda else ""))
    ops = results["ops"]
    for path, _, _ in paths + [("old_ops", None, None)]:
        line = (f"{path.replace('_', '-'):<9} {results[f'baseline_{path}']:15.0f} {results[f'gan_{path}']:10.0f} "
                f"{ops[f'baseline_{path}']['total']:13d} {ops[f'gan_{path}']['total']:8d}")
        if cuda and path not in ("plain", "old_ops"):
            ratios = [results[f"{job}_{path}"] / results[f"{job}_plain"] for job in ("baseline", "gan")]
            results[f"baseline_{path}_speedup"], results[f"gan_{path}_speedup"] = ratios
            line += f" {ratios[0]:7.2f}x {ratios[1]:7.2f}x"
        print(line)
    print(f"{'one-batch':<9} {'':>15} {results['gan_one_batch']:10.0f} {'':>13} {ops['gan_one_batch']['total']:8d}")
    print(f"GAN iteration, the penalty on its own pass (fp32) vs one-batch: {results['gan_split_speedup']:.2f}x")
    print(f"fp32 vs old-ops (fewer operations, the same numbers): "
          f"baseline {results['baseline_fewer_ops_speedup']:.2f}x, GAN {results['gan_fewer_ops_speedup']:.2f}x")
    for key in ("baseline_fp32", "baseline_old_ops", "gan_fp32", "gan_old_ops"):
        parts = ", ".join(f"{name} {n}" for name, n in ops[key].items() if name != "total")
        print(f"operations per {'step' if key.startswith('baseline') else 'iteration'}, {key.replace('_', ' ')}: "
              f"{ops[key]['total']} ({parts}); {results['traffic_gb'][key]:.2f} GB read and written (estimate)")
    print(json.dumps(results))


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
