"""visualize.py: the three techniques as functions on tiny discriminators, and the command line end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, write_image_folder
from models import Discriminator, Generator
from training.checkpoint import save_model
import visualize

LAYERS = range(1, 9)


@pytest.fixture(scope="module")
def separable():
    """A width-16 discriminator trained to 100% on ten classes of faint fixed patterns: the classes sit close
    together in pixel space, so a few intensity levels against the gradient cross the decision boundary."""
    torch.manual_seed(0)
    patterns = 0.05 * torch.randn(10, 3, 32, 32)
    y = torch.arange(100) % 10
    x = (patterns[y] + 0.0125 * torch.randn(100, 3, 32, 32)).clamp(-1, 1)
    model = Discriminator(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss = F.cross_entropy(model(x).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x, y


def test_perturbation_lowers_accuracy(separable):
    model, x, y = separable
    result = visualize.perturb(model, x, y, gain=8)
    assert result["accuracy_before"] >= 0.95
    assert result["accuracy_after"] <= 0.3
    # The step heads for the alternative label (true + 1): a step with the wrong sign would not.
    with torch.no_grad():
        predicted = model(result["jittered"]).logits.argmax(1)
    assert (predicted == (y + 1) % 10).float().mean() >= 0.5
    # Without a step nothing changes.
    unchanged = visualize.perturb(model, x, y, gain=0)
    assert unchanged["accuracy_after"] == unchanged["accuracy_before"]


@pytest.mark.parametrize("gain", [1, 8, 10])
def test_perturbation_ranges(separable, gain):
    model, x, y = separable
    x = x.clone()
    x[0] = 1.0  # saturated pixels must stay clipped to [-1, 1]
    x[1] = -1.0
    result = visualize.perturb(model, x, y, gain, scale="image")
    gradient, jittered = result["gradient"], result["jittered"]
    assert gradient.shape == x.shape and jittered.shape == x.shape
    assert gradient.min() >= 0 and gradient.max() <= 1
    # Min-max per image: every image with a non-constant gradient spans the whole of [0, 1].
    assert torch.allclose(gradient.amax((1, 2, 3)), torch.ones(len(x)))
    assert torch.allclose(gradient.amin((1, 2, 3)), torch.zeros(len(x)))
    assert jittered.min() >= -1 and jittered.max() <= 1
    change = (jittered - x).abs()
    level = 2 / 255  # one 8-bit intensity level on the [-1, 1] scale
    assert change.max() <= level * gain + 1e-6
    # Pixels away from the clip bounds move by the full step.
    inside = (x.abs() < 1 - level * gain)
    assert torch.allclose(change[inside], torch.full_like(change[inside], level * gain), atol=1e-5)


def test_default_gradient_image_is_one_min_max_over_the_batch(separable):
    """The assignment's gradient image, computed by hand: (g - min over the batch) / (max - min over the batch)."""
    model, x, y = separable
    x = x[:6].detach().requires_grad_(True)
    loss = F.cross_entropy(model(x).logits, (y[:6] + 1) % 10)
    grad, = torch.autograd.grad(loss, x)
    hand = (grad - grad.min()) / (grad.max() - grad.min())
    result = visualize.perturb(model, x.detach(), y[:6], gain=8)
    torch.testing.assert_close(result["gradient"], hand)
    assert result["gradient"].amax((1, 2, 3)).min() < 1, "one scale for all: not every image reaches 1"


def test_gradient_image_of_a_constant_gradient_is_grey():
    image = visualize.gradient_image(torch.zeros(2, 3, 4, 4))
    assert torch.equal(image, torch.full((2, 3, 4, 4), 0.5))


