"""Train the generator and the discriminator together: a WGAN-GP critic (fc1) with an ACGAN auxiliary
classifier (fc10), the generator conditioned on the class through its noise.

    python train_gan.py --data-dir data                        # one GPU, or the CPU
    python train_gan.py --data-dir data --resume               # continue after a kill or walltime
    python train_gan.py --data-dir data --resume --epochs 500  # train a finished run further
    torchrun --standalone --nproc_per_node=4 train_gan.py --data-dir data    # 4 GPUs, one node

Spec defaults: 200 epochs, batch 128, Adam lr 1e-4 betas (0, 0.9) for both nets, gradient penalty 10,
the generator trained every iteration. Writes to --out-dir: output/NNN.png (a 10x10 grid of one fixed noise
batch after epoch NNN, one class per column), generator.model and discriminator.model (every epoch and at
the end), gan.ckpt (resumable, every epoch) and gan_metrics.jsonl.
"""
import argparse
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from checkpoint import atomic_save, load_checkpoint, model_record, restore_model, save_model
from data import CLASSES, augment, training_loaders
from images import save_grid, to_unit
from models import NUM_CLASSES, Discriminator, Generator, class_noise
from runtime import (Runtime, StopSignal, UserError, adam, add_common_args, append_metrics, autocast,
                     check_common_args, prepare_out_dir, progress_bar, run_main, setup_speed)

LOG_EVERY = 50  # batches between the printed/logged running means (and the host syncs they need)
MONITORED = ("gp", "fake_score", "real_score", "real_ce", "fake_ce", "real_acc")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=200, lr=1e-4)
    g = parser.add_argument_group("GAN")
    g.add_argument("--gen-train", type=int, default=1,
                   help="train the generator every N-th iteration; larger trains the discriminator more (default: 1)")
    g.add_argument("--lambda-gp", type=float, default=10.0, help="weight of the gradient penalty (default: 10)")
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.gen_train < 1:
        parser.error("--gen-train must be at least 1")
    return args


def gradient_penalty(score_hat, x_hat, lambda_gp):
    """lambda * mean((||d score / d x_hat||_2 - 1)^2), kept in the graph (create_graph) so that the
    discriminator's update differentiates through it."""
    grad, = torch.autograd.grad(score_hat.sum(), x_hat, create_graph=True)
    return lambda_gp * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def discriminator_loss(disc, real, real_labels, fake, fake_labels, alpha, lambda_gp):
    """mean(fc1(fake)) - mean(fc1(real)) + CE(fc10(real)) + CE(fc10(fake)) + GP, and the monitored values.
    Real, fake and interpolated images go through the net as one batch: LayerNorm keeps samples independent,
    so this is the same as three calls, and under DDP it is one forward before one backward."""
    n = len(real)
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    scores, logits = (t.float() for t in disc(torch.cat([real, fake, x_hat])))
    real_score, fake_score, hat_score = scores[:n].mean(), scores[n:2 * n].mean(), scores[2 * n:]
    real_ce = F.cross_entropy(logits[:n], real_labels)
    fake_ce = F.cross_entropy(logits[n:2 * n], fake_labels)
    gp = gradient_penalty(hat_score, x_hat, lambda_gp)
    loss = fake_score - real_score + real_ce + fake_ce + gp
    real_acc = (logits[:n].argmax(1) == real_labels).float().mean()
    return loss, torch.stack([gp, fake_score, real_score, real_ce, fake_ce, real_acc]).detach()


def generator_loss(disc, fake, labels):
    """-mean(fc1(G(z))) + CE(fc10(G(z)), label)."""
    scores, logits = (t.float() for t in disc(fake))
    return -scores.mean() + F.cross_entropy(logits, labels)


def generator_step(gen_net, disc, opt_g, n, rng, bf16=False):
    """One generator update on fresh noise with random labels. The discriminator (the plain module, not its
    DDP wrapper) is frozen: its parameters get no gradient and stay as they are. bf16: autocast the
    discriminator to bf16 (the generator stays fp32: its gradient has come back through both nets)."""
    labels = torch.randint(0, NUM_CLASSES, (n,), device=rng.device, generator=rng)
    disc.requires_grad_(False)
    fake = gen_net(class_noise(labels, rng))
    with autocast(rng.device, bf16):
        loss = generator_loss(disc, fake, labels)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    disc.requires_grad_(True)
    return loss.detach()


