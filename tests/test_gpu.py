"""The CUDA paths, on a GPU: python -m pytest -m gpu tests (each test skips without CUDA; meant to take under a
minute on one GPU, not yet timed on one).

Both trainers a few batches in fp32 and bf16; a CUDA step's losses and gradients against the CPU's; resuming
across devices both ways; the split penalty against the one-batch one; visualize.py, sample.py, evaluate.py and
bench.py on cuda; torchrun with NCCL when there are two GPUs.

Most of a script's time here is its start (Python, CUDA, cuDNN's autotuning), so each script run is started once
and all of them side by side: a function registered with @background("name") is a run, the fixture `runs`
starts every one in a thread of its own, each with a fresh folder, when the first test that reads one begins,
and runs["name"] waits for that one only; the in-process checks go on meanwhile. A run serves several checks
where it can: the GAN's fp32 run on cuda is a trainer check and the first half of resuming on the CPU. A new
check of a script: register its run, and read runs["name"] in its test. Runs inherit the environment of the
moment they start: a test that changes it (monkeypatch.setenv) may reach them.

Tolerances, CUDA against the CPU on the same weights and batch: with TF32 off, losses within 1e-4 relative and
each parameter's gradient within 1e-3 of its norm (summation order differs); with TF32 on (PyTorch's default for
convolutions: inputs rounded to 10 bits of mantissa), losses within 1e-2 and gradients of cosine above 0.99.
"""
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import bench
from conftest import REPO, write_image_folder
from metrics import measures
from models import Discriminator, Generator, class_noise
import sample
from test_evaluate import class_images, inception_weights, run_offline  # noqa: F401 (a fixture)
from torch_utils.files import read_metrics, torch_bytes
from training import gan_steps
from training.checkpoint import save_model
from training.data import load_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
BF16 = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
PRECISIONS = ["fp32"] + (["bf16"] if BF16 else [])
TRAINERS = {"baseline": ("train_baseline.py", "baseline_metrics.jsonl"), "gan": ("train_gan.py", "gan_metrics.jsonl")}
BACKGROUND = {}  # name: function(runs, out) of each run (see background)


def python(script, *args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kwargs)


def torchrun(script, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def trainer_args(data, out, device, *extra):
    return ["--data-dir", data, "--out-dir", out, "--device", device, "--width", 16, "--batch-size", 32,
            "--limit-test", 50, *extra]


def background(name):
    """Register function(runs, out) as the run `name`: it runs in the folder out, reads the others' results as
    runs[other], and returns what its tests check."""
    def register(function):
        BACKGROUND[name] = function
        return function
    return register


class Runs:
    """The registered runs, each started once in a thread of pool; runs[name] waits for one and returns its
    result, or raises its error. Also what a run gets: data (conftest's data_dir) and models (the fixture)."""

    def __init__(self, pool, data, models, root):
        self.data, self.models = data, models
        self._submitted, self._futures = threading.Event(), {}
        for name, function in BACKGROUND.items():
            out = root / name.replace(" ", "_")
            out.mkdir()
            self._futures[name] = pool.submit(function, self, out)
        self._submitted.set()  # a run that reads another may start before the other is submitted

    def __getitem__(self, name):
        self._submitted.wait()
        return self._futures[name].result()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_image_folder(root / "data", train_per_class=2, test_per_class=10)
    for split in ("train", "test"):
        load_split(root / "data", split)  # the image caches, before the scripts that read them start side by side
    torch.manual_seed(0)
    save_model(Discriminator(16), root / "cifar10.model")
    save_model(Generator(16), root / "generator.model")
    return root


@pytest.fixture(scope="module")
def runs(data_dir, models, tmp_path_factory):
    # Every run has a thread, so that one waiting for another never holds up a third
    with ThreadPoolExecutor(max_workers=len(BACKGROUND)) as pool:
        yield Runs(pool, data_dir, models, tmp_path_factory.mktemp("runs"))


def train_on_cuda(script, precision, runs, out):
    return python(script, *trainer_args(runs.data, out, "cuda", "--epochs", 1, "--precision", precision)), out


BACKGROUND.update({f"{job} {precision}": functools.partial(train_on_cuda, script, precision)
                   for job, (script, _) in TRAINERS.items() for precision in PRECISIONS})


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not BF16, reason="bf16 needs compute capability 8.0"))])
@pytest.mark.parametrize("job", list(TRAINERS))
def test_trainers_run_on_cuda(runs, job, precision):
    result, out = runs[f"{job} {precision}"]
    assert result.returncode == 0, result.stderr[-3000:]
    record = [r for r in read_metrics(out / TRAINERS[job][1])[0] if r.get("type", "epoch") == "epoch"][-1]
    assert record["epoch"] == 1 and 0 <= record["test_acc"] <= 1 and record["images_per_s"] > 0


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def losses_and_gradients(device, tf32):
    """The discriminator loss, the baseline's loss and the generator loss with their gradients, on one device
    from the same weights and batches."""
    torch.manual_seed(0)
    disc, gen = Discriminator(16).to(device), Generator(16).to(device)
    (real, y_real), (fake, y_fake) = (tuple(t.to(device) for t in batch(16, s)) for s in (1, 2))
    alpha = torch.rand(16, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
        d_loss, _ = gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha)
        c_loss = F.cross_entropy(disc(real).logits, y_real)
        z = class_noise(y_fake.cpu(), torch.Generator().manual_seed(4)).to(device)
        g_loss, _ = gan_steps.generator_loss(disc, gen(z), y_fake)
        results = []
        for loss, net in ((d_loss, disc), (c_loss, disc), (g_loss, gen)):
            grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True, allow_unused=True)
            results.append((loss.item(), [None if g is None else g.cpu() for g in grads]))
    return results


