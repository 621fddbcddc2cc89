"""training/data.py: the two dataset layouts, the image-folder cache, the errors a user can meet, the batched
augmentation (against torchvision's own functions) and the Loader."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import write_image_folder
from torch_utils.cli import UserError
from training import data


class DownloadAttempted(Exception):
    pass


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """No test here may reach the network: a download attempt fails, and the calls are recorded."""
    calls = []

    def fail(*args, **kwargs):
        calls.append((args, kwargs))
        raise DownloadAttempted("no network in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fail)
    return calls


def as_pairs(images, labels):
    """{image bytes: label}, to compare datasets whatever their order."""
    return {bytes(np.ascontiguousarray(image)): int(label) for image, label in zip(images, labels)}


# ---------------------------------------------------------------------------------------------------------
# Image-folder layout and its cache

def test_image_folder_loads_exact_pixels_and_labels_of_the_class_folders(tmp_path):
    written = write_image_folder(tmp_path, train_per_class=3, test_per_class=2)
    for split, count in (("train", 30), ("test", 20)):
        images, labels = data.load_split(tmp_path, split)
        assert images.dtype == torch.uint8 and images.shape == (count, 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.shape == (count,)
        expected_images, expected_labels = written[split]
        loaded = as_pairs(images.permute(0, 2, 3, 1).numpy(), labels.tolist())
        # Every written PNG comes back bit for bit, labelled by its folder (index in sorted folder names).
        assert loaded == as_pairs(expected_images, expected_labels)
    # write_image_folder labels by position in data.CLASSES; CIFAR-10's names are in alphabetical order, so
    # that is also the position in the sorted folder names.
    assert sorted(data.CLASSES) == list(data.CLASSES)


def test_image_folder_accepts_other_modes_and_sizes(tmp_path):
    write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    from PIL import Image
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, "L").save(tmp_path / "train" / "cat" / "grey.png")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "train" / "dog" / "big.png")
    images, labels = data.load_split(tmp_path, "train")
    assert images.shape == (12, 3, 32, 32)
    grey_rows = [i for i in range(12) if torch.equal(images[i, 0], torch.from_numpy(grey))]
    assert len(grey_rows) == 1
    i = grey_rows[0]
    assert torch.equal(images[i, 1], images[i, 0]) and torch.equal(images[i, 2], images[i, 0])
    assert labels[i] == data.CLASSES.index("cat")
    flat = [i for i in range(12) if (images[i] == torch.tensor([10, 200, 30]).view(3, 1, 1)).all()]
    assert len(flat) == 1 and labels[flat[0]] == data.CLASSES.index("dog")


def count_decodes(monkeypatch):
    calls = []
    real_open = data.Image.open

    def counting_open(*args, **kwargs):
        calls.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(data.Image, "open", counting_open)
    return calls


def test_cache_is_written_reused_and_invalidated_by_a_new_image(tmp_path, monkeypatch):
    write_image_folder(tmp_path, train_per_class=2, test_per_class=1)
    decodes = count_decodes(monkeypatch)
    first = data.load_split(tmp_path, "train")
    assert len(decodes) == 20
    assert (tmp_path / "train.uint8.pt").is_file()
    assert not (tmp_path / "test.uint8.pt").exists()  # only the split that was read

    decodes.clear()
    second = data.load_split(tmp_path, "train")
    assert decodes == []  # served from the cache, no image decoded
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    from PIL import Image
    new = np.full((32, 32, 3), 77, dtype=np.uint8)
    Image.fromarray(new).save(tmp_path / "train" / "ship" / "zzz.png")
    images, labels = data.load_split(tmp_path, "train")
    assert len(decodes) == 21 and len(labels) == 21
    assert as_pairs(images.permute(0, 2, 3, 1).numpy(), labels)[bytes(new)] == data.CLASSES.index("ship")

    decodes.clear()
    assert len(data.load_split(tmp_path, "train")[1]) == 21 and decodes == []  # the rebuilt cache is reused


def test_cache_is_invalidated_when_an_image_is_removed_or_changed(tmp_path):
    write_image_folder(tmp_path, train_per_class=2, test_per_class=1)
    data.load_split(tmp_path, "train")
    os.remove(tmp_path / "train" / "frog" / "000.png")
    assert len(data.load_split(tmp_path, "train")[1]) == 19
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "train" / "frog" / "001.png")
    images, labels = data.load_split(tmp_path, "train")
    frog = images[labels == data.CLASSES.index("frog")]
    assert len(frog) == 1 and frog.sum() == 0


def test_a_cache_that_cannot_be_written_only_costs_decoding(tmp_path):
    """training/data.py promises that a read-only data folder still loads (the images are decoded every time). Running
    as root makes chmod useless, so the cache's temporary file is blocked by a folder of that name."""
    written = write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    (tmp_path / "train.uint8.pt.tmp").mkdir()
    (tmp_path / "train.uint8.pt").mkdir()
    images, labels = data.load_split(tmp_path, "train")
    assert as_pairs(images.permute(0, 2, 3, 1).numpy(), labels) == as_pairs(*written["train"])


