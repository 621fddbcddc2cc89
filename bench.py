"""Steady-state training speed in images/s: one baseline step (augmentation + forward + backward + Adam) and
one GAN iteration (augmentation, generator step, discriminator step with the gradient penalty), for each
path side by side in one process:
    plain     straightforward eager fp32 (PyTorch's default Adam, no cuDNN autotuning)         (CUDA only)
    fp32      what the trainers run by default (on CUDA: fused Adam, cuDNN autotuning; the same math)
    bf16      the trainers with --precision bf16 (autocast; fp32 weights)                         (CUDA only)
    one-batch the GAN iteration as it was before the penalty got its own pass: real, fake and interpolated
              images through the discriminator as one batch, the penalty's double backward over all three
              (the same loss and gradients; kept here as the reference the split is measured against)
The ratios to the reference are printed too: each path to plain on CUDA, and the GAN iteration to one-batch.

    python bench.py                                      # the GPU, width 196, batch 128
    python bench.py --width 128 --batch-size 256 --steps 100
    python bench.py --device cpu --width 64 --batch-size 64 --steps 5

Synthetic uint8 images stand in for CIFAR-10 (speed does not depend on the pixels). On CUDA the time is
taken with CUDA events around --steps steps after --warmup steps. Prints a table, then one JSON line.
"""
import argparse
import json
import time

import torch

import torch.nn.functional as F

import train_baseline
import train_gan
from data import augment
from models import Discriminator, Generator, class_noise
from files import check_range, run_main
from runtime import DEVICE_HELP, Runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--width", type=int, default=196, help="channels of the hidden layers (default: 196)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
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


def baseline_step(rt, width, batch, fused, bf16):
    """A function doing one baseline training step on a fixed synthetic batch."""
    device = rt.device
    model = Discriminator(width).to(device)
    train_baseline.freeze_critic_head(model)
    optimizer = adam((p for p in model.parameters() if p.requires_grad), (0.9, 0.999), fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)
    return lambda: train_baseline.train_step(model, optimizer, augment(images, rng), labels, bf16)


def gan_iteration(rt, width, batch, fused, bf16, one_batch=False):
    """A function doing one GAN iteration (G step, then D step) on a fixed synthetic batch; one_batch: the
    discriminator step of the reference formulation."""
    device = rt.device
    gen, disc = Generator(width).to(device), Discriminator(width).to(device)
    opt_g, opt_d = adam(gen.parameters(), (0.0, 0.9), fused), adam(disc.parameters(), (0.0, 0.9), fused)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rng = torch.Generator(device).manual_seed(0)

    def one_batch_step(real):
        fake_labels = torch.randint(0, 10, (batch,), device=device, generator=rng)
        with torch.no_grad():
            fake = gen(class_noise(fake_labels, rng))
        alpha = torch.rand(batch, device=device, generator=rng)
        loss = one_batch_discriminator_loss(disc, real, labels, fake, fake_labels, alpha, 10.0)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    def step():
        real = augment(images, rng)
        train_gan.generator_step(gen, disc, opt_g, batch, rng, bf16)
        if one_batch:
            one_batch_step(real)
        else:
            train_gan.discriminator_step(disc, disc, gen, opt_d, real, labels, rng, 10.0, bf16)
    return step


def images_per_second(step, batch, steps, warmup, device):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1000
    else:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
    return batch * steps / seconds


def run(args):
    check_range(args, "width", 1, 2048)
    check_range(args, "batch_size", 1, 65_536)
    check_range(args, "steps", 1, 100_000)
    check_range(args, "warmup", 0, 100_000)
    rt = Runtime(args.device)
    device = rt.device
    cuda = device.type == "cuda"
    # (name, fused Adam and cuDNN autotuning, bf16 autocast)
    paths = [("plain", False, False), ("fp32", True, False)] if cuda else [("fp32", False, False)]
    if cuda and torch.cuda.is_bf16_supported():
        paths.append(("bf16", True, True))
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "width": args.width, "batch_size": args.batch_size, "steps": args.steps}

    def measure(key, build, *build_args):
        torch.manual_seed(0)
        step = build(rt, args.width, args.batch_size, *build_args)
        results[key] = images_per_second(step, args.batch_size, args.steps, args.warmup, device)

    for path, tuned, bf16 in paths:
        torch.backends.cudnn.benchmark = tuned
        measure(f"baseline_{path}", baseline_step, tuned, bf16)
        measure(f"gan_{path}", gan_iteration, tuned, bf16)
        if path == "fp32":
            measure("gan_one_batch", gan_iteration, tuned, bf16, True)
            results["gan_split_speedup"] = results["gan_fp32"] / results["gan_one_batch"]
    print(f"{results['device']}, width {args.width}, batch {args.batch_size}, {args.steps} steps")
    print(f"{'path':<9} {'baseline img/s':>15} {'GAN img/s':>10}" + (f" {'vs plain':>17}" if cuda else ""))
    for path, _, _ in paths:
        line = f"{path:<9} {results[f'baseline_{path}']:15.0f} {results[f'gan_{path}']:10.0f}"
        if cuda and path != "plain":
            ratios = [results[f"{job}_{path}"] / results[f"{job}_plain"] for job in ("baseline", "gan")]
            results[f"baseline_{path}_speedup"], results[f"gan_{path}_speedup"] = ratios
            line += f" {ratios[0]:7.2f}x {ratios[1]:7.2f}x"
        print(line)
    print(f"{'one-batch':<9} {'':>15} {results['gan_one_batch']:10.0f}")
    print(f"GAN iteration, the penalty on its own pass (fp32) vs one-batch: {results['gan_split_speedup']:.2f}x")
    print(json.dumps(results))


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