def discriminator_step(disc_net, gen_net, opt_d, real, real_labels, rng, lambda_gp, bf16=False):
    """One discriminator update against a fresh fake batch (made without gradients, so G is untouched).
    bf16: autocast the discriminator to bf16."""
    n = len(real)
    fake_labels = torch.randint(0, NUM_CLASSES, (n,), device=rng.device, generator=rng)
    with torch.no_grad():
        fake = gen_net(class_noise(fake_labels, rng))
    alpha = torch.rand(n, device=rng.device, generator=rng)
    with autocast(rng.device, bf16):
        loss, monitored = discriminator_loss(disc_net, real, real_labels, fake, fake_labels, alpha, lambda_gp)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss.detach(), monitored


def fixed_noise(seed):
    """100 noise vectors, 10 per class, the class changing fastest: in a 10-wide grid each column is a class."""
    labels = torch.arange(NUM_CLASSES).repeat(10)
    return class_noise(labels, torch.Generator().manual_seed(seed))


@torch.no_grad()
def save_samples(gen, noise, path):
    gen.eval()
    save_grid(to_unit(gen(noise)), path, nrow=NUM_CLASSES, column_labels=CLASSES)
    gen.train()


def distribute(gen, disc, rt):
    """(gen_net, disc_net): the nets wrapped in DistributedDataParallel under torchrun, else the nets.
    The generator's batch statistics cover the global batch on GPUs (SyncBatchNorm), as one process would
    see them; gloo (CPU) has no SyncBatchNorm, so there each process normalizes over its own share."""
    if rt.world_size == 1:
        return gen, disc
    if rt.device.type == "cuda":
        gen = nn.SyncBatchNorm.convert_sync_batchnorm(gen)
    # fc1's (1, width) weight gradient from the double backward has strides (1, 1), not (width, 1): the
    # same layout for a single row, which DDP copies correctly, but it warns about it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(gen), DistributedDataParallel(disc)


