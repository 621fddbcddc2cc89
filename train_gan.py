"""Train the generator and the discriminator together: a WGAN-GP critic (fc1) with an ACGAN auxiliary
classifier (fc10), the generator conditioned on the class through its noise.

    python train_gan.py --data-dir data                        # one GPU, or the CPU
    python train_gan.py --data-dir data --resume               # continue after a stop, a kill or walltime
    python train_gan.py --data-dir data --resume --epochs 500  # train a finished run further
    python train_gan.py --data-dir data --speed plain          # PyTorch's own kernels (default on one GPU: fast)
    torchrun --standalone --nproc_per_node=4 train_gan.py --data-dir data    # 4 GPUs, one node

The assignment's recipe is the default: 200 epochs, batch 128, Adam lr 1e-4 betas (0, 0.9) for both nets,
gradient penalty 10, the generator trained every iteration. Writes to --out-dir: output/NNN.png (a 10x10 grid
of one fixed noise batch after epoch NNN + 1, one class per column), generator.model and discriminator.model
(every epoch), gan.ckpt (resumable, every epoch and on a stop signal) and gan_metrics.jsonl. The losses and
updates are training/gan_steps.py's.
"""
import argparse
import os
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from metrics.accuracy import loader_accuracy
from models import MINIBATCH_DIMS, MINIBATCH_KERNELS, NUM_CLASSES, Discriminator, Generator, class_noise
from torch_utils.cli import UserError, check_range, run_main
from torch_utils.files import image_bytes, torch_bytes
from torch_utils.images import epoch_grid_name, grid_image, to_unit
from torch_utils.ops.global_batch_norm import global_batch_norm
from torch_utils.runtime import Runtime, Speed, StopSignal, setup_speed
from training import health
from training.checkpoint import model_record, restore_model
from training.data import CLASSES, augment, training_loaders
from training.flags import ResumeRules, add_data_args, add_recipe_args, parse_trainer_args
from training.gan_steps import MONITORED, Nets, Recipe, penalty_factor, training_steps
from training.optim import adam, load_optimizer
from training.progress import Table, duration
from training.run import Run
from training.running_means import Meter
from training.scalars import GAN_LAYOUT


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    # WGAN-GP's Adam betas (0, 0.9), for both nets
    add_recipe_args(parser, epochs=200, lr=1e-4, betas=(0.0, 0.9),
                    epochs_note="a finished run resumed with more trains further")
    g = parser.add_argument_group("GAN")
    g.add_argument("--n-critic", "--gen-train", type=int, default=1, dest="n_critic", metavar="N",
                   help="train the generator every N-th iteration, the discriminator every iteration; "
                        "--gen-train is the assignment's name for it (default: 1)")
    g.add_argument("--lambda-gp", type=float, default=10.0, help="weight of the gradient penalty (default: 10)")
    g.add_argument("--gp-every", type=int, default=1, metavar="K",
                   help="beyond the assignment, a lazy penalty as StyleGAN2 takes R1: the gradient penalty on every "
                        "K-th discriminator step only, weighted K times, the same penalty on average at about a third "
                        "of the cost on the other steps; changes the recipe, the gp and grad_norm monitors then "
                        "average the penalty's steps (default: 1, every step, as the assignment)")
    g = parser.add_argument_group("beyond the assignment (Salimans et al. 2016, Improved Techniques for Training GANs)")
    g.add_argument("--feature-matching", type=float, default=0.0, metavar="W",
                   help="add W times the squared distance between the mean discriminator features of a real batch "
                        "(freshly augmented) and of the fake batch to the generator's loss; the features matched are "
                        "the last conv block's, max-pooled: the heads' input (without minibatch features) "
                        "(default: 0, off)")
    g.add_argument("--minibatch-discrimination", action="store_true",
                   help=f"a minibatch-discrimination layer ({MINIBATCH_KERNELS} kernels of {MINIBATCH_DIMS} dims) on "
                        "the discriminator's pooled features, before the heads; real, fake and interpolated images "
                        "are each compared only among themselves, within each process's share (default: off)")
    g = parser.add_argument_group("measuring the generator during training (evaluate.py)")
    g.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="every K epochs (and after the last) write the generator's Inception Score, FID and KID, "
                        "and with --eval-classifier its class accuracy and collapse check, to gan_metrics.jsonl "
                        "(default: 0, never)")
    g.add_argument("--eval-n", type=int, default=5000, metavar="N",
                   help="samples per measurement, from fixed noise so that epochs compare (default: 5000)")
    g.add_argument("--eval-classifier", metavar="PATH",
                   help="a CIFAR-10 classifier (cifar10.model from train_baseline.py) for the class accuracy, "
                        "the Frechet distance in its features and the collapse check")
    g.add_argument("--inception-weights", metavar="PATH",
                   help="InceptionV3's weights for IS/FID/KID on a node without internet (see evaluate.py)")
    args = parse_trainer_args(parser, parse_args, argv)
    check_range(args, "n_critic", 1, 1000)
    check_range(args, "lambda_gp", 0, 1e6)
    check_range(args, "gp_every", 1, 1000)
    check_range(args, "feature_matching", 0, 1e6)
    check_range(args, "eval_every", 0, 1_000_000)
    check_range(args, "eval_n", 20, 1_000_000)
    return args


