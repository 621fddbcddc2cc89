"""Measuring a generator: Inception Score, FID and KID against real images (through torch-fidelity), and, given a
CIFAR-10 classifier, the share of samples in their intended class, a Frechet distance in the classifier's feature
space and a per-class mode-collapse check. evaluate.py runs it once; train_gan.py --eval-every during training:

    evaluator = build_evaluator(data_dir, device, ...)   # the noise and the real images' features, once
    record = evaluator(generator)                          # a flat dict of the numbers (quality.format_table)
"""
import contextlib
import glob
import hashlib
import os
import sys
import time
import zipfile

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from metrics.inception import HEADLESS, INCEPTION, NO_HEAD, find_weights
from metrics.quality import COLLAPSE_BELOW, MEASURES
from models import NUM_CLASSES, class_noise
from torch_utils.cli import UserError
from torch_utils.files import file_digest
from torch_utils.images import to_unit
from torch_utils.runtime import progress_bar
from training.checkpoint import load_model
from training.data import CLASSES, load_split, to_float

MIN_SAMPLES = 2 * NUM_CLASSES  # the per-class spread needs two samples of every class
# The record's keys of torch-fidelity's results
FIDELITY_KEYS = {"is_mean": torch_fidelity.KEY_METRIC_ISC_MEAN, "is_std": torch_fidelity.KEY_METRIC_ISC_STD,
                 "fid": torch_fidelity.KEY_METRIC_FID, "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
                 "kid_std": torch_fidelity.KEY_METRIC_KID_STD}


# ---------------------------------------------------------------------------------------------------------
# Inception Score, FID and KID through torch-fidelity

def feature_numerics(device):
    """What, beside the images and the weights, changes the features' numbers: the device type and, on CUDA,
    whether convolutions and matmuls may round to TF32 (PyTorch's default for convolutions)."""
    if device.type != "cuda":
        return device.type
    return (f"cuda conv-tf32={torch.backends.cudnn.allow_tf32} "
            f"matmul-tf32={torch.backends.cuda.matmul.allow_tf32}")


class ImageSet(Dataset):
    """uint8 images (N, 3, H, W) as torch-fidelity reads them, counted on a progress bar as they are read."""

    def __init__(self, images, desc, progress):
        self.images, self.desc, self.progress, self.bar = images, desc, progress, None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]

    def __getitems__(self, indices):  # what the DataLoader calls for each batch
        if self.bar is None:
            self.bar = progress_bar(total=len(self), desc=self.desc, enabled=self.progress)
        self.bar.update(len(indices))
        if self.bar.n >= len(self):
            self.bar.close()
        return list(self.images[indices])


def cache_root():
    """torch-fidelity's feature cache, $TORCH_HOME/fidelity_cache, found as torch-fidelity finds it."""
    return os.path.join(torch.hub._get_torch_home(), "fidelity_cache")


def discard_damaged_cache(name):
    """Remove the cached files of the features named name that are damaged (cut short by a kill or a full disk:
    torch-fidelity would stop on them with "PytorchStreamReader failed reading zip archive"), saying so in a
    line, so that their features are extracted again. Removed, not kept aside: a full disk needs the room."""
    for path in sorted(glob.glob(os.path.join(glob.escape(cache_root()), glob.escape(name) + "-*.pt"))):
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save's format: every record's CRC checked
                damaged = archive.testzip() is not None
        except (zipfile.BadZipFile, EOFError, ValueError):
            damaged = True
        if damaged:
            try:
                os.remove(path)
            except OSError as e:
                raise UserError(f"{path} is damaged (cut short?) and cannot be removed ({e.strerror}); delete it, "
                                "or set TORCH_HOME to a folder of your own") from None
            print(f"note: {path} was damaged (cut short?); removed, its features are extracted again",
                  file=sys.stderr)