def train(args):
    rt = Runtime(args.device)
    if rt.main:
        prepare_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "gan.ckpt")
    config = {k: getattr(args, k) for k in ("width", "batch_size", "lr", "seed", "gen_train", "lambda_gp",
                                            "limit_train")}
    ckpt = load_checkpoint(ckpt_path, "gan", config, args.resume)
    if ckpt is not None and ckpt["epoch"] >= args.epochs:
        if rt.main:
            print(f"{ckpt_path}: {ckpt['epoch']} epochs are done (asked for {args.epochs}); nothing to resume")
        return

    torch.manual_seed(args.seed)
    gen, disc = Generator(args.width).to(rt.device), Discriminator(args.width).to(rt.device)
    bf16 = setup_speed(rt.device, args.precision)
    opt_g = adam(gen.parameters(), args.lr, (0.0, 0.9), rt.device)
    opt_d = adam(disc.parameters(), args.lr, (0.0, 0.9), rt.device)
    noise = fixed_noise(args.seed)
    start_epoch, start_batch, partial = 0, 0, [0.0] * (len(MONITORED) + 1)
    if ckpt is not None:
        restore_model(gen, ckpt["generator"], ckpt_path)
        restore_model(disc, ckpt["discriminator"], ckpt_path)
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        noise, start_epoch, start_batch, partial = ckpt["fixed_noise"], ckpt["epoch"], ckpt["batch"], ckpt["partial"]
        if rt.main:
            print(f"resuming {ckpt_path} at epoch {start_epoch + 1}, batch {start_batch}")
    noise = noise.to(rt.device)
    gen_net, disc_net = distribute(gen, disc, rt)

    train_loader, test_loader = training_loaders(args, rt)
    metrics_path = os.path.join(args.out_dir, "gan_metrics.jsonl")
    stop = StopSignal()

    def checkpoint(epoch, batch, partial):
        if rt.main:
            atomic_save({"job": "gan", "config": config, "epoch": epoch, "batch": batch, "partial": partial,
                         "generator": model_record(gen), "discriminator": model_record(disc),
                         "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "fixed_noise": noise.cpu()},
                         ckpt_path)

    def check_finite(first_bad, epoch):
        bad = int(first_bad.item())
        if bad >= 0:
            raise UserError(f"a loss became NaN or infinite in epoch {epoch + 1}, batch {bad + 1}; the last good "
                            f"checkpoint {ckpt_path} is kept; lower --lr or raise --lambda-gp and --resume")

    if rt.main:
        print(f"{'epoch':>5} {'test acc':>8} {'real acc':>8} {'gp':>7} {'fake':>8} {'real':>8} {'seconds':>7} "
              f"{'img/s':>6}")
    for epoch in range(start_epoch, args.epochs):
        # Sums of the monitored values over this epoch, then the batch count, kept on the device.
        sums = torch.tensor(partial, device=rt.device)
        window_start = sums.clone()
        first_bad = torch.tensor(-1, device=rt.device)
        start = time.perf_counter()
        bar = progress_bar(train_loader.batches(epoch, start_batch), len(train_loader) - start_batch,
                           f"epoch {epoch + 1}/{args.epochs}", rt.main)
        for b, images, labels in bar:
            rng = rt.rng(args.seed, epoch, b)
            real = augment(images, rng)
            losses = []
            if b % args.gen_train == 0:
                losses.append(generator_step(gen_net, disc, opt_g, len(real), rng, bf16))
            d_loss, monitored = discriminator_step(disc_net, gen_net, opt_d, real, labels, rng, args.lambda_gp, bf16)
            losses.append(d_loss)
            finite = torch.isfinite(torch.stack(losses)).all()
            first_bad = torch.where((first_bad < 0) & ~finite, b, first_bad)
            sums += torch.cat([monitored, monitored.new_ones(1)])
            if (b + 1) % LOG_EVERY == 0:
                check_finite(first_bad, epoch)
                window = sums - window_start
                means = dict(zip(MONITORED, (window[:-1] / window[-1]).tolist()))
                window_start = sums.clone()
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
                if rt.main:
                    append_metrics(metrics_path, {"type": "monitor", "epoch": epoch + 1, "batch": b + 1, **means})
            if rt.stop_requested(stop, b):
                check_finite(first_bad, epoch)
                checkpoint(epoch, b + 1, sums.tolist())
                if rt.main:
                    print(f"stopped by {stop.received or 'a signal'} in epoch {epoch + 1} after batch {b + 1}; "
                          f"{ckpt_path} is saved; run the same command with --resume to continue")
                raise SystemExit(75)  # EX_TEMPFAIL: the job scripts resubmit on it
        bar.close()
        check_finite(first_bad, epoch)
        seconds = time.perf_counter() - start
        total = sums.tolist()
        batches_run = total[-1] - partial[-1]
        images_per_s = batches_run * train_loader.batch_size / seconds
        test_acc = test_loader.accuracy(disc.eval())
        disc.train()
        start_batch, partial = 0, [0.0] * (len(MONITORED) + 1)
        if rt.main:
            save_samples(gen, noise, os.path.join(args.out_dir, "output", f"{epoch:03d}.png"))
            save_model(gen, os.path.join(args.out_dir, "generator.model"))
            save_model(disc, os.path.join(args.out_dir, "discriminator.model"))
        checkpoint(epoch + 1, 0, partial)
        if rt.main:
            means = dict(zip(MONITORED, (t / total[-1] for t in total[:-1])))
            append_metrics(metrics_path, {"type": "epoch", "epoch": epoch + 1, "test_acc": test_acc, "seconds": seconds,
                                          "images_per_s": images_per_s, **means})
            print(f"{epoch + 1:5d} {test_acc:8.4f} {means['real_acc']:8.4f} {means['gp']:7.3f} "
                  f"{means['fake_score']:8.3f} {means['real_score']:8.3f} {seconds:7.1f} {images_per_s:6.0f}")
    if rt.main:
        print(f"saved {os.path.join(args.out_dir, 'generator.model')} and discriminator.model; "
              f"grids in {os.path.join(args.out_dir, 'output')}")


def main(argv=None):
    run_main(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