def test_class_maximization_raises_every_class_logit():
    torch.manual_seed(1)
    model = Discriminator(width=16).eval()
    start = (0.5 * torch.randn(100, 3, 32, 32)).clamp(-1, 1).mean(0)
    result = visualize.maximize_classes(model, start, iterations=10, lr=0.1, weight_decay=0.001)
    images = result["images"]
    assert images.shape == (10, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        start_logits = model(start.expand(10, 3, 32, 32)).logits.diagonal()
        final_logits = model(images).logits.diagonal()
    assert torch.allclose(result["start_scores"], start_logits)
    assert torch.allclose(result["final_scores"], final_logits)
    assert (final_logits > start_logits).all()


@pytest.mark.parametrize("layer", LAYERS)
def test_feature_maximization_raises_every_feature(layer):
    torch.manual_seed(2)
    model = Discriminator(width=16).eval()
    start = (0.5 * torch.randn(100, 3, 32, 32)).clamp(-1, 1).mean(0)
    result = visualize.maximize_features(model, start, layer, iterations=5, lr=0.1, weight_decay=0.001)
    assert result["images"].shape == (16, 3, 32, 32)  # min(100, width) images, one per feature
    assert result["images"].min() >= -1 and result["images"].max() <= 1
    with torch.no_grad():
        final = model(result["images"], extract_features=layer).diagonal()
    assert torch.allclose(result["final_scores"], final)
    assert (result["final_scores"] > result["start_scores"]).all()


# --- the command line ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CIFAR-10 image folder (2 images per class and split), a width-16 discriminator file and a
    generator file."""
    root = tmp_path_factory.mktemp("vis")
    write_image_folder(root / "data", train_per_class=2, test_per_class=2)
    torch.manual_seed(0)
    save_model(Discriminator(width=16), str(root / "cifar10.model"))
    save_model(Generator(width=16), str(root / "generator.model"))
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "visualize.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_all_writes_every_output(files):
    out = files / "out"
    done = run_cli("all", "--model", files / "cifar10.model", "--data-dir", files / "data", "--out-dir", out,
                   "--device", "cpu", "--iterations", "2")
    assert done.returncode == 0, done.stderr
    assert "cifar10: accuracy on 20 test images" in done.stdout
    folder = out / "cifar10"
    expected = {"real_images.png", "gradient_image.png", "jittered_images.png", "max_class.png", "results.json"}
    expected |= {f"max_features_layer{k}.png" for k in (2, 3, 4, 6, 8)}
    assert expected <= set(os.listdir(folder))
    for name in expected - {"results.json"}:
        with Image.open(folder / name) as image:
            assert image.width >= 10 * 32
    results = json.loads((folder / "results.json").read_text())
    assert results["perturb"]["images"] == 20 and results["perturb"]["gain"] == 8
    assert 0 <= results["perturb"]["accuracy_after"] <= 1
    assert len(results["max_class"]["final_scores"]) == 10
    assert sorted(results["max_features"]) == ["2", "3", "4", "6", "8"]
    assert results["max_features"]["8"]["features"] == 16


def test_results_merge_across_commands(files):
    out = files / "merge"
    common = ["--model", str(files / "cifar10.model"), "--name", "base", "--data-dir", str(files / "data"),
              "--out-dir", str(out), "--device", "cpu"]
    visualize.main(["perturb", *common])
    visualize.main(["max-features", *common, "--layers", "1", "--iterations", "1"])
    visualize.main(["max-features", *common, "--layers", "8", "--iterations", "1"])
    results = json.loads((out / "base" / "results.json").read_text())
    assert "perturb" in results and "max_class" not in results
    assert sorted(results["max_features"]) == ["1", "8"]
    assert sorted(os.listdir(out / "base")) == ["gradient_image.png", "jittered_images.png",
                                                "max_features_layer1.png", "max_features_layer8.png",
                                                "real_images.png", "results.json"]


@pytest.mark.parametrize("content", ["null", '{"max_features": [2, 8]}', "[1, 2]", "not json"])
def test_results_of_another_shape_are_replaced_like_unreadable_ones(files, tmp_path, capsys, content):
    out = tmp_path / "vis"
    (out / "base").mkdir(parents=True)
    (out / "base" / "results.json").write_text(content)
    visualize.main(["max-features", "--model", str(files / "cifar10.model"), "--name", "base", "--data-dir",
                    str(files / "data"), "--out-dir", str(out), "--device", "cpu", "--layers", "8", "--iterations",
                    "1"])
    assert f"{out / 'base' / 'results.json'} is unreadable; writing a new one" in capsys.readouterr().out
    results = json.loads((out / "base" / "results.json").read_text())
    assert sorted(results) == ["max_features", "model"] and sorted(results["max_features"]) == ["8"]


def one_line_error(done):
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_generator_file_is_refused(files):
    line = one_line_error(run_cli("perturb", "--model", files / "generator.model", "--data-dir", files / "data",
                                  "--device", "cpu", "--out-dir", files / "never"))
    assert "generator" in line and "discriminator" in line
    assert not os.path.exists(files / "never")


def test_missing_model_is_refused(files):
    line = one_line_error(run_cli("perturb", "--model", files / "absent.model", "--data-dir", files / "data",
                                  "--device", "cpu", "--out-dir", files / "never"))
    assert "absent.model does not exist" in line


def test_layer_outside_the_model_is_refused_before_any_work(files):
    out = files / "layers"
    line = one_line_error(run_cli("max-features", "--model", files / "cifar10.model", "--layers", "2", "9",
                                  "--data-dir", files / "nowhere", "--device", "cpu", "--out-dir", out))
    assert "--layers 9" in line and "1..8" in line
    assert not out.exists()


def test_all_with_noise_starts_perturbs_both_and_records_the_settings(files):
    out = files / "noise"
    done = run_cli("all", "--model", files / "cifar10.model", "--data-dir", files / "data", "--out-dir", out,
                   "--device", "cpu", "--iterations", "2", "--start", "noise", "--gradient-scale", "batch",
                   "--layers", "1", "8")
    assert done.returncode == 0, done.stderr
    assert "20 noise images, after the perturbation" in done.stdout
    folder = out / "cifar10"
    for name in ("noise_images.png", "noise_gradient_image.png", "noise_jittered_images.png", "real_images.png",
                 "max_class.png", "max_features_layer8.png"):
        with Image.open(folder / name) as image:
            assert image.width >= 10 * 32, name
    results = json.loads((folder / "results.json").read_text())
    assert results["perturb"]["start"] == "real" and results["perturb_noise"]["start"] == "noise"
    assert results["perturb_noise"]["accuracy_before"] == 1.0  # labelled as the model classifies them
    assert results["perturb"]["gradient_scaling"] == "min-max per batch"
    assert results["max_class"]["start"] == "noise" and results["max_features"]["8"]["start"] == "noise"
    # Ten different noise images: the class images do not share one start.
    assert len(set(results["max_class"]["start_scores"])) > 1


def test_noise_images_are_uniform_in_range_and_repeatable():
    a, b = visualize.noise_images(4, seed=3), visualize.noise_images(4, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.5


def test_a_deep_model_file_goes_through_visualize_and_its_layers(files):
    deep = files / "deep.model"
    torch.manual_seed(0)
    save_model(Discriminator(width=4, arch="deep"), str(deep))
    out = files / "deep-out"
    done = run_cli("max-features", "--model", deep, "--data-dir", files / "data", "--out-dir", out, "--device",
                   "cpu", "--iterations", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "deep" / "results.json").read_text())
    # The assignment's 2 3 4 6 8 of 8 layers, spread over 10.
    assert sorted(results["max_features"], key=int) == ["2", "4", "5", "8", "10"]
    assert results["max_features"]["10"]["features"] == 16  # the last stage has 4 x width channels
    line = one_line_error(run_cli("max-features", "--model", deep, "--layers", "11", "--data-dir", files / "data",
                                  "--device", "cpu", "--out-dir", out))
    assert "1..10" in line