class InceptionMetrics:
    """Inception Score of generated images and their FID and KID against fixed real images, all three from one
    pass of torch-fidelity's InceptionV3 over the samples; with the headless weights (no classifier layer),
    FID and KID only, and the measures that need the layer noted as unavailable. The real images' features are
    extracted once and cached by torch-fidelity under a name made from the images, the weights and the device's
    numerics, so later calls and later runs only read them back, and other data, weights or numerics never
    reuse them; a cached file found damaged is extracted again.
    reference: uint8 CPU images (N, 3, 32, 32); extractor: a feature extractor registered with torch-fidelity
    (its InceptionV3, or the headless one with headless=True, unless a test asks)."""

    def __init__(self, reference, device, weights=None, batch_size=100, progress=False, extractor=INCEPTION,
                 reference_name="train split", headless=False):
        self.device, self.progress, self.head = device, progress, not headless
        extractor = HEADLESS if headless else extractor
        self.description = f"CIFAR-10 {reference_name}, {len(reference)} images"
        key = hashlib.sha1(reference.contiguous().numpy())
        key.update(f"{extractor} {file_digest(weights, 'sha1') if weights else ''} {feature_numerics(device)}".encode())
        name = f"cifar10-{key.hexdigest()[:20]}"
        discard_damaged_cache(name)
        self.reference = ImageSet(reference, f"Inception features of the {reference_name}", progress)
        self.options = dict(feature_extractor=extractor, feature_extractor_weights_path=weights,
                            cuda=device.type == "cuda", batch_size=batch_size, save_cpu_ram=True, verbose=False,
                            input2=self.reference, input2_cache_name=name, cache_root=cache_root())
        # Fill the cache now with the features of every layer the metrics use (ISC's logits, and the pool features
        # that a token one-subset KID asks for without FID's costly matrix square root), and measure the real
        # images' own Inception Score: the level a generator can reach.
        real = self.calculate(self.reference, isc=self.head, kid=True, kid_subsets=1, kid_subset_size=2,
                              input1_cache_name=name)
        self.reference_is = real[torch_fidelity.KEY_METRIC_ISC_MEAN] if self.head else None

    def calculate(self, images, **metrics):
        """torch-fidelity's metrics of images (an ImageSet) against the reference, on this device."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            return torch_fidelity.calculate_metrics(input1=images, **self.options, **metrics)

    def __call__(self, images):
        """The metrics of uint8 images (N, 3, 32, 32)."""
        m = self.calculate(ImageSet(images, "Inception features", self.progress), isc=self.head, fid=True, kid=True,
                           kid_subset_size=min(1000, len(images), len(self.reference)))
        record = {"inception_reference": self.description,
                  **{key: m[name] for key, name in FIDELITY_KEYS.items() if name in m}}
        if self.head:
            record["reference_is_mean"] = self.reference_is
        else:
            record.update({measure.unavailable: NO_HEAD for measure in MEASURES if measure.needs_head})
        return record


# ---------------------------------------------------------------------------------------------------------
# What a CIFAR-10 classifier says of the samples

def feature_spread(features):
    """Root mean squared distance of feature vectors (N, D) from their mean."""
    return (features - features.mean(0)).pow(2).sum(1).mean().sqrt().item()


def frechet_distance(features, statistics):
    """torch-fidelity's Frechet distance between feature vectors (N, D) and the statistics of another set."""
    return fid_statistics_to_metric(fid_features_to_statistics(features), statistics, verbose=False)[KEY_METRIC_FID]