def test_a_damaged_cache_is_rebuilt(tmp_path):
    written = write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    (tmp_path / "test.uint8.pt").write_bytes(b"not a torch file")
    images, labels = data.load_split(tmp_path, "test")
    assert as_pairs(images.permute(0, 2, 3, 1).numpy(), labels) == as_pairs(*written["test"])


# ---------------------------------------------------------------------------------------------------------
# torchvision's CIFAR-10 layout (cifar-10-batches-py), written here in its own pickle format

def write_cifar_batches(root, per_batch=6, test_size=8, seed=0):
    """DIR/cifar-10-batches-py/data_batch_1..5 and test_batch as pickles of {'data': uint8 (N, 3072) array with
    the red plane, then green, then blue, each row-major; 'labels': list}. Returns {split: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    written = {"train": ([], []), "test": ([], [])}
    names = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", test_size)]
    for name, split, n in names:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "batch_label": name}, f)
        written[split][0].append(rows)
        written[split][1].extend(labels)
    return {split: (np.concatenate(rows), labels) for split, (rows, labels) in written.items()}


def test_cifar_batches_are_read_in_order_with_channel_planes(tmp_path, no_download):
    written = write_cifar_batches(tmp_path)
    for split, n in (("train", 30), ("test", 8)):
        images, labels = data.load_split(tmp_path, split)
        rows, expected_labels = written[split]
        assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32)
        assert labels.tolist() == expected_labels
        # pixel (y, x) of channel c is entry c*1024 + y*32 + x of the row
        assert images[4, 1, 2, 3] == rows[4, 1024 + 2 * 32 + 3]
        assert torch.equal(images.reshape(n, -1), torch.from_numpy(rows))
    assert no_download == []


def test_missing_cifar_batch_is_a_user_error(tmp_path):
    write_cifar_batches(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        data.load_split(tmp_path, "train")


def test_limit_gives_a_fixed_subset_spread_over_classes(tmp_path):
    write_image_folder(tmp_path, train_per_class=10, test_per_class=1)
    all_images, all_labels = data.load_split(tmp_path, "train")
    images, labels = data.load_split(tmp_path, "train", limit=30)
    assert images.shape == (30, 3, 32, 32) and labels.shape == (30,)
    assert len(set(labels.tolist())) >= 6  # not the first three class folders
    again = data.load_split(tmp_path, "train", limit=30)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    full = as_pairs(all_images.permute(0, 2, 3, 1).numpy(), all_labels)
    subset = as_pairs(images.permute(0, 2, 3, 1).numpy(), labels)
    assert len(subset) == 30 and subset.items() <= full.items()
    assert len(data.load_split(tmp_path, "train", limit=1000)[1]) == 100


# ---------------------------------------------------------------------------------------------------------
# Errors a user can meet

def test_folder_with_neither_layout_is_a_user_error(tmp_path, no_download):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="cifar-10-batches-py") as error:
        data.load_split(tmp_path, "train")
    assert "train" in str(error.value)
    assert no_download == []  # a non-empty foreign folder is never downloaded into


def test_class_folders_without_images_is_a_user_error(tmp_path):
    write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    for image in (tmp_path / "train" / "cat").iterdir():
        image.unlink()
    (tmp_path / "train" / "cat" / "readme.txt").write_text("not an image")
    with pytest.raises(UserError, match="cat has no images"):
        data.load_split(tmp_path, "train")
    data.load_split(tmp_path, "test")  # the test split has its cat


def test_wrong_number_of_class_folders_is_a_user_error(tmp_path):
    write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    os.rename(tmp_path / "train" / "truck", tmp_path / "train" / "extra" )
    (tmp_path / "train" / "more").mkdir()
    (tmp_path / "train" / "more" / "a.png").write_bytes((tmp_path / "train" / "cat" / "000.png").read_bytes())
    with pytest.raises(UserError, match="11 class folders"):
        data.load_split(tmp_path, "train")


def test_unreadable_image_is_a_user_error(tmp_path):
    write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        data.load_split(tmp_path, "train")


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_failed_download_is_a_user_error(tmp_path, no_download, exists):
    target = tmp_path / "cifar"
    if exists:
        target.mkdir()
    with pytest.raises(UserError, match="download") as error:
        data.load_split(str(target), "train")
    assert "no network in tests" in str(error.value)
    assert len(no_download) == 1  # a missing or empty folder is where CIFAR-10 gets downloaded


def test_no_data_dir_is_a_user_error():
    with pytest.raises(UserError, match="data-dir"):
        data.load_split("", "train")


# ---------------------------------------------------------------------------------------------------------
# Augmentation

def some_images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_to_float_maps_uint8_to_minus_one_one():
    x = data.to_float(torch.tensor([0, 255, 51], dtype=torch.uint8))
    torch.testing.assert_close(x, torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_augment_keeps_shape_and_range_and_is_random_per_seed():
    images = some_images()
    a = data.augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, data.augment(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, data.augment(images, torch.Generator().manual_seed(2)), atol=1e-3)
    assert (a - data.to_float(images)).abs().mean() > 0.01  # it does change the images


def test_augment_draws_parameters_per_image():
    same = some_images(1).expand(16, -1, -1, -1).contiguous()
    out = data.augment(same, torch.Generator().manual_seed(0))
    differences = [(out[0] - out[i]).abs().max() for i in range(1, 16)]
    assert all(d > 1e-3 for d in differences)


def test_color_jitter_matches_torchvision_image_by_image():
    g = torch.Generator().manual_seed(0)
    n = 8
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[0] = 0.5  # grey: no hue
    x[1, :, :16] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated red, and some pure black / white
    x[1, :, 16:, :8], x[1, :, 16:, 8:16] = 0.0, 1.0
    uniform = lambda low, high: torch.empty(n).uniform_(low, high, generator=g)
    brightness, contrast, saturation = uniform(0.5, 1.5), uniform(0.5, 1.5), uniform(0.5, 1.5)
    hue = uniform(-0.5, 0.5)
    original = x.clone()
    ours = data.color_jitter(x, brightness, contrast, saturation, hue)
    assert torch.equal(x, original)
    for i in range(n):
        ref = TF.adjust_brightness(x[i], brightness[i].item())
        ref = TF.adjust_contrast(ref, contrast[i].item())
        ref = TF.adjust_saturation(ref, saturation[i].item())
        ref = TF.adjust_hue(ref, hue[i].item())
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-5, msg=f"image {i}")


def test_resized_crop_flip_matches_torchvision_on_integer_boxes():
    """Each output is torchvision's resized_crop (bilinear, no antialias) of the box, mirrored when flip."""
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = [(0, 0, 32), (2, 5, 24), (8, 0, 23), (1, 2, 30), (0, 4, 27), (5, 5, 27)]  # (left, top, side)
    flips = [False, True, False, True, True, False]
    left, top, side = (torch.tensor([b[j] for b in boxes], dtype=torch.float32) for j in range(3))
    ours = data.resized_crop_flip(x, left, top, side, torch.tensor(flips))
    mismatches = []
    for i, ((l, t, s), flip) in enumerate(zip(boxes, flips)):
        ref = TF.resized_crop(x[i], t, l, s, s, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=False)
        if flip:
            ref = TF.horizontal_flip(ref)
        error = (ours[i] - ref).abs()
        if error.max() > 1e-5:
            mismatches.append(f"box (left, top, side) {boxes[i]} flip {flip}: max error {error.max():.3f}, "
                              f"without the outermost rows and columns {error[:, 1:-1, 1:-1].max():.1e}")
    assert not mismatches, "\n".join(mismatches)