@pytest.mark.parametrize("tf32", [False, True])
def test_a_cuda_step_follows_the_cpu(tf32):
    for (cpu_loss, cpu_grads), (cuda_loss, cuda_grads) in zip(losses_and_gradients(CPU, False),
                                                              losses_and_gradients(CUDA, tf32)):
        assert cuda_loss == pytest.approx(cpu_loss, rel=1e-2 if tf32 else 1e-4)
        total = torch.cat([a.flatten() for a in cpu_grads if a is not None]).norm()
        for a, b in zip(cpu_grads, cuda_grads):
            if a is None or a.norm() < 1e-4 * total:
                continue  # unused (fc1 in the baseline's loss) or zero in theory (a conv bias before batch norm)
            if tf32:
                assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
            else:
                assert (a - b).norm() <= 1e-3 * a.norm()


def test_adam_state_moves_between_devices_and_steps():
    """The unit behind resuming across devices: a CPU optimizer's state into a fused CUDA Adam, and back, through
    a checkpoint's bytes read to the CPU, as checkpoint.load_checkpoint reads them."""
    from training.optim import adam, load_optimizer

    for source, target in ((CPU, CUDA), (CUDA, CPU)):
        params = [torch.nn.Parameter(torch.randn(5, 3, device=source))]
        optimizer = adam(params, 1e-3, (0.0, 0.9), source)
        params[0].sum().backward()
        optimizer.step()
        moved = [torch.nn.Parameter(params[0].detach().to(target))]
        resumed = adam(moved, 1e-3, (0.0, 0.9), target)
        load_optimizer(resumed, torch.load(io.BytesIO(torch_bytes(optimizer.state_dict())), map_location="cpu",
                                           weights_only=True), target)
        moved[0].sum().backward()
        resumed.step()
        assert {t.device for t in resumed.state[moved[0]].values()} == {moved[0].device}
        assert resumed.state[moved[0]]["step"].item() == 2


def resume_gan(runs, out, device):
    return python("train_gan.py", *trainer_args(runs.data, out, device, "--epochs", 2, "--resume"))


@background("gan cpu then cuda")
def gan_cpu_then_cuda(runs, out):
    """A GAN run's first epoch on the CPU, the second resumed on cuda; the results of the runs made."""
    first = python("train_gan.py", *trainer_args(runs.data, out, "cpu", "--epochs", 1))
    return [first] + ([resume_gan(runs, out, "cuda")] if first.returncode == 0 else []), out


@background("gan cuda then cpu")
def gan_cuda_then_cpu(runs, out):
    """The GAN's fp32 run on cuda (a trainer check's), resumed for a second epoch on the CPU in a copy of its
    folder."""
    first, first_out = runs["gan fp32"]
    if first.returncode != 0:
        return [first], out
    shutil.copytree(first_out, out, dirs_exist_ok=True)
    return [first, resume_gan(runs, out, "cpu")], out


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_gan_run_resumes_on_the_other_device(runs, first, then):
    results, out = runs[f"gan {first} then {then}"]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(results) == 2 and "resuming" in results[1].stdout
    assert torch.load(out / "gan.ckpt", weights_only=True)["epoch"] == 2


