"""Shared test helpers: the repo root on sys.path, and a tiny CIFAR-like image-folder tree.

write_image_folder(root) writes root/train/<class>/NNN.png and root/test/<class>/NNN.png (32x32 RGB, the 10
class folders named as data.CLASSES) and returns what it wrote; the fixture tiny_image_folder gives such a tree
in a fresh temporary folder. Each class has its own colour or stripe pattern plus per-pixel noise, so the
classes are easy to learn (even through the train augmentation) and no two images are equal.
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from training import data  # noqa: E402  (needs the repo root on sys.path)
from training.data import CLASSES  # noqa: E402

# The tests' nets are tiny: one thread runs them as fast as several, and far faster on a busy machine, where
# several threads per process oversubscribe the cores. The variable carries it to the scripts run as
# subprocesses.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
# Without a GPU, Triton's interpreter runs triton_layer_norm's kernels on the CPU; it is chosen when the kernels
# are defined, so before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

LOW, HIGH = 40, 215


def class_image(label, rng):
    """uint8 (32, 32, 3): classes 0-7 a corner of the RGB cube, 8 and 9 grey vertical / horizontal stripes."""
    image = np.empty((32, 32, 3), dtype=np.int64)
    if label < 8:
        image[:] = [HIGH if label >> bit & 1 else LOW for bit in range(3)]
    else:
        stripes = np.where(np.arange(32) // 4 % 2 == 0, LOW, HIGH)
        image[:] = (stripes[None, :, None] if label == 8 else stripes[:, None, None])
    image += rng.integers(-30, 31, size=image.shape)
    return image.clip(0, 255).astype(np.uint8)


def write_image_folder(root, train_per_class=26, test_per_class=10, seed=0):
    """Writes the tree under root; returns {split: (images uint8 (N, 32, 32, 3), labels list)} in the order
    written (classes in CLASSES order, files NNN.png in name order)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                image = class_image(label, rng)
                Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
                images.append(image)
                labels.append(label)
        written[split] = (np.stack(images), labels)
    return written


@pytest.fixture
def tiny_image_folder(tmp_path):
    """A data dir with 260 train and 100 test images in train/<class>/ and test/<class>/ folders."""
    root = tmp_path / "data"
    write_image_folder(root)
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skips without one); run them with "
                                       "python -m pytest -m gpu tests")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tree as tiny_image_folder's, shared by a module's tests, with the decoded-image caches already built (runs
    started side by side would otherwise both write them)."""
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root)
    for split in ("train", "test"):
        data.load_split(root, split)
    return root