# The per-epoch console table, of the epoch record
TABLE = Table(("epoch", "epoch", "5d"), ("test acc", "test_acc", "8.4f"),
              *((m.column, m.key, m.format) for m in MONITORED if m.column),
              ("seconds", "seconds", "7.1f"), ("img/s", "images_per_s", "6.0f"),
              ("eta", lambda record: duration(record["eta_s"]), ">7"))
# What --resume may change; every other flag is checked against the checkpoint. The losses' weights and the
# critic's pace are tunable as --lr is (what the warnings advise), and the run records each change. --epochs may
# grow: nothing in the GAN's schedule depends on it; measuring does not change the training.
RESUME = ResumeRules(tunable={"lr", "lambda_gp", "n_critic", "feature_matching"},
                     free={"epochs", "eval_every", "eval_n", "eval_classifier", "inception_weights"})


def fixed_noise(seed):
    """100 noise vectors, 10 per class, the class changing fastest: in a 10-wide grid each column is a class."""
    labels = torch.arange(NUM_CLASSES).repeat(10)
    return class_noise(labels, torch.Generator().manual_seed(seed))


@torch.no_grad()
def fixed_samples(gen, noise):
    """The fixed noise through the generator, in eval mode."""
    gen.eval()
    samples = gen(noise)
    gen.train()
    return samples


def samples_png(samples):
    """The grid of the fixed noise's samples, one class per column, as PNG bytes."""
    return image_bytes(grid_image(to_unit(samples), nrow=NUM_CLASSES, column_labels=CLASSES), "PNG")


def epoch_outputs(gen, disc, grid, out_dir, epoch):
    """(path, bytes) of what an epoch writes beside the checkpoint: its grid (PNG bytes) and both model files."""
    return [(os.path.join(out_dir, "output", epoch_grid_name(epoch)), grid),
            (os.path.join(out_dir, "generator.model"), torch_bytes(model_record(gen))),
            (os.path.join(out_dir, "discriminator.model"), torch_bytes(model_record(disc)))]


def distribute(gen, disc, rt):
    """(gen_ddp, disc_ddp): the nets' DistributedDataParallel wrappers under torchrun, else the nets. The
    generator's batch statistics cover the global batch (torch_utils.ops.global_batch_norm, NCCL and gloo alike), as one
    process would see them; its running statistics are then the same on every process, so DDP does not
    broadcast them before each forward."""
    if rt.world_size == 1:
        return gen, disc
    global_batch_norm(gen)
    # fc1's (1, width) weight gradient from the double backward has strides (1, 1), not (width, 1): the
    # same layout for a single row, which DDP copies correctly, but it warns about it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(gen, forward_sync_buffers=False), DistributedDataParallel(disc)


def make_evaluator(args, rt):
    """evaluate.py's measures with their fixed parts (noise, the real images' features) prepared once."""
    from metrics.measures import build_evaluator  # torch-fidelity takes a second to import: only when measuring

    return build_evaluator(args.data_dir, rt.device, args.eval_n, args.seed, args.eval_classifier,
                           args.inception_weights)


def check_batch(args, rt):
    """The generator's batch norm needs two images per process."""
    per_process = min(args.batch_size, args.limit_train or args.batch_size) // rt.world_size
    if per_process < 2:
        raise UserError(f"--batch-size {args.batch_size} gives {per_process} image(s) per process; the "
                        f"generator's batch norm needs at least 2: use --batch-size {2 * rt.world_size} or more")


