"""Train the discriminator alone as a CIFAR-10 classifier (fc10 head, cross entropy): the baseline.

    python train_baseline.py --data-dir data                       # one GPU, or the CPU
    python train_baseline.py --data-dir data --resume              # continue after a kill or walltime
    torchrun --standalone --nproc_per_node=4 train_baseline.py --data-dir data    # 4 GPUs, one node

Spec defaults: 100 epochs, batch 128, Adam lr 1e-4, lr / 10 at half the epochs and / 100 at three
quarters (epochs 50 and 75). Writes to --out-dir: cifar10.model (the trained net), baseline.ckpt
(resumable, every epoch) and baseline_metrics.jsonl (one line per epoch).
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from checkpoint import atomic_save, load_checkpoint, model_record, restore_model, save_model
from data import augment, training_loaders
from models import Discriminator
from runtime import (Runtime, StopSignal, UserError, adam, add_common_args, append_metrics, autocast,
                     check_common_args, prepare_out_dir, progress_bar, run_main, setup_speed)

LOG_EVERY = 50  # batches between host syncs: progress-bar values and the non-finite loss check


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=100, lr=1e-4)
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def lr_at(epoch, args):
    """The spec's step schedule, scaled to --epochs: lr, lr/10 from epoch 50 of 100, lr/100 from 75."""
    return args.lr * (0.01 if epoch >= 0.75 * args.epochs else 0.1 if epoch >= 0.5 * args.epochs else 1.0)


def distribute(model, rt):
    """The model wrapped in DistributedDataParallel under torchrun, else the model. The critic head fc1 is
    frozen: classification never uses it, and DDP needs every trainable parameter to get a gradient."""
    model.fc1.requires_grad_(False)
    return DistributedDataParallel(model) if rt.world_size > 1 else model


def train_step(net, optimizer, x, labels, bf16=False):
    """One Adam step on cross entropy of fc10; returns (loss, number correct) as device tensors.
    bf16: autocast the forward pass to bf16."""
    with autocast(x.device, bf16):
        logits = net(x)[1].float()
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


def train(args):
    rt = Runtime(args.device)
    if rt.main:
        prepare_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "baseline.ckpt")
    config = {k: getattr(args, k) for k in ("width", "epochs", "batch_size", "lr", "seed", "limit_train")}
    ckpt = load_checkpoint(ckpt_path, "baseline", config, args.resume)
    if ckpt is not None and ckpt["epoch"] >= args.epochs:
        if rt.main:
            print(f"{ckpt_path}: all {args.epochs} epochs are done; nothing to resume")
        return

    torch.manual_seed(args.seed)
    model = Discriminator(args.width).to(rt.device)
    bf16 = setup_speed(rt.device, args.precision)
    optimizer = adam(model.parameters(), args.lr, (0.9, 0.999), rt.device)
    start_epoch, start_batch, partial = 0, 0, [0.0, 0.0, 0]
    if ckpt is not None:
        restore_model(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_batch, partial = ckpt["epoch"], ckpt["batch"], ckpt["partial"]
        if rt.main:
            print(f"resuming {ckpt_path} at epoch {start_epoch + 1}, batch {start_batch}")
    net = distribute(model, rt)

    train_loader, test_loader = training_loaders(args, rt)
    metrics_path = os.path.join(args.out_dir, "baseline_metrics.jsonl")
    stop = StopSignal()

    def require_finite(mean_loss, epoch, batch):
        if not math.isfinite(mean_loss):
            raise UserError(f"the loss became {mean_loss} in epoch {epoch + 1} by batch {batch}; the last good "
                            f"checkpoint {ckpt_path} is kept; lower --lr and resume")

    def checkpoint(epoch, batch, partial):
        if rt.main:
            atomic_save({"job": "baseline", "config": config, "epoch": epoch, "batch": batch, "partial": partial,
                         "model": model_record(model), "optimizer": optimizer.state_dict()}, ckpt_path)

    if rt.main:
        print(f"{'epoch':>5} {'lr':>8} {'loss':>7} {'train acc':>9} {'test acc':>8} {'seconds':>7} {'img/s':>7}")
    for epoch in range(start_epoch, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        model.train()
        loss_sum = torch.tensor(partial[0], device=rt.device)
        correct = torch.tensor(partial[1], device=rt.device)
        seen = partial[2]
        start = time.perf_counter()
        bar = progress_bar(train_loader.batches(epoch, start_batch), len(train_loader) - start_batch,
                           f"epoch {epoch + 1}/{args.epochs}", rt.main)
        for b, images, labels in bar:
            x = augment(images, rt.rng(args.seed, epoch, b))
            loss, batch_correct = train_step(net, optimizer, x, labels, bf16)
            loss_sum += loss * len(labels)
            correct += batch_correct
            seen += len(labels)
            if (b + 1) % LOG_EVERY == 0:
                mean_loss = loss_sum.item() / seen
                require_finite(mean_loss, epoch, b + 1)
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}")
            if rt.stop_requested(stop, b):
                require_finite(loss_sum.item(), epoch, b + 1)  # never save a model a NaN has reached
                checkpoint(epoch, b + 1, [loss_sum.item(), correct.item(), seen])
                if rt.main:
                    print(f"stopped by {stop.received or 'a signal'} in epoch {epoch + 1} after batch {b + 1}; "
                          f"{ckpt_path} is saved; run the same command with --resume to continue")
                raise SystemExit(75)  # EX_TEMPFAIL: the job scripts resubmit on it
        bar.close()
        seconds = time.perf_counter() - start
        # The processes' shares of an epoch are equal, so the world's image count is seen * world_size.
        images_per_s = (seen - partial[2]) * rt.world_size / seconds
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        require_finite(train_loss, epoch, len(train_loader))
        test_acc = test_loader.accuracy(model.eval())
        start_batch, partial = 0, [0.0, 0.0, 0]
        checkpoint(epoch + 1, 0, partial)
        if rt.main:
            record = {"epoch": epoch + 1, "lr": lr_at(epoch, args), "train_loss": train_loss, "train_acc": train_acc,
                      "test_acc": test_acc, "seconds": seconds, "images_per_s": images_per_s}
            append_metrics(metrics_path, record)
            print(f"{epoch + 1:5d} {record['lr']:8.1e} {train_loss:7.4f} {train_acc:9.4f} {test_acc:8.4f} "
                  f"{seconds:7.1f} {images_per_s:7.0f}")
    if rt.main:
        save_model(model, os.path.join(args.out_dir, "cifar10.model"))
        print(f"saved {os.path.join(args.out_dir, 'cifar10.model')}")


def main(argv=None):
    run_main(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
