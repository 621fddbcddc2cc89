"""Look inside trained discriminators: adversarial perturbation, and images that maximize a class or a feature.

    python visualize.py all --model cifar10.model --model discriminator.model --data-dir data
    python visualize.py perturb --model cifar10.model --gain 10
    python visualize.py perturb --model cifar10.model --start noise
    python visualize.py max-class --model discriminator.model --iterations 500 --start noise
    python visualize.py max-features --model discriminator.model --layers 2 8
    python visualize.py all --model a/discriminator.model --name gan_a --model b/discriminator.model --name gan_b

Each model is named by its file stem (cifar10, discriminator) or by --name, given once per --model, in order.
Writes to <out-dir>/<name>/:
    real_images.png, gradient_image.png, jittered_images.png    perturb: a batch of test images, the gradient of
                                                                the cross entropy towards label+1 (min-max scaled
                                                                to [0, 1] over the whole batch, or per image with
                                                                --gradient-scale image), and the batch moved
                                                                `gain` intensity levels against it
    noise_images.png, noise_gradient_image.png,                 perturb --start noise (and `all`): the same for
    noise_jittered_images.png                                   noise images, labelled as the model classifies them
    max_class.png                                               max-class: one image per class, in columns
    max_features_layer<K>.png                                   max-features: one image per feature of layer K
    results.json                                                the numbers and settings (merged into an existing
                                                                file)
A model with minibatch discrimination sees each batch it is given as one group.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from metrics.accuracy import accuracy
from models import NUM_CLASSES
from torch_utils.cli import UserError, check_range, run_main
from torch_utils.files import atomic_write, output_folder
from torch_utils.images import MAX_CLASS_FILE, RESULTS_FILE, max_features_file, perturb_files, save_grid, to_unit
from torch_utils.runtime import DEVICE_HELP, Runtime, progress_bar
from training.checkpoint import load_model
from training.data import CLASSES, load_split, to_float

LEVEL = 2 / 255  # one 8-bit intensity level on the [-1, 1] scale: the perturbation's unit step
MAX_FEATURES = 100  # images shown per layer: features 0..99 (all of them when the layer is narrower)
PER_ROW = 10
TECHNIQUES = ("perturb", "max-class", "max-features")


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("models, data and files")
    g.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="a discriminator file: cifar10.model (baseline) or discriminator.model (GAN); repeat the "
                        "flag for several models")
    g.add_argument("--name", action="append", metavar="NAME",
                   help="output folder name of each --model, given once per model in the same order "
                        "(default: the file stem)")
    g.add_argument("--data-dir", default="data", metavar="DIR",
                   help="CIFAR-10 as the trainers read it: train/<class>/ and test/<class>/ image folders, or "
                        "cifar-10-batches-py/ (default: data)")
    g.add_argument("--out-dir", default="visualization", metavar="DIR",
                   help="outputs go to <out-dir>/<name>/ (default: visualization)")
    g.add_argument("--batch-size", type=int, default=100, metavar="N",
                   help="N test images (a fixed subset spread over the classes): the perturbed batch, and "
                        "the mean image that class and feature maximization start from (default: 100)")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)

    perturb = argparse.ArgumentParser(add_help=False)
    g = perturb.add_argument_group("perturbation")
    g.add_argument("--gain", type=float, default=8, metavar="LEVELS",
                   help="intensity levels (of 255) each pixel moves against the gradient (default: 8; the "
                        "assignment used 8 to 10)")
    g.add_argument("--gradient-scale", choices=("batch", "image"), default="batch",
                   help="how gradient_image.png maps the gradient to [0, 1]: one min-max over the whole batch, as "
                        "the assignment does, or a min-max per image, which shows every image's pattern (default: "
                        "batch)")

    ascent = argparse.ArgumentParser(add_help=False)
    g = ascent.add_argument_group("class and feature maximization")
    g.add_argument("--iterations", type=int, default=200, metavar="N", help="gradient ascent steps (default: 200)")
    g.add_argument("--lr", type=float, default=0.1, help="step size of the ascent (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.001, metavar="WD",
                   help="pull towards grey: each step subtracts weight_decay * X * |X| (default: 0.001)")
    g.add_argument("--start", choices=("mean", "noise"), default="mean",
                   help="start from the mean image of the test batch, or from uniform noise images (default: mean)")

    perturb_start = argparse.ArgumentParser(add_help=False)
    g = perturb_start.add_argument_group("perturbation start")
    g.add_argument("--start", choices=("real", "noise"), default="real",
                   help="perturb real test images, or noise images labelled as the model classifies them "
                        "(default: real; `all` does both)")

    layers = argparse.ArgumentParser(add_help=False)
    g = layers.add_argument_group("feature maximization")
    g.add_argument("--layers", type=int, nargs="+", metavar="K",
                   help="conv layers whose features to maximize, 1..8 for the assignment's net, 1..10 for --arch "
                        "deep (default: 2 3 4 6 8, spread the same way over a deeper net)")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, parents, text in [("perturb", [common, perturb, perturb_start],
                                 "perturb real (or noise) images towards another class"),
                                ("max-class", [common, ascent], "synthesize one image per class"),
                                ("max-features", [common, ascent, layers], "synthesize one image per feature"),
                                ("all", [common, perturb, ascent, layers], "every technique for every model")]:
        commands.add_parser(name, parents=parents, help=text, description=text)
    return parser.parse_args(argv)


def check_args(args):
    """Every flag checked before any model or image is read (the layers once the models are loaded)."""
    check_range(args, "batch_size", 1, 10_000)
    # each subcommand has some of these flags
    for name, low, high, low_open in (("gain", 0, 255, False), ("iterations", 0, 100_000, False),
                                      ("lr", 0, 100, True), ("weight_decay", 0, 1, False)):
        if hasattr(args, name):
            check_range(args, name, low, high, low_open)


ASSIGNMENT_LAYERS = (2, 3, 4, 6, 8)  # the assignment's examples, for its 8-layer net


def layers_of(model, asked):
    """The conv layers to maximize for this model: --layers, checked against its depth, or the assignment's
    2 3 4 6 8 spread over its layers."""
    if asked is None:
        return sorted({max(1, round(k * model.num_layers / 8)) for k in ASSIGNMENT_LAYERS})
    for layer in asked:
        if not 1 <= layer <= model.num_layers:
            raise UserError(f"--layers {layer}: this discriminator's conv layers are 1..{model.num_layers}")
    return asked


def model_names(paths, names):
    """The output folder name of each model: --name in order, or the file stem."""
    if names is None:
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    elif len(names) != len(paths):
        raise UserError(f"{len(names)} --name for {len(paths)} --model; give --name once per --model, or never")
    for name in names:
        if not name or os.sep in name or name in (".", ".."):
            raise UserError(f"--name {name!r} cannot be a folder name; use letters, digits, - and _")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two models would write to {duplicates[0]}/; give --name once per --model")
    return names


def gradient_image(grad, scale="batch"):
    """The gradient as images in [0, 1]: one min-max over the whole batch (scale="batch", as the assignment
    does: images with small gradients look flat grey next to the one with the largest), or each image min-max
    scaled on its own (scale="image"). A constant gradient shows as mid grey."""
    dims = (0, 1, 2, 3) if scale == "batch" else (1, 2, 3)
    low = grad.amin(dims, keepdim=True)
    span = grad.amax(dims, keepdim=True) - low
    return torch.where(span > 0, (grad - low) / span.clamp_min(1e-12), torch.full_like(grad, 0.5))


def noise_images(n, seed=0, device="cpu"):
    """n images of uniform noise in [-1, 1], the same for a seed."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).mul(2).sub(1).to(device)


