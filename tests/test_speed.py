"""bf16 autocast (--precision bf16) against the fp32 path, bench.py, and the operations per iteration.

CPU autocast runs bf16 too, so the numerics are checked here. From the same weights and batch, losses agree
within 3%, and gradients point the same way: cosine similarity above 0.9 for the whole gradient and above
0.8 for each parameter. bf16 keeps 8 bits of mantissa; measured at width 16: baseline and discriminator
gradients 0.99 as a whole (0.96 for the worst parameter), the generator's 0.94 (0.87): the generator runs
in fp32, but its gradient comes back through every layer of the bf16 discriminator. Parameters whose fp32
gradient is zero in theory (a conv bias before batch norm, fc1's bias in the critic's score difference) are
skipped.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
from conftest import REPO
from models import Discriminator, Generator
from torch_utils.runtime import Runtime
from training import baseline_step
from training import gan_steps

LOSS_RTOL = 3e-2
MIN_COSINE = 0.8
MIN_TOTAL_COSINE = 0.9
ZERO_GRAD = 1e-5


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def assert_close_gradients(fp32, bf16):
    grads = []
    for (name, a), b in zip(fp32.named_parameters(), bf16.parameters()):
        if a.grad is None or a.grad.abs().max() < ZERO_GRAD:
            continue
        cosine = F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0).item()
        assert cosine > MIN_COSINE, f"{name}: cosine {cosine:.4f}"
        grads.append((a.grad.flatten(), b.grad.flatten()))
    total = F.cosine_similarity(torch.cat([a for a, _ in grads]), torch.cat([b for _, b in grads]), dim=0).item()
    assert total > MIN_TOTAL_COSINE, f"whole gradient: cosine {total:.4f}"


def twins(cls, width=16):
    torch.manual_seed(0)
    fp32 = cls(width)
    bf16 = cls(width)
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16


def test_baseline_step_bf16_matches_fp32():
    fp32, bf16 = twins(Discriminator)
    x, y = batch()
    losses = []
    for model, use_bf16 in ((fp32, False), (bf16, True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights; look at the gradients
        losses.append(baseline_step.train_step(model, optimizer, x, y, use_bf16)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    assert_close_gradients(fp32, bf16)


def test_discriminator_loss_bf16_matches_fp32():
    fp32, bf16 = twins(Discriminator)
    real, y_real = batch(seed=1)
    fake, y_fake = batch(seed=2)
    alpha = torch.rand(16, generator=torch.Generator().manual_seed(3))
    results = []
    for model, use_bf16 in ((fp32, False), (bf16, True)):
        with gan_steps.autocast(real.device, use_bf16):
            loss, monitored = gan_steps.discriminator_loss(model, model, real, y_real, fake, y_fake, alpha)
        loss.backward()
        results.append((loss.item(), monitored))
    assert results[1][0] == pytest.approx(results[0][0], rel=LOSS_RTOL)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=LOSS_RTOL, atol=2e-2, msg=name)
    assert_close_gradients(fp32, bf16)


def test_generator_loss_bf16_matches_fp32():
    gen_fp32, gen_bf16 = twins(Generator)
    disc = Discriminator(16)
    losses = []
    for gen, use_bf16 in ((gen_fp32, False), (gen_bf16, True)):
        optimizer = torch.optim.SGD(gen.parameters(), lr=0.0)  # keep the weights; look at the gradients
        nets = gan_steps.Nets(gen, disc, gen, disc, optimizer, None)
        rng = torch.Generator().manual_seed(4)
        monitored = gan_steps.generator_step(nets, gan_steps.Recipe(bf16=use_bf16), 16, rng)
        losses.append(monitored["g_loss"].item())
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    assert_close_gradients(gen_fp32, gen_bf16)


def run_bench(*args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_on_cpu_prints_a_table_and_json():
    stdout, results = run_bench("--device", "cpu", "--width", "8", "--batch-size", "8", "--steps", "2",
                                "--warmup", "1", "--rounds", "2")
    assert "baseline img/s" in stdout and "old-ops" in stdout and "operations per iteration, gan fp32" in stdout
    assert results["device"] == "cpu" and results["width"] == 8
    assert results["paths"] == ["fp32", "gradfix", "old-ops", "one-batch"]  # the CPU's: no CUDA-only path
    assert results["baseline_fp32"] > 0 and results["gan_fp32"] > 0
    assert "baseline_old_ops" not in results and results["gan_old_ops_vs_fp32"] > 0  # no second derivative there
    assert results["gan_one_batch_vs_fp32"] == pytest.approx(results["gan_one_batch"] / results["gan_fp32"])
    assert results["ops"]["gan_fp32"]["total"] < results["ops"]["gan_old_ops"]["total"]
    # The penalty's first-order pass computes no weight gradient with gradfix: fewer operations, not more
    assert results["ops"]["gan_gradfix"]["discriminator step"] < results["ops"]["gan_fp32"]["discriminator step"]
    # A GAN iteration costs several baseline steps (G and D forward and backward, D on three batches with a
    # double backward).
    assert results["gan_fp32"] < results["baseline_fp32"]


# ---------------------------------------------------------------------------------------------------------
# Operations per iteration: on a GPU each is a kernel launch. The counts do not depend on width or batch size.

def test_the_counter_counts_kernels_not_views_or_allocations():
    x = torch.ones(4, 4)

    def some_ops():
        x.view(16), x.t(), x[1:], x.expand(2, 4, 4), x.detach(), torch.empty(3)  # no kernel
        (x + 1).sum()  # two

    assert bench.count_ops([("ops", some_ops)]) == {"ops": 2, "total": 2}


def phase_ops(build, **options):
    torch.manual_seed(0)
    phases = build(Runtime("cpu"), 4, 4, True, False, **options)
    bench.run_phases(phases)  # the first step creates the optimizer's state
    return bench.count_ops(phases)


@pytest.mark.parametrize("build, target", [(bench.baseline_step, 150), (bench.gan_iteration, 700)])
def test_operations_per_iteration_meet_the_targets(build, target):
    """The issue's targets, with the fused Adam of CUDA. Before, this counter gave 216 per baseline step and
    1,113 per GAN iteration (the augmentation 144, the discriminator step 811)."""
    counts = phase_ops(build)
    assert counts["total"] <= target
    assert counts["augmentation"] <= 50


def test_the_compact_layer_norm_second_derivative_saves_operations_over_nn_layer_norms():
    """old-ops, nn.LayerNorm's own autograd, against today's: the penalty's LayerNorms in the discriminator step."""
    new, before = phase_ops(bench.gan_iteration), phase_ops(bench.gan_iteration, old=True)
    assert new["total"] <= 700 < before["total"]
    assert new["discriminator step"] <= before["discriminator step"] - 300
    assert {k: v for k, v in new.items() if k not in ("discriminator step", "total")} == \
        {k: v for k, v in before.items() if k not in ("discriminator step", "total")}