class ClassifierMetrics:
    """A CIFAR-10 classifier (a Discriminator: the baseline's cifar10.model or a GAN's discriminator) on generated
    images: the share it puts in their intended class (the AC-GAN paper's measure), the Frechet distance of their
    pooled last-layer features from the real test images', and per class the spread of those features relative
    to the real images' (near 1 is healthy; mode collapse shows as a spread far below 1)."""

    def __init__(self, classifier, images, labels, batch_size=100, progress=False):
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        if counts.min() < 2:
            raise UserError(f"the test split has {counts.min().item()} image(s) of "
                            f"{CLASSES[counts.argmin()]}; the collapse check needs at least 2 of every class")
        self.classifier, self.batch_size, self.progress = classifier.eval(), batch_size, progress
        self.description = f"CIFAR-10 test split, {len(labels)} images"
        features, _ = self.features(images, "classifier features of the test split", predict=False)
        self.real_statistics = fid_features_to_statistics(features)
        self.real_spread = [feature_spread(features[labels == c]) for c in range(NUM_CLASSES)]

    @torch.no_grad()
    def features(self, images, desc, predict=True):
        """(pooled features of the last conv layer (N, width) float64, predicted classes (N,) or None) of uint8
        images, on the CPU."""
        device = next(self.classifier.parameters()).device
        layer = len(self.classifier.blocks)
        features, predicted = [], []
        for start in progress_bar(range(0, len(images), self.batch_size), -(-len(images) // self.batch_size),
                                  desc, self.progress):
            x = to_float(images[start:start + self.batch_size].to(device))
            features.append(self.classifier(x, extract_features=layer).double().cpu())
            if predict:
                predicted.append(self.classifier(x).logits.argmax(1).cpu())
        return torch.cat(features), torch.cat(predicted) if predict else None

    def __call__(self, images, labels):
        """The measures of generated uint8 images meant to show the given classes."""
        features, predicted = self.features(images, "classifier features")
        correct = (predicted == labels).double()
        ratios = [feature_spread(features[labels == c]) / self.real_spread[c] for c in range(NUM_CLASSES)]
        return {"classifier_reference": self.description,
                "class_acc": correct.mean().item(),
                "class_acc_per_class": [correct[labels == c].mean().item() for c in range(NUM_CLASSES)],
                "classifier_fd": frechet_distance(features, self.real_statistics),
                "spread_ratio_per_class": ratios,
                "collapsed_classes": [CLASSES[c] for c, r in enumerate(ratios) if r < COLLAPSE_BELOW]}


# ---------------------------------------------------------------------------------------------------------
# The evaluator: fixed noise, then the measures above

class Evaluator:
    """Measures a generator on n class-balanced samples from fixed noise. Everything that does not depend on the
    generator (the noise, the real images' features, the classifier) is prepared once, so a call costs only the
    sampling and the passes over the samples; between calls it holds no network but the classifier.
    inception_note: a line to say once about the Inception measures (why they are unavailable, or which are)."""

    def __init__(self, device, n=10000, seed=0, inception=None, inception_note=None, classifier=None,
                 batch_size=100, progress=False):
        self.device, self.n, self.seed, self.batch_size, self.progress = device, n, seed, batch_size, progress
        self.inception, self.inception_note, self.classifier = inception, inception_note, classifier
        self.labels = torch.arange(n) % NUM_CLASSES
        # Drawn on the CPU, then moved: one seed gives the same samples on every device.
        self.noise = class_noise(self.labels, torch.Generator().manual_seed(seed)).to(device)

    @torch.no_grad()
    def sample(self, generator):
        """uint8 images (n, 3, 32, 32) on the CPU, quantized as a saved PNG would be."""
        images = []
        for start in progress_bar(range(0, self.n, self.batch_size), -(-self.n // self.batch_size), "sampling",
                                  self.progress):
            x = generator(self.noise[start:start + self.batch_size])
            images.append(to_unit(x).mul(255).round().to(torch.uint8).cpu())
        return torch.cat(images)

    def __call__(self, generator):
        """A flat dict of plain values (one JSON line) measuring the generator (a plain module on this device),
        which is sampled in eval mode and left in the mode it came in. The global random state is left as it
        was (torch-fidelity's data loader draws a seed from it), so a training run evaluated along the way
        trains as it would without."""
        start = time.perf_counter()
        was_training = generator.training
        try:
            with self.random_state_kept():
                record = self.measure(self.sample(generator.eval()), {"n": self.n, "seed": self.seed})
        finally:
            generator.train(was_training)
        record["eval_seconds"] = round(time.perf_counter() - start, 2)
        return record

    def random_state_kept(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def measure(self, images, record):
        """record with the measures of n uint8 images (n, 3, 32, 32) of the classes self.labels."""
        if self.inception is not None:
            record.update(self.inception(images))
        elif self.inception_note is not None:
            record["inception_unavailable"] = self.inception_note
        if self.classifier is not None:
            record.update(self.classifier(images, self.labels))
        return record

    def measure_real(self, images, labels, what):
        """The record of n real images, the first n/10 of each class, in place of samples: the level that a
        generator indistinguishable from them reaches. what: where they come from ("CIFAR-10 test split")."""
        start = time.perf_counter()
        per_class = self.n // NUM_CLASSES
        if per_class * NUM_CLASSES != self.n:
            raise UserError(f"--n must be a multiple of {NUM_CLASSES} to measure real images, got {self.n}")
        picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(NUM_CLASSES)]
        fewest = min(range(NUM_CLASSES), key=lambda c: len(picks[c]))
        if len(picks[fewest]) < per_class:
            raise UserError(f"--n {self.n} needs {per_class} images of every class; the {what} has "
                            f"{len(picks[fewest])} of {CLASSES[fewest]}")
        order = torch.stack(picks, 1).flatten()  # class 0, 1, ..., 9, 0, 1, ...: as self.labels
        samples = f"{what}, the first {per_class} images of each class (real images, no generator)"
        with self.random_state_kept():
            record = self.measure(images[order], {"n": self.n, "samples": samples})
        record["eval_seconds"] = round(time.perf_counter() - start, 2)
        return record


def build_evaluator(data_dir, device, n=10000, seed=0, classifier_path=None, inception_weights_path=None,
                    batch_size=100, progress=False, reference_n=None):
    """An Evaluator of CIFAR-10 from data_dir: the Inception metrics against the train split (reference_n images
    of it, or all) when the weights are at hand (otherwise a note says why not), and with classifier_path that
    classifier's measures against the test split."""
    if not MIN_SAMPLES <= n <= 1_000_000:
        raise UserError(f"--n must be in [{MIN_SAMPLES}, 1000000] (two samples per class or more), got {n}")
    if not 1 <= batch_size <= 10_000:
        raise UserError(f"--batch-size must be in [1, 10000], got {batch_size}")
    if not 0 <= seed < 2 ** 63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")
    if reference_n is not None and reference_n < 2:
        raise UserError(f"--reference-n must be 2 or more, got {reference_n}")
    # The quick checks of the files first, then the passes over the real images.
    model = None if classifier_path is None else load_model(classifier_path, "discriminator", device)
    weights, headless, note = find_weights(inception_weights_path, progress)
    classifier = None
    if model is not None:
        classifier = ClassifierMetrics(model, *load_split(data_dir, "test"), batch_size, progress)
    inception = None
    if weights is not None:
        inception = InceptionMetrics(load_split(data_dir, "train", reference_n)[0], device, weights, batch_size,
                                     progress, headless=headless)
        lacking = ", ".join(m.title for m in MEASURES if m.needs_head)
        note = f"{lacking} unavailable: {NO_HEAD}" if headless else None
    return Evaluator(device, n, seed, inception, note, classifier, batch_size, progress)
