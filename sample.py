"""Draw images of chosen classes from a trained generator into one image grid (PNG, JPEG, ... by --output's
extension).

    python sample.py --model generator.model --classes cat --n 64 --output cats.png
    python sample.py --model generator.model --classes 0 ship truck --n 8 --output some.png

One class: an n-image square-ish grid. Several: one column per class, n images each, names on top.
"""
import argparse
import math
import os

import torch

from models import class_noise
from torch_utils.cli import UserError, check_range, run_main
from torch_utils.files import atomic_write, image_bytes, output_file
from torch_utils.images import grid_image, to_unit
from torch_utils.runtime import DEVICE_HELP, Runtime
from training.checkpoint import load_model
from training.data import CLASSES


# The formats --output may name, by extension (what Pillow writes of an RGB grid), and their options: JPEG and
# WEBP at high quality and, for JPEG, without chroma subsampling, which would blur 32x32 images.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
           ".bmp": "BMP", ".gif": "GIF", ".pdf": "PDF"}
OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"quality": 95}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="generator.model", help="generator file (default: generator.model)")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES),
                        help=f"class names or indices 0-9 (default: all ten): {', '.join(CLASSES)}")
    parser.add_argument("--n", type=int, default=10, help="images per class (default: 10)")
    parser.add_argument("--output", default="samples.png",
                        help=f"image to write, in the format of its extension: {', '.join(FORMATS)} "
                             "(default: samples.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser.parse_args(argv)


def output_format(path):
    """The Pillow format that path's extension names; a UserError for another extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise UserError(f"--output {path}: the extension picks the image format; use one of {', '.join(FORMATS)}")
    return FORMATS[extension]


def class_index(name):
    if name.isdigit() and int(name) < len(CLASSES):
        return int(name)
    if name in CLASSES:
        return CLASSES.index(name)
    raise UserError(f"unknown class {name!r}; use an index 0-{len(CLASSES) - 1} or one of {', '.join(CLASSES)}")


@torch.no_grad()
def sample(gen, classes, n, seed):
    """n images of each class in [-1, 1], ordered image-major so that a len(classes)-wide grid has one
    class per column. The noise is drawn on the CPU, then moved: one seed gives the same images on every device."""
    labels = torch.tensor(classes).repeat(n)
    noise = class_noise(labels, torch.Generator().manual_seed(seed))
    return gen(noise.to(next(gen.parameters()).device))


def run(args):
    check_range(args, "n", 1, 10_000)
    check_range(args, "seed", 0, 2 ** 63 - 1)
    classes = [class_index(c) for c in args.classes]
    image_format = output_format(args.output)
    output_file(args.output, "--output")
    gen = load_model(args.model, "generator", Runtime(args.device).device)
    images = to_unit(sample(gen, classes, args.n, args.seed))
    if len(classes) == 1:
        grid = grid_image(images, nrow=math.ceil(math.sqrt(args.n)), title=CLASSES[classes[0]])
    else:
        grid = grid_image(images, nrow=len(classes), column_labels=[CLASSES[c] for c in classes])
    atomic_write(args.output, image_bytes(grid, image_format, **OPTIONS.get(image_format, {})),
                 hint="choose another --output")
    print(f"wrote {len(images)} images to {args.output}")


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