def test_bench_profile_on_cpu_prints_the_phases_and_writes_a_chrome_trace(tmp_path):
    stdout, results = run_bench("--device", "cpu", "--width", "8", "--batch-size", "8", "--steps", "1", "--warmup",
                                "1", "--rounds", "1", "--paths", "fp32", "--profile", "--profile-steps", "1",
                                "--profile-top", "100", "--trace-dir", str(tmp_path))
    profiled = results["profile"]["gan_fp32"]
    # Every phase of the GAN iteration is a range of its own
    for phase in ("augmentation", "generator step", "discriminator forward (real + fake)", "penalty gradient",
                  "discriminator backward", "optimizer"):
        assert profiled["phases_ms"][phase] > 0, phase
        assert phase in stdout
    assert profiled["phases_ms"]["discriminator step"] > profiled["phases_ms"]["penalty gradient"]
    assert 0 < profiled["top"][0]["share"] <= 1 and profiled["top"][0]["calls"] >= 1
    # The shares are of the kernel time: the top one's time over its share gives it back
    top = profiled["top"][0]
    assert top["mean_us"] * top["calls"] / 1000 / top["share"] == pytest.approx(profiled["kernel_ms"], rel=1e-6)
    assert any(c["op"] == "aten::convolution" and "[8, 3, 32, 32]" in c["shapes"] for c in profiled["convolutions"])
    with open(profiled["trace"]) as f:
        trace = json.load(f)
    assert any(event.get("name") == "penalty gradient" for event in trace["traceEvents"])
    assert sorted(os.listdir(tmp_path)) == ["baseline_fp32.json", "gan_fp32.json"]


def test_bench_refuses_a_path_this_device_does_not_run():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--device", "cpu", "--paths", "fp32,fast"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --paths: 'fast' is not a path on this device; choose from fp32, gradfix, old-ops, one-batch"]
