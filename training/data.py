"""CIFAR-10 as uint8 tensors, and a loader that shuffles and augments whole batches on the device.

Two sources, chosen by what --data-dir holds:
- an image-folder tree DIR/train/<class>/* and DIR/test/<class>/* (any format Pillow reads), decoded once
  and cached beside the data as DIR/<split>.uint8.pt;
- torchvision's CIFAR-10 (DIR/cifar-10-batches-py), downloaded into DIR when DIR is missing or empty.
The assignment's train augmentation (random resized crop, colour jitter, horizontal flip) runs as batched tensor
ops, so an epoch does no per-image Python work, on the GPU or the CPU alike.
"""
import functools
import hashlib
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from torch_utils.cli import UserError
from torch_utils.files import save_torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# Augmentation of the assignment: crop area fraction, and the colour jitter's magnitudes (torchvision's
# ColorJitter(0.1, 0.1, 0.1, 0.1): factors drawn from [0.9, 1.1], hue shift from [-0.1, 0.1]).
CROP_SCALE = (0.7, 1.0)
JITTER = 0.1


def to_float(images):
    """uint8 [0, 255] -> float [-1, 1] (mean 0.5, std 0.5 on the [0, 1] scale)."""
    return images.float().div_(127.5).sub_(1.0)


def load_split(data_dir, split, limit=None):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of the 'train' or 'test' split, in file order (an
    image folder's come sorted by class). With limit, a random subset of that many images, the same every
    run, so that it holds every class."""
    if not data_dir:
        raise UserError("no --data-dir given")
    data_dir = os.fspath(data_dir)
    if os.path.isdir(os.path.join(data_dir, split)):
        check_class_folders(data_dir)
        images, labels = _load_image_folder(os.path.join(data_dir, split), os.path.join(data_dir, f"{split}.uint8.pt"))
    else:
        images, labels = _load_cifar_batches(_cifar_batches_dir(data_dir), split)
    if limit is not None and limit < len(labels):
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        images, labels = images[subset], labels[subset]
    return images, labels


def _cifar_batches_dir(data_dir):
    batches = os.path.join(data_dir, "cifar-10-batches-py")
    if os.path.isdir(batches):
        return batches
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise UserError(f"{data_dir} holds neither train/ and test/ class folders nor cifar-10-batches-py/; "
                        "point --data-dir at one of those, or at a missing or empty folder to download CIFAR-10")
    import torchvision

    try:
        torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
    except Exception as e:  # network and disk errors come in many types; all mean the same to the user
        raise UserError(f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); "
                        "without a network, pass --data-dir with train/<class>/ and test/<class>/ image folders")
    return batches


def _load_cifar_batches(batches, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(batches, name)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: the CIFAR-10 download is incomplete; "
                            f"delete {batches} to fetch it again")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # CIFAR-10's own format, as torchvision reads it
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in entry["labels"])
        except Exception as e:  # a truncated or foreign file fails in pickle, numpy or the lookups
            raise UserError(f"{path} is damaged ({type(e).__name__}); delete {batches} to fetch it again")
        if len(labels) != sum(len(i) for i in images):
            raise UserError(f"{path} is damaged (images and labels differ in number); delete {batches} to fetch "
                            "it again")
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def _hidden(name):
    """Names starting with "." are never data: macOS's ._* and .DS_Store, a notebook's .ipynb_checkpoints/."""
    return name.startswith(".")


def _class_folders(root):
    try:
        return sorted(d.name for d in os.scandir(root) if d.is_dir() and not _hidden(d.name))
    except OSError as e:
        raise UserError(f"cannot list {root}: {e.strerror}")


def check_class_folders(data_dir):
    """train/ and test/ must hold the same ten class folders: their sorted names are the labels, so a
    renamed or missing folder would shift every label after it."""
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise UserError(f"{data_dir} has no {split}/ folder: an image-folder dataset needs train/<class>/ and "
                            "test/<class>/")
    found = {split: _class_folders(os.path.join(data_dir, split)) for split in ("train", "test")}
    for split, classes in found.items():
        if not classes:
            raise UserError(f"{os.path.join(data_dir, split)} has no class folders: expected "
                            f"{split}/<class>/<image files>")
        if len(classes) != len(CLASSES):
            raise UserError(f"{os.path.join(data_dir, split)} has {len(classes)} class folders ({', '.join(classes)}); "
                            f"CIFAR-10 needs {len(CLASSES)}")
    if found["train"] != found["test"]:
        differ = sorted(set(found["train"]) ^ set(found["test"]))
        raise UserError(f"{data_dir}: train/ and test/ have different class folders ({', '.join(differ)}); the "
                        "sorted folder names are the labels, so both need the same ten")


def _list_image_folder(root):
    """([(path, label)] of the images under root/<class>/, the number of hidden files and folders skipped);
    refuses a class without images."""
    files = []
    try:
        hidden = sum(_hidden(name) for name in os.listdir(root))
    except OSError as e:
        raise UserError(f"cannot list {root}: {e.strerror}")
    for label, name in enumerate(_class_folders(root)):
        folder = os.path.join(root, name)
        try:
            entries = os.listdir(folder)
        except OSError as e:
            raise UserError(f"cannot list {folder}: {e.strerror}")
        hidden += sum(_hidden(f) for f in entries)
        names = sorted(f for f in entries if f.lower().endswith(IMAGE_SUFFIXES) and not _hidden(f))
        if not names:
            raise UserError(f"{folder} has no images: every class needs some (a classifier that never saw a "
                            f"{name} would be saved silently)")
        files += [(os.path.join(folder, f), label) for f in names]
    return files, hidden


def _decode(path):
    """uint8 (32, 32, 3) of the image at path, or the reason it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (32, 32):
                image = image.resize((32, 32), Image.BILINEAR)
            return np.asarray(image), None
    except OSError as e:
        return None, e.strerror or str(e)
    except Exception as e:  # Pillow's refusals (an image too large to decode safely, a broken header) vary
        return None, f"{type(e).__name__}: {e}"


def _load_image_folder(root, cache_path):
    """The images under root/<class>/, from the cache at cache_path while it matches the files. The cache's
    stamp is the files' names under root, labels, sizes and modification times: the same folder named another
    way (relative, ./, through a symlink) reuses the cache, and a changed, added or removed file rebuilds it."""
    files, hidden = _list_image_folder(root)
    if hidden:
        print(f"note: skipped {hidden} hidden file(s) and folder(s) in {root} (names starting with '.', such as "
              ".DS_Store, ._* or .ipynb_checkpoints, are never data)", file=sys.stderr)
    stamp, unreadable = hashlib.sha1(), []
    for path, label in files:
        try:
            stat = os.stat(path)
        except OSError as e:  # a dangling link, a file removed meanwhile
            unreadable.append((path, e.strerror))
            continue
        name = os.path.relpath(path, root)
        stamp.update(os.fsencode(name) + f"\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    refuse_unreadable(unreadable)
    stamp = stamp.hexdigest()
    if os.path.isfile(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            if cached["stamp"] == stamp:
                return cached["images"], cached["labels"]
        except Exception:
            pass  # a damaged or foreign cache is rebuilt below
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        pixels, reason = _decode(path)
        if reason is None:
            images[i] = pixels
        else:
            unreadable.append((path, reason))
    refuse_unreadable(unreadable)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    try:
        save_torch({"stamp": stamp, "images": images, "labels": labels}, cache_path, hint=None)
    except UserError as e:  # the cache only saves time: go on without it
        print(f"note: {e}; going on without the cache (the images are decoded again next time)", file=sys.stderr)
    return images, labels


def refuse_unreadable(unreadable):
    """One line naming the files that cannot be read: training on what is left would silently drop images."""
    if unreadable:
        path, reason = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UserError(f"cannot read image {path}: {reason}{more}; fix or remove the file(s)")


# ---------------------------------------------------------------------------------------------------------
# Batched augmentation. Each op takes per-sample parameters (tensors of shape (N,)), so one call transforms a
# whole batch with different random parameters per image; the functions follow torchvision's definitions. They
# are written in few operations over the images (49 for augment), since on a GPU each is a kernel launch.

@functools.lru_cache(maxsize=None)
def _constant(values, device):
    """A small constant tensor, built once per device (values: nested tuples)."""
    return torch.tensor(values, device=device)


_GREY = ((0.2989, 0.587, 0.114),)  # torchvision's rgb_to_grayscale weights
# Shaped (channels, 1, 1) to broadcast over (N, 1, H, W): for r, g, b where each ramp starts on the hue circle, in
# sixths; the next and previous channel, as offsets
_HUE_CHANNELS = (((5.0,),), ((3.0,),), ((1.0,),))
_NEXT_PREVIOUS = (((1,),), ((2,),))


def _blend(x, other, factor):
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return torch.lerp(other, x, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def _shift_hue(x, hue, signed=False):
    """torchvision's adjust_hue (RGB -> HSV, hue + shift, HSV -> RGB) in one pass, without the HSV image: each
    channel is max - chroma * ramp(hue), ramp the piecewise-linear function of the HSV-to-RGB conversion
    clamp(min(k, 4 - k), 0, 1), k = (channel's start + 6 * hue) mod 6. The hue, in sixths, is 2 * m +
    (next channel - previous channel) / chroma for m the first maximal channel, as torchvision's rgb_to_hsv.
    signed: return 2 * rgb - 1 (augment's [-1, 1]) in the same pass."""
    maxc, m = x.max(1)
    chroma = maxc - x.amin(1)
    pair = x.gather(1, (m.unsqueeze(1) + _constant(_NEXT_PREVIOUS, x.device)).remainder_(3))
    # Grey pixels (chroma 0) have next == previous: their hue comes out finite (0 / 1e-30), times chroma 0
    sixths = torch.add(hue.view(-1, 1, 1) * 6, m, alpha=2).addcdiv_(pair[:, 0] - pair[:, 1], chroma.clamp_min(1e-30))
    k = (sixths.unsqueeze(1) + _constant(_HUE_CHANNELS, x.device)).remainder_(6)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    if signed:
        return torch.addcmul(maxc.mul(2).sub_(1).unsqueeze(1), chroma.unsqueeze(1), ramp, value=-2)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1)


def color_jitter(x, brightness, contrast, saturation, hue, signed=False):
    """x: float images in [0, 1], (N, 3, H, W); factors as torchvision's adjust_brightness/contrast/saturation,
    hue as its adjust_hue (a shift in [-0.5, 0.5] of the hue circle), one per image. x may also be on another
    scale s if brightness is divided by s (augment passes 0..255 pixels). signed: the result as 2 * rgb - 1."""
    x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    grey = _constant(_GREY, x.device)
    # The mean of the greyscale image is the greyscale of the channel means. (fp32 matmuls: PyTorch uses no TF32
    # for them unless asked to.)
    x = _blend(x, (x.mean((2, 3)) @ grey.T).view(-1, 1, 1, 1), contrast)
    x = _blend(x, (grey @ x.flatten(2)).view_as(x[:, :1]), saturation)
    return _shift_hue(x, hue, signed)


def resized_crop_flip(x, left, top, side, flip):
    """Crop the square [left, left+side) x [top, top+side) (pixels, fractional allowed) of each square image,
    resize it bilinearly back to the input size, and mirror the images where flip is True."""
    n, _, height, width = x.shape
    if height != width:
        raise ValueError(f"resized_crop_flip needs square images, got {height}x{width}")
    # Output pixel j samples the box at side * (j + 0.5) / width from its edge, clamped to the centres of the
    # box's edge pixels (as cropping first would); mirrored, at side minus that. Then in grid_sample's units,
    # where pixel edge p sits at 2p/size - 1.
    side = side.view(n, 1)
    centres = _constant(tuple((j + 0.5) / width for j in range(width)), x.device).to(x.dtype)
    offset = torch.minimum(side * centres, side - 0.5).clamp_min_(0.5)
    offsets = torch.stack([torch.where(flip.view(n, 1), side - offset, offset), offset])
    coords = (torch.stack([left, top]).view(2, n, 1) + offsets).mul_(2 / width).sub_(1)
    grid = torch.stack([coords[0].view(n, 1, width).expand(n, width, width),
                        coords[1].view(n, width, 1).expand(n, width, width)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# The random parameters of augment, one row each, uniform on [low, low + span): crop area fraction, left and top
# (fractions of the room the crop leaves), flip (below 0.5), brightness (divided by 255: it scales 0..255
# pixels), contrast, saturation, hue
_DRAWS = (CROP_SCALE[0], 0.0, 0.0, 0.0, (1 - JITTER) / 255, 1 - JITTER, 1 - JITTER, -JITTER)
_SPANS = (CROP_SCALE[1] - CROP_SCALE[0], 1.0, 1.0, 1.0, 2 * JITTER / 255, 2 * JITTER, 2 * JITTER, 2 * JITTER)


def augment(images, rng):
    """uint8 batch -> augmented float batch in [-1, 1], with random parameters per image drawn from rng."""
    n, _, size, _ = images.shape
    device = images.device
    low, span = (_constant(tuple((v,) for v in values), device) for values in (_DRAWS, _SPANS))
    p = torch.addcmul(low, span, torch.rand(len(_DRAWS), n, device=device, generator=rng))
    side = p[0].sqrt_().mul_(size)
    left, top = (size - side) * p[1:3]
    x = resized_crop_flip(images.float(), left, top, side, p[3] < 0.5)
    return color_jitter(x, p[4], p[5], p[6], p[7], signed=True)


class Loader:
    """Batches of a dataset kept on `device` as uint8. Train mode shuffles each epoch (a permutation fixed
    by seed and epoch) and drops the last partial batch; eval mode serves every image in order.
    batch_size is global: with world_size processes, each takes its 1/world_size share of every batch."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world_size=1):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train, self.seed = min(batch_size, len(labels)), train, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self, epoch=0, start=0):
        """Yields (batch index, uint8 images, labels) of the given epoch from batch `start` on."""
        n = len(self.labels)
        if self.train:
            # Folded into manual_seed's 64 bits: a --seed from the clock (1.8e18) would overflow it.
            seed = (self.seed * 100_003 + epoch) % 2 ** 64
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            order = order.to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            yield b, self.images[idx], self.labels[idx]


def training_loaders(args, rt, test_batch=500):
    """(train loader, test loader): this process's share of each shuffled training batch, and every test
    image in batches of test_batch. Rank 0 loads first: it downloads CIFAR-10 or writes the image cache once."""
    splits = rt.rank0_first(lambda: (load_split(args.data_dir, "train", args.limit_train),
                                     load_split(args.data_dir, "test", args.limit_test)))
    train = Loader(*splits[0], args.batch_size, rt.device, train=True, seed=args.seed, rank=rt.rank,
                   world_size=rt.world_size)
    test = Loader(*splits[1], test_batch, rt.device, train=False)
    return train, test
