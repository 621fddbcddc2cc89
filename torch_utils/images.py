"""Image grids with readable labels: the one writer every script uses for its PNGs; the names of the grids that
train_gan.py and visualize.py write and make_gif.py and report.py read."""
import os
import re

import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from torch_utils.cli import UserError
from torch_utils.files import atomic_write, image_bytes

HEADER = 14  # pixels of the label strip above a grid or a frame
GRID_NAME = re.compile(r"^(\d{3,})\.png$")  # NNN.png: the 0-based epoch index, zero-padded to 3 or more digits

# visualize.py's files in a model's folder: the numbers, the class maximization, the feature maximization of
# layer k (max_features_file(k)), and the perturbation's three grids (perturb_files)
RESULTS_FILE = "results.json"
MAX_CLASS_FILE = "max_class.png"
FEATURES_NAME = re.compile(r"^max_features_layer(\d+)\.png$")


def max_features_file(layer):
    return f"max_features_layer{layer}.png"


def perturb_files(prefix=""):
    """[(file, caption)] of the perturbation's grids: the images, the gradient, the perturbed images; prefix ""
    for real test images, "noise_" for noise images."""
    return [(f"{prefix or 'real_'}images.png", f"{prefix.rstrip('_') or 'real'} images"),
            (f"{prefix}gradient_image.png", "gradient"), (f"{prefix}jittered_images.png", "perturbed")]


def to_unit(x):
    """[-1, 1] (the networks' scale) -> [0, 1] (display), clipped."""
    return ((x + 1) / 2).clamp(0, 1)


def grid_image(images, nrow, scale=2, column_labels=None, title=None):
    """A PIL image of images in [0, 1] (N, 3, H, W), nrow per row, enlarged `scale` times (nearest) so that a
    label fits above each column; a title goes above the whole grid."""
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    if scale != 1:
        grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    if column_labels is None and title is None:
        return image
    canvas = Image.new("RGB", (image.width, image.height + HEADER), "white")
    canvas.paste(image, (0, HEADER))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    if title is not None:
        draw.text((4, 1), title, fill="black", font=font)
    else:
        cell = (images.shape[-1] + 2) * scale
        for i, label in enumerate(column_labels):
            width = draw.textlength(label, font=font)
            draw.text((i * cell + (cell - width) / 2 + scale, 1), label, fill="black", font=font)
    return canvas


def save_grid(images, path, nrow, scale=2, column_labels=None, title=None):
    """grid_image(...) written to path as PNG, atomically."""
    atomic_write(path, image_bytes(grid_image(images, nrow, scale, column_labels, title), "PNG"))


def epoch_grid_name(epoch):
    """The file name of the grid of epoch index epoch (0-based)."""
    return f"{epoch:03d}.png"


def epoch_grids(folder):
    """[(epoch index, path)] of the grids in folder, in numeric epoch order (1000 after 999)."""
    if not os.path.isdir(folder):
        raise UserError(f"--input {folder} is not a folder; train_gan.py writes its grids to <out-dir>/output")
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := GRID_NAME.match(name))]
    if not found:
        raise UserError(f"--input {folder} holds no epoch grids (files named NNN.png, such as 000.png)")
    return sorted(found)