def train(args, stop):
    # Processes, the output folder (locked for this run) and the checkpoint to resume from, if any
    rt = Runtime(args.device)
    check_batch(args, rt)
    with Run("gan", "train_gan.py", args, rt, stop, RESUME, GAN_LAYOUT,
             models={"generator.model": "generator", "discriminator.model": "discriminator"},
             folders=["output"]) as run:
        if run.finished(args.epochs):
            return

        # The nets, their optimizers and the fixed noise of the grids, fresh or as the checkpoint left them
        torch.manual_seed(args.seed)
        gen = Generator(args.width).to(rt.device)
        disc = Discriminator(args.width, args.arch,
                             minibatch_kernels=MINIBATCH_KERNELS if args.minibatch_discrimination else 0).to(rt.device)
        bf16 = setup_speed(rt.device, args.precision)
        speed = Speed.choose(args.speed, rt.device, rt.world_size)
        speed.prepare(gen, disc)
        opt_g = adam(gen.parameters(), args.lr, args.betas, rt.device, capturable=speed.cuda_graphs)
        opt_d = adam(disc.parameters(), args.lr, args.betas, rt.device, capturable=speed.cuda_graphs)
        noise = fixed_noise(args.seed)
        meter = Meter(rt.device)  # the monitored values and the generator's loss, over the epoch and per window
        if run.checkpoint is not None:
            ckpt = run.checkpoint
            restore_model(gen, ckpt["generator"], run.ckpt_path)
            restore_model(disc, ckpt["discriminator"], run.ckpt_path)
            load_optimizer(opt_g, ckpt["opt_g"], rt.device)
            load_optimizer(opt_d, ckpt["opt_d"], rt.device)
            meter.load_state(ckpt["meter"])
            noise = ckpt["fixed_noise"]
        noise = noise.to(rt.device)
        gen_ddp, disc_ddp = distribute(gen, disc, rt)
        generator, discriminator = training_steps(Nets(gen_ddp, disc_ddp, gen, disc, opt_g, opt_d),
                                                  Recipe.from_args(args, bf16=bf16), speed.cuda_graphs)
        if args.speed == "fast" and rt.world_size > 1:
            run.print("note: under torchrun --speed fast runs without CUDA graphs and Triton kernels (DDP's hooks run "
                      "between the kernels): channels_last and the penalty's convolutions only")

        def state(epoch, batch):
            """What the checkpoint holds after `batch` batches of epoch `epoch` (0-based)."""
            return {"epoch": epoch, "batch": batch, "meter": meter.state(), "generator": model_record(gen),
                    "discriminator": model_record(disc), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                    "fixed_noise": noise.cpu()}

        # With minibatch discrimination a sample's output depends on its group: test in groups of the training size
        test_batch = args.batch_size // rt.world_size if args.minibatch_discrimination else 500
        train_loader, test_loader = training_loaders(args, rt, test_batch)
        evaluator = rt.rank0_first(lambda: make_evaluator(args, rt), others_too=False) if args.eval_every else None
        if evaluator is not None and evaluator.inception_note:
            run.print(f"note: {evaluator.inception_note}")
        for epoch, batches in run.epochs(train_loader, TABLE):
            # Training batches: a generator step every --n-critic iterations, a discriminator step every one
            for b, images, labels in batches:
                rng = rt.rng(args.seed, epoch, b)
                real = augment(images, rng)
                if b % args.n_critic == 0:
                    fm_real = augment(images, rng) if args.feature_matching else None
                    meter.add(**generator(len(real), rng, fm_real))
                meter.add(**discriminator(real, labels, rng, penalty_factor(b, args.gp_every)))
                if run.should_stop(meter, epoch, b, len(train_loader)):
                    run.save_and_stop(state(epoch, b + 1))
                run.log_window(meter, epoch, b)
            seconds, images_per_s = run.epoch_speed()

            # Evaluate and log, then write the grid, the models and the checkpoint together (a resumed run drops
            # log lines its checkpoint has not reached)
            means = meter.means()
            samples = fixed_samples(gen, noise)  # the epoch's grid; how much each class's samples vary
            record = {"type": "epoch", "epoch": epoch + 1, "test_acc": loader_accuracy(disc, test_loader),
                      "seconds": seconds, "images_per_s": images_per_s,
                      **run.pace(epoch, args.epochs, len(train_loader)), "lr": args.lr, "lambda_gp": args.lambda_gp,
                      **means,
                      "noise_spread_per_class": health.noise_spread(samples, noise[:, :NUM_CLASSES].argmax(1))}
            run.log(record)
            if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                # rank 0 measures; the others wait for it outside a collective, which could time out
                rt.rank0_first(lambda: run.log({"type": "eval", "epoch": epoch + 1, **evaluator(gen)}),
                               others_too=False)
            meter.reset()
            grid = samples_png(samples)
            run.image("samples", grid, epoch + 1)
            run.end_epoch(record, state(epoch + 1, 0), args.epochs,
                          also=lambda: epoch_outputs(gen, disc, grid, args.out_dir, epoch))

        run.print(f"saved {os.path.join(args.out_dir, 'generator.model')} and discriminator.model; "
                  f"grids in {os.path.join(args.out_dir, 'output')}")


def main(argv=None):
    with StopSignal() as stop:  # first thing: a signal during start-up is a request to stop, too
        run_main(lambda: train(parse_args(argv), stop))


if __name__ == "__main__":
    main()