def test_hue_shift_matches_torchvision_at_ties_and_primaries():
    """The hue rotation picks the first maximal channel: ties (yellow, cyan, magenta, two equal maxima above a
    third), primaries, grey, black and white, shifted over the whole circle."""
    colours = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0.6, 0.6, 0.2], [0.2, 0.6, 0.6], [0.6, 0.2, 0.6],
                            [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1],
                            [0.3, 0.2, 0.1], [0.1, 0.3, 0.2]])
    x = colours.T.reshape(1, 3, 2, 7).expand(9, -1, -1, -1).contiguous()
    hue = torch.linspace(-0.5, 0.5, 9)
    ones = torch.ones(9)
    ours = data.color_jitter(x, ones, ones, ones, hue)
    for i in range(9):
        torch.testing.assert_close(ours[i], TF.adjust_hue(x[i], hue[i].item()), rtol=0, atol=1e-5,
                                   msg=f"hue shift {hue[i]:.3f}")


# ---------------------------------------------------------------------------------------------------------
# Loader

def indexed_loader(n, batch_size, train, **kwargs):
    """A Loader whose labels are the image indices, so batches show which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return data.Loader(images, torch.arange(n), batch_size, "cpu", train=train, **kwargs)


def epoch_batches(loader, epoch=0, start=0):
    return [(b, labels.tolist()) for b, _, labels in loader.batches(epoch, start)]


def test_train_epoch_covers_each_image_at_most_once_with_full_batches():
    loader = indexed_loader(50, 8, train=True)
    assert len(loader) == 6
    batches = epoch_batches(loader)
    assert [b for b, _ in batches] == list(range(6))
    assert all(len(idx) == 8 for _, idx in batches)
    seen = [i for _, idx in batches for i in idx]
    assert len(set(seen)) == 48 and set(seen) <= set(range(50))
    _, images, labels = next(iter(loader.batches(0)))
    assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images and labels stay paired


def test_train_order_depends_on_epoch_and_seed_only():
    loader = indexed_loader(50, 8, train=True, seed=3)
    assert epoch_batches(loader, 0) == epoch_batches(indexed_loader(50, 8, train=True, seed=3), 0)
    assert epoch_batches(loader, 0) == epoch_batches(loader, 0)
    assert epoch_batches(loader, 0) != epoch_batches(loader, 1)
    assert epoch_batches(loader, 0) != epoch_batches(indexed_loader(50, 8, train=True, seed=4), 0)


def test_train_batches_from_a_start_are_the_tail_of_the_epoch():
    loader = indexed_loader(50, 8, train=True)
    assert epoch_batches(loader, 2, start=4) == epoch_batches(loader, 2)[4:]


def test_ranks_split_each_batch_disjointly():
    whole = indexed_loader(50, 8, train=True, seed=1)
    ranks = [indexed_loader(50, 8, train=True, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for epoch in (0, 1):
        shares = [epoch_batches(r, epoch) for r in ranks]
        for (b, full), (_, a), (_, c) in zip(epoch_batches(whole, epoch), *shares):
            assert len(a) == len(c) == 4
            assert not set(a) & set(c)
            assert sorted(a + c) == sorted(full)


def test_eval_serves_every_image_once_in_order():
    loader = indexed_loader(50, 8, train=False)
    assert len(loader) == 7
    batches = epoch_batches(loader)
    assert [i for _, idx in batches for i in idx] == list(range(50))
    assert epoch_batches(loader, 5) == batches