def perturb(model, x, y, gain, scale="batch"):
    """Move each image of x (in [-1, 1]) `gain` intensity levels per pixel in the direction that lowers the
    cross entropy of the label (y + 1) mod 10 (the fast gradient sign step). Returns the gradient image, the
    perturbed images, the accuracy on the batch before and after, and the share classified as label + 1
    after."""
    alternative = (y + 1) % NUM_CLASSES
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x).logits, alternative), x)
    jittered = (x.detach() - gain * LEVEL * grad.sign()).clamp(-1, 1)
    return {"gradient": gradient_image(grad, scale), "jittered": jittered,
            "accuracy_before": accuracy(model, [(x.detach(), y)]), "accuracy_after": accuracy(model, [(jittered, y)]),
            "alternative_after": accuracy(model, [(jittered, alternative)])}


def ascend(x, objective, iterations, lr, weight_decay, desc=None):
    """Gradient ascent of objective(x) (one value per image) with the assignment's update:
    X <- X + lr * grad - weight_decay * X * |X|, clipped to [-1, 1]. desc shows a progress bar."""
    x = x.detach().clone()
    for _ in progress_bar(range(iterations), desc=desc, enabled=desc is not None):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(objective(x).sum(), x)
        with torch.no_grad():
            x = (x + lr * grad - weight_decay * x * x.abs()).clamp(-1, 1)
    with torch.no_grad():
        return x, objective(x)


