"""Train the discriminator alone as a CIFAR-10 classifier (fc10 head, cross entropy): the baseline.

    python train_baseline.py --data-dir data                       # one GPU, or the CPU
    python train_baseline.py --data-dir data --resume              # continue after a stop, a kill or walltime
    torchrun --standalone --nproc_per_node=4 train_baseline.py --data-dir data    # 4 GPUs, one node

The assignment's recipe is the default: 100 epochs, batch 128, Adam lr 1e-4, lr / 10 at half the epochs and
/ 100 at three quarters (epochs 50 and 75). Writes to --out-dir: cifar10.model (the trained net),
baseline.ckpt (resumable, every epoch and on a stop signal) and baseline_metrics.jsonl (one line per epoch).
The update is training/baseline_step.py's.
"""
import argparse
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from metrics.accuracy import loader_accuracy
from models import Discriminator
from torch_utils.cli import run_main
from torch_utils.runtime import GraphedStep, Runtime, Speed, StopSignal, setup_speed
from training.baseline_step import freeze_critic_head, train_step
from training.checkpoint import model_record, restore_model, save_model
from training.data import augment, training_loaders
from training.flags import ResumeRules, add_data_args, add_recipe_args, parse_trainer_args
from training.optim import adam, load_optimizer, set_lr
from training.progress import Table, duration
from training.run import Run
from training.running_means import Meter


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_recipe_args(parser, epochs=100, lr=1e-4, betas=(0.9, 0.999),
                    epochs_note="the lr drops to 1/10 at half of them and to 1/100 at three quarters")
    return parse_trainer_args(parser, parse_args, argv)


# What --resume may change: --lr (the schedule then scales from the new value) and where and how it runs; every
# other flag is checked against the checkpoint. Not --epochs: the lr drops are placed by it, so a resumed run with
# another --epochs would follow another schedule.
RESUME = ResumeRules(tunable={"lr"})
# The per-epoch console table, of the epoch record
TABLE = Table(("epoch", "epoch", "5d"), ("lr", "lr", "8.1e"), ("loss", "train_loss", "7.4f"),
              ("train acc", "train_acc", "9.4f"), ("test acc", "test_acc", "8.4f"), ("seconds", "seconds", "7.1f"),
              ("img/s", "images_per_s", "7.0f"), ("eta", lambda record: duration(record["eta_s"]), ">7"))


def lr_at(epoch, args):
    """The assignment's step schedule, scaled to --epochs: lr, lr/10 from epoch 50 of 100, lr/100 from 75."""
    return args.lr * (0.01 if epoch >= 0.75 * args.epochs else 0.1 if epoch >= 0.5 * args.epochs else 1.0)


def train(args, stop):
    # Processes, the output folder (locked for this run) and the checkpoint to resume from, if any
    rt = Runtime(args.device)
    with Run("baseline", "train_baseline.py", args, rt, stop, RESUME, models={"cifar10.model": "model"}) as run:
        if run.finished(args.epochs):
            return

        # The model and its optimizer, fresh or as the checkpoint left them
        torch.manual_seed(args.seed)
        model = Discriminator(args.width, args.arch).to(rt.device)
        freeze_critic_head(model)
        bf16 = setup_speed(rt.device, args.precision)
        speed = Speed.choose(args.speed, rt.device, rt.world_size)
        speed.prepare(model)
        optimizer = adam((p for p in model.parameters() if p.requires_grad), args.lr, args.betas, rt.device,
                         capturable=speed.cuda_graphs)
        meter = Meter(rt.device)  # loss and accuracy over the epoch's training batches
        if run.checkpoint is not None:
            ckpt = run.checkpoint
            restore_model(model, ckpt["model"], run.ckpt_path)
            load_optimizer(optimizer, ckpt["optimizer"], rt.device)
            meter.load_state(ckpt["meter"])
        # The DistributedDataParallel wrapper under torchrun (it averages the gradients), else the model itself
        model_ddp = DistributedDataParallel(model) if rt.world_size > 1 else model

        def state(epoch, batch):
            """What the checkpoint holds after `batch` batches of epoch `epoch` (0-based)."""
            return {"epoch": epoch, "batch": batch, "meter": meter.state(), "model": model_record(model),
                    "optimizer": optimizer.state_dict()}

        train_loader, test_loader = training_loaders(args, rt)

        def eager_step(x, labels):
            return train_step(model_ddp, optimizer, x, labels, bf16)

        step = GraphedStep(eager_step) if speed.cuda_graphs else eager_step
        for epoch, batches in run.epochs(train_loader, TABLE):
            set_lr(optimizer, lr_at(epoch, args))

            # Training batches, stopping cleanly on a signal
            for b, images, labels in batches:
                x = augment(images, rt.rng(args.seed, epoch, b))
                loss, acc = step(x=x, labels=labels)
                meter.add(len(labels), loss=loss, acc=acc)
                if run.should_stop(meter, epoch, b, len(train_loader)):
                    run.save_and_stop(state(epoch, b + 1))
                run.log_window(meter, epoch, b)
            seconds, images_per_s = run.epoch_speed()

            # Evaluate, log, save (the log line first: a resumed run drops lines its checkpoint has not reached)
            train_means = meter.means()
            record = {"type": "epoch", "epoch": epoch + 1, "lr": lr_at(epoch, args), "train_loss": train_means["loss"],
                      "train_acc": train_means["acc"], "test_acc": loader_accuracy(model, test_loader),
                      "seconds": seconds, "images_per_s": images_per_s,
                      **run.pace(epoch, args.epochs, len(train_loader))}
            run.log(record)
            meter.reset()
            run.end_epoch(record, state(epoch + 1, 0), args.epochs)

        if rt.is_rank0:
            save_model(model, os.path.join(args.out_dir, "cifar10.model"))
        run.print(f"saved {os.path.join(args.out_dir, 'cifar10.model')}")


def main(argv=None):
    with StopSignal() as stop:  # first thing: a signal during start-up is a request to stop, too
        run_main(lambda: train(parse_args(argv), stop))


if __name__ == "__main__":
    main()