def test_split_penalty_equals_one_batch_on_cuda():
    torch.manual_seed(0)
    disc = Discriminator(16).to(CUDA)
    (real, y_real), (fake, y_fake) = (tuple(t.to(CUDA) for t in batch(16, s)) for s in (5, 6))
    alpha = torch.rand(16, device=CUDA)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        split, _ = gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha)
        split_grads = torch.autograd.grad(split, list(disc.parameters()))
        one = bench.one_batch_discriminator_loss(disc, real, y_real, fake, y_fake, alpha, 10.0)
        one_grads = torch.autograd.grad(one, list(disc.parameters()))
    assert split.item() == pytest.approx(one.item(), rel=1e-5)
    for a, b in zip(one_grads, split_grads):
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-7


@background("visualize")
def visualize_on_cuda(runs, out):
    return python("visualize.py", "all", "--model", runs.models / "cifar10.model", "--data-dir",
                  runs.models / "data", "--out-dir", out, "--device", "cuda", "--iterations", 2), out


def test_visualize_on_cuda(runs):
    result, out = runs["visualize"]
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "cifar10" / "results.json").read_text())
    assert 0 <= results["perturb"]["accuracy_after"] <= 1 and len(results["max_class"]["final_scores"]) == 10


@background("sample")
def sample_on_cuda(runs, out):
    return python("sample.py", "--model", runs.models / "generator.model", "--device", "cuda", "--n", 3,
                  "--output", out / "samples.png"), out


def test_sample_on_cuda_draws_what_the_cpu_draws(runs):
    result, out = runs["sample"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "samples.png").stat().st_size > 0
    torch.manual_seed(0)
    gen = Generator(16).eval()
    on_cpu = sample.sample(gen, [0, 3, 9], 3, seed=5)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_cuda = sample.sample(gen.to(CUDA), [0, 3, 9], 3, seed=5).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=0, atol=1e-4)


@background("evaluate")
def evaluate_on_cuda(runs, out):
    models = runs.models
    return run_offline(out, "--generator", models / "generator.model", "--data-dir", models / "data", "--device",
                       "cuda", "--classifier", models / "cifar10.model", "--n", 20, "--output", out / "eval.json"), out


def test_evaluate_on_cuda(runs):
    result, out = runs["evaluate"]
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "eval.json").read_text())
    assert record["n"] == 20 and 0 <= record["class_acc"] <= 1


def test_inception_metrics_on_cuda_match_the_cpu(inception_weights, tmp_path, monkeypatch):  # noqa: F811
    """torch-fidelity's InceptionV3 on cuda (random weights of its format): the numbers of the CPU, each device
    with its own feature cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = class_images(1, seed=2)[0]
    shifted = (reference.int() + 60).clamp(0, 255).to(torch.uint8)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_cpu = measures.InceptionMetrics(reference, CPU, inception_weights, batch_size=5)(shifted)
        cuda = measures.InceptionMetrics(reference, CUDA, inception_weights, batch_size=5)
        on_cuda = cuda(shifted)
    assert cuda.reference.bar is not None, "the CUDA features were computed, not read from the CPU's cache"
    for key, rel in (("is_mean", 1e-3), ("kid_mean", 1e-3), ("fid", 1e-2)):  # FID: a matrix square root
        assert on_cuda[key] == pytest.approx(on_cpu[key], rel=rel, abs=1e-4), key


@background("bench")
def bench_on_cuda(runs, out):
    """bench.py's every path, tiny: at the assignment's size it is check_gpu.py's first step."""
    return python("bench.py", "--device", "cuda", "--width", 16, "--batch-size", 32, "--steps", 2, "--warmup", 5,
                  "--rounds", 1)


def test_bench_on_cuda_times_both_paths(runs):
    result = runs["bench"]
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("baseline_plain", "gan_plain", "baseline_fp32", "gan_fp32", "gan_fast_vs_fp32", "gan_graphs",
                "gan_triton_ln", "gan_gradfix", "gan_channels_last",
                *(("baseline_bf16_vs_fp32", "gan_fast_bf16") if BF16 else ())):  # bench.py's bf16 paths: BF16 only
        assert results[key] > 0


def torchrun_on_two_gpus(script, runs, out):
    return torchrun(script, *trainer_args(runs.data, out, "cuda", "--epochs", 1)), out


if TWO_GPUS:
    BACKGROUND.update({f"torchrun {job}": functools.partial(torchrun_on_two_gpus, script)
                       for job, (script, _) in TRAINERS.items()})


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
@pytest.mark.parametrize("job", list(TRAINERS))
def test_torchrun_with_nccl_on_two_gpus(runs, job):
    result, out = runs[f"torchrun {job}"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / f"{job}.ckpt", weights_only=True)["epoch"] == 1