def maximize_classes(model, start, iterations=200, lr=0.1, weight_decay=0.001, desc=None):
    """Image i pushed to raise the logit of class i, for the ten classes. start: one image (3, H, W), copied,
    or one image per class (10, 3, H, W). Returns the images and each image's own class logit before and
    after."""
    target = torch.arange(NUM_CLASSES, device=start.device)
    objective = lambda x: model(x).logits[target, target]
    x = (start.expand(NUM_CLASSES, *start.shape) if start.dim() == 3 else start[:NUM_CLASSES]).clone()
    with torch.no_grad():
        before = objective(x)
    images, after = ascend(x, objective, iterations, lr, weight_decay, desc)
    return {"images": images, "start_scores": before, "final_scores": after}


def maximize_features(model, start, layer, iterations=200, lr=0.1, weight_decay=0.001, desc=None):
    """Image i pushed to raise feature i of conv layer `layer` (its map max-pooled over space), for the first
    min(100, channels of the layer) features. start: one image (3, H, W), copied, or one image per feature
    (n, 3, H, W). Returns the images and each feature before and after."""
    n = min(MAX_FEATURES, model.blocks[layer - 1].conv.out_channels)
    target = torch.arange(n, device=start.device)
    objective = lambda x: model(x, extract_features=layer)[target, target]
    x = (start.expand(n, *start.shape) if start.dim() == 3 else start[:n]).clone()
    with torch.no_grad():
        before = objective(x)
    images, after = ascend(x, objective, iterations, lr, weight_decay, desc)
    return {"images": images, "start_scores": before, "final_scores": after}


def run_perturb(model, x, y, args, out, prefix=""):
    """The perturbation of x written as <prefix>real_images.png ... (prefix "noise_" for noise images)."""
    result = perturb(model, x, y, args.gain, args.gradient_scale)
    what = "noise images, labelled as classified" if prefix else "real test images"
    (images, _), (gradient, _), (jittered, _) = perturb_files(prefix)
    save_grid(to_unit(x), os.path.join(out, images), PER_ROW, title=f"{what}: accuracy {result['accuracy_before']:.0%}")
    save_grid(result["gradient"], os.path.join(out, gradient), PER_ROW,
              title=f"gradient of the cross entropy towards label + 1 (min-max per {args.gradient_scale})")
    save_grid(to_unit(result["jittered"]), os.path.join(out, jittered), PER_ROW,
              title=f"perturbed by {args.gain:g} levels: accuracy {result['accuracy_after']:.0%}")
    return {"images": len(y), "start": "noise" if prefix else "real", "gain": args.gain,
            "gradient_scaling": f"min-max per {args.gradient_scale}",
            **{key: round(result[key], 4) for key in ("accuracy_before", "accuracy_after", "alternative_after")}}


def rounded(scores):
    return [round(v, 4) for v in scores.tolist()]


def ascent_settings(args):
    return {"iterations": args.iterations, "lr": args.lr, "weight_decay": args.weight_decay}


def ascent_start(args, mean, n, device):
    """The start of class and feature maximization: the test batch's mean image, or n noise images."""
    return mean if args.start == "mean" else noise_images(n, device=device)


def run_max_class(model, start, args, out, name):
    result = maximize_classes(model, start, **ascent_settings(args), desc=f"{name}: classes")
    save_grid(to_unit(result["images"]), os.path.join(out, MAX_CLASS_FILE), PER_ROW, column_labels=CLASSES)
    with torch.no_grad():
        predicted = model(result["images"]).logits.argmax(1)
    return {**ascent_settings(args), "start": args.start, "start_scores": rounded(result["start_scores"]),
            "final_scores": rounded(result["final_scores"]), "predicted": [CLASSES[i] for i in predicted]}


def run_max_features(model, start, layer, args, out, name):
    result = maximize_features(model, start, layer, **ascent_settings(args), desc=f"{name}: layer {layer}")
    n = len(result["images"])
    save_grid(to_unit(result["images"]), os.path.join(out, max_features_file(layer)), PER_ROW,
              title=f"layer {layer}: features 0..{n - 1}, row by row")
    return {**ascent_settings(args), "start": args.start, "features": n,
            "start_scores": rounded(result["start_scores"]), "final_scores": rounded(result["final_scores"])}


def merge_results(path, update):
    """results.json with `update` merged in (max_features per layer), written atomically."""
    results = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError):
            results = None
        # JSON of another shape (null, a list, max_features that is no object) cannot take the update either
        if not (isinstance(results, dict) and isinstance(results.get("max_features", {}), dict)):
            print(f"{path} is unreadable; writing a new one")
            results = {}
    for key, value in update.items():
        if key == "max_features":
            results.setdefault(key, {}).update(value)
        else:
            results[key] = value
    atomic_write(path, json.dumps(results, indent=1).encode())


def visualize(args):
    check_args(args)
    output_folder(args.out_dir, "--out-dir", create=False)  # made once the inputs have passed
    names = model_names(args.model, args.name)
    device = Runtime(args.device).device
    models = [load_model(path, "discriminator", device) for path in args.model]
    techniques = TECHNIQUES if args.command == "all" else (args.command,)
    layers = [layers_of(model, args.layers) for model in models] if "max-features" in techniques else None
    # A fixed subset spread over the classes, the same every run: in an image-folder test set the first 100
    # images would all be airplanes.
    images, labels = load_split(args.data_dir, "test", args.batch_size)
    x, y = to_float(images).to(device), labels.to(device)
    perturb_starts = ("real", "noise") if args.command == "all" else (args.start,)
    for i, (model, path, name) in enumerate(zip(models, args.model, names)):
        out = os.path.join(args.out_dir, name)
        output_folder(out, "--out-dir")
        update = {"model": path}
        if "perturb" in techniques and "real" in perturb_starts:
            p = update["perturb"] = run_perturb(model, x, y, args, out)
            print(f"{name}: accuracy on {p['images']} test images {p['accuracy_before']:.1%}, "
                  f"after the perturbation (gain {args.gain:g}) {p['accuracy_after']:.1%}")
        if "perturb" in techniques and "noise" in perturb_starts:
            noise = noise_images(len(y), device=device)  # as many as the real batch
            with torch.no_grad():
                as_classified = model(noise).logits.argmax(1)
            p = update["perturb_noise"] = run_perturb(model, noise, as_classified, args, out, prefix="noise_")
            print(f"{name}: {p['images']} noise images, after the perturbation (gain {args.gain:g}) "
                  f"{p['accuracy_after']:.1%} classified as before, {p['alternative_after']:.1%} as label + 1")
        if "max-class" in techniques:
            start = ascent_start(args, x.mean(0), NUM_CLASSES, device)
            update["max_class"] = run_max_class(model, start, args, out, name)
        if "max-features" in techniques:
            start = ascent_start(args, x.mean(0), MAX_FEATURES, device)
            update["max_features"] = {str(k): run_max_features(model, start, k, args, out, name)
                                      for k in layers[i]}
        merge_results(os.path.join(out, RESULTS_FILE), update)
        print(f"{name}: wrote {out}/")


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda: visualize(args))


if __name__ == "__main__":
    main()
