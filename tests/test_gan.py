"""The GAN's losses and steps against hand computations, and train_gan.py / sample.py through their CLIs."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bench
from conftest import REPO
from models import NOISE_DIM, NUM_CLASSES, Discriminator, Generator
from torch_utils.files import read_metrics
from torch_utils.images import HEADER
import train_gan
from training import gan_steps
from training.checkpoint import load_model


def run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def tiny_nets(width=8):
    torch.manual_seed(0)
    return Generator(width), Discriminator(width)


def test_gradient_penalty_of_a_linear_critic():
    """For D(x) = w.x + b the gradient is w everywhere, so GP = lambda * (|w| - 1)^2."""
    torch.manual_seed(0)
    w = (torch.randn(3 * 32 * 32) * 0.05).requires_grad_(True)
    x_hat = torch.randn(5, 3, 32, 32, requires_grad=True)
    gp, mean_norm = gan_steps.gradient_penalty(x_hat.flatten(1) @ w + 0.3, x_hat, lambda_gp=10.0)
    norm = w.norm().item()
    assert gp.item() == pytest.approx(10.0 * (norm - 1) ** 2, rel=1e-5)
    assert mean_norm.item() == pytest.approx(norm, rel=1e-5)
    # Kept in the graph (create_graph): the critic's update sees d GP / d w = 2 lambda (|w| - 1) w / |w|.
    gp.backward()
    torch.testing.assert_close(w.grad, 2 * 10.0 * (norm - 1) * w.detach() / norm)


def test_discriminator_loss_has_the_five_terms():
    disc = tiny_nets()[1].double()  # float64, so that batched and separate passes agree to rounding
    torch.manual_seed(1)
    real, fake = torch.rand(4, 3, 32, 32).double() * 2 - 1, torch.rand(4, 3, 32, 32).double() * 2 - 1
    y_real, y_fake, alpha = torch.tensor([0, 1, 2, 3]), torch.tensor([9, 8, 7, 6]), torch.rand(4).double()
    loss, monitored = gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha)

    # By hand: three separate forward passes, the penalty from its definition.
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    s_real, c_real = disc(real)
    s_fake, c_fake = disc(fake)
    grad, = torch.autograd.grad(disc(x_hat).score.sum(), x_hat, create_graph=True)
    gp = 10.0 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    expected = s_fake.mean() - s_real.mean() + F.cross_entropy(c_real, y_real) + F.cross_entropy(c_fake, y_fake) + gp
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(monitored) == gan_steps.MONITORED_KEYS
    assert monitored["gp"].item() == pytest.approx(gp.item(), rel=1e-5)
    assert monitored["real_acc"].item() == (c_real.argmax(1) == y_real).float().mean().item()
    assert monitored["fake_score"].item() == pytest.approx(s_fake.mean().item(), rel=1e-5)

    # The gradients match too, the penalty's second-order part included.
    params = list(disc.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, params)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_a_lazy_penalty_is_weighted_k_times_every_k_th_step_and_skipped_between():
    """--gp-every K: the penalty factor is K on batches 0, K, 2K, ... and 0 between; factor K adds K times the
    penalty, factor 0 leaves it out (no penalty pass, no gp or grad_norm monitored); the rest of the loss and its
    monitored values are the same."""
    assert [gan_steps.penalty_factor(b, 3) for b in range(7)] == [3, 0, 0, 3, 0, 0, 3]
    assert [gan_steps.penalty_factor(b, 1) for b in range(3)] == [1, 1, 1]
    disc = tiny_nets()[1].double()
    torch.manual_seed(1)
    real, fake = torch.rand(4, 3, 32, 32).double() * 2 - 1, torch.rand(4, 3, 32, 32).double() * 2 - 1
    y_real, y_fake, alpha = torch.tensor([0, 1, 2, 3]), torch.tensor([9, 8, 7, 6]), torch.rand(4).double()
    results = {k: gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha, penalty_factor=k)
               for k in (0, 1, 4)}
    (plain, without), (one, every), (four, lazy) = results[0], results[1], results[4]
    assert set(without) == gan_steps.MONITORED_KEYS - {"gp", "grad_norm"}
    assert set(every) == set(lazy) == gan_steps.MONITORED_KEYS
    assert lazy["gp"].item() == pytest.approx(every["gp"].item())  # monitored unweighted: comparable across K
    assert one.item() == pytest.approx(plain.item() + every["gp"].item())
    assert four.item() == pytest.approx(plain.item() + 4 * every["gp"].item())


def test_cli_gp_every_trains_and_rejects_zero(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, out, "--epochs", 1, "--gp-every", 4))
    assert result.returncode == 0, result.stderr
    record = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"][0]
    assert record["gp"] > 0 and record["grad_norm"] > 0  # the penalty's batches, averaged
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, tmp_path / "zero", "--gp-every", 0))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --gp-every")


def test_cli_speed_fast_on_the_cpu_is_one_line(tiny_image_folder, tmp_path):
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, tmp_path / "run", "--speed", "fast"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --speed fast needs a CUDA GPU; use --speed plain or auto on the CPU"]


def test_generator_loss_has_the_two_terms():
    gen, disc = tiny_nets()
    z, labels = torch.randn(6, NOISE_DIM), torch.tensor([0, 1, 2, 3, 4, 5])
    fake = gen(z)
    scores, logits = disc(fake)
    expected = -scores.mean() + F.cross_entropy(logits, labels)
    assert gan_steps.generator_loss(disc, fake, labels)[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_matching_adds_the_squared_distance_of_the_mean_features():
    gen, disc = tiny_nets()
    torch.manual_seed(3)
    fake, real, labels = torch.rand(6, 3, 32, 32) * 2 - 1, torch.rand(6, 3, 32, 32) * 2 - 1, torch.arange(6)
    # By hand: the last conv block's output, max-pooled over its 4x4 map, averaged over each batch.
    def pooled(x):
        for block in disc.blocks:
            x = block(x)
        return x.amax((2, 3))
    distance = sum((a - b) ** 2 for a, b in zip(pooled(real).mean(0).tolist(), pooled(fake).mean(0).tolist()))
    plain = gan_steps.generator_loss(disc, fake, labels)[0]
    with_fm = gan_steps.generator_loss(disc, fake, labels, gan_steps.Recipe(feature_matching=0.5), real)[0]
    assert with_fm.item() == pytest.approx(plain.item() + 0.5 * distance, rel=1e-5)
    assert distance > 1e-4


def test_the_recipe_reads_each_field_from_the_flag_of_its_name():
    """What a new loss term needs besides its function: a Recipe field and a train_gan.py flag of the same name."""
    args = train_gan.parse_args(["--lambda-gp", "5", "--feature-matching", "0.25"])
    Recipe = gan_steps.Recipe
    assert Recipe.from_args(args, bf16=True) == Recipe(lambda_gp=5.0, feature_matching=0.25, bf16=True)
    assert Recipe.from_args(train_gan.parse_args([])) == Recipe()  # the flags' defaults are the recipe's


def test_minibatch_discrimination_keeps_real_fake_and_interpolated_apart():
    """With minibatch discrimination, the real images' scores and classes do not depend on the fake batch,
    nor the critic terms on the interpolation."""
    torch.manual_seed(0)
    disc = Discriminator(8, minibatch_kernels=6).double()
    real, y = torch.rand(4, 3, 32, 32).double() * 2 - 1, torch.tensor([0, 1, 2, 3])
    fakes = [torch.rand(4, 3, 32, 32).double() * 2 - 1 for _ in range(2)]
    alphas = [torch.rand(4).double() for _ in range(2)]
    runs = [gan_steps.discriminator_loss(disc, disc, real, y, fake, y, alpha)[1]
            for fake in fakes for alpha in alphas]
    for monitored in runs[1:]:
        for name in ("real_score", "real_ce", "real_acc"):
            assert monitored[name].item() == pytest.approx(runs[0][name].item(), rel=1e-12), name
    # The interpolation changes only the penalty; a new fake batch changes the fake terms.
    assert runs[1]["fake_score"].item() == pytest.approx(runs[0]["fake_score"].item(), rel=1e-12)
    assert runs[1]["gp"].item() != pytest.approx(runs[0]["gp"].item(), rel=1e-6)
    assert runs[2]["fake_score"].item() != pytest.approx(runs[0]["fake_score"].item(), rel=1e-6)


def test_generator_step_leaves_the_discriminator_alone():
    gen, disc = tiny_nets()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.0, 0.9))
    scores, logits = disc(torch.rand(2, 3, 32, 32))
    (scores.sum() + logits.sum()).backward()  # give D gradients that must survive
    d_params = [p.detach().clone() for p in disc.parameters()]
    d_grads = [p.grad.clone() for p in disc.parameters()]
    g_params = [p.detach().clone() for p in gen.parameters()]
    nets = gan_steps.Nets(gen, disc, gen, disc, opt_g, None)
    gan_steps.generator_step(nets, gan_steps.Recipe(), 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(d_params, disc.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, disc.parameters()))
    assert all(p.requires_grad for p in disc.parameters()), "D must be unfrozen again for its own step"
    assert any(not torch.equal(a, p) for a, p in zip(g_params, gen.parameters()))


def test_discriminator_step_does_not_move_the_generator():
    gen, disc = tiny_nets()
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.0, 0.9))
    g_params = [p.detach().clone() for p in gen.parameters()]
    d_params = [p.detach().clone() for p in disc.parameters()]
    real, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([1, 2, 3, 4])
    gan_steps.discriminator_step(gan_steps.Nets(gen, disc, gen, disc, None, opt_d), gan_steps.Recipe(), real, labels,
                           torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(g_params, gen.parameters()))
    assert all(p.grad is None for p in gen.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(d_params, disc.parameters()))


def test_fixed_noise_has_one_hot_labels_in_column_order():
    noise = train_gan.fixed_noise(seed=0)
    assert noise.shape == (100, NOISE_DIM)
    for i in range(100):
        # Grid position i sits in column i % 10: that column's class is one-hot in the first 10 entries.
        assert torch.equal(noise[i, :NUM_CLASSES], F.one_hot(torch.tensor(i % 10), NUM_CLASSES).float())
    assert noise[:, NUM_CLASSES:].std() > 0.5
    assert not torch.equal(noise[0, NUM_CLASSES:], noise[10, NUM_CLASSES:])


def gan_args(data, out, *extra):
    return ["--data-dir", data, "--out-dir", out, "--width", 8, "--batch-size", 32, "--device", "cpu",
            "--limit-test", 40, *extra]


def test_cli_two_epochs_then_resume(tiny_image_folder, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, out, "--epochs", 2))
    assert result.returncode == 0, result.stderr
    grid_side = (10 * (32 + 2) + 2) * 2  # make_grid: 10 cells of 32 px + 2 px padding, shown at 2x
    for name in ("000.png", "001.png"):
        with Image.open(out / "output" / name) as grid:
            assert grid.size == (grid_side, grid_side + HEADER)
    records = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("test_acc", "seconds", "images_per_s", *gan_steps.MONITORED_KEYS):
        assert key in records[0]
    assert load_model(out / "generator.model", "generator").width == 8
    assert load_model(out / "discriminator.model", "discriminator").width == 8
    saved = torch.load(out / "discriminator.model", weights_only=True)
    Discriminator(8).load_state_dict(saved["state_dict"])

    result = run_script("train_gan.py", *gan_args(tiny_image_folder, out, "--epochs", 3, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "epoch 3" in result.stdout
    records = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert sorted(os.listdir(out / "output")) == ["000.png", "001.png", "002.png"]
    ckpt = torch.load(out / "gan.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["batch"] == 0
    assert torch.equal(ckpt["fixed_noise"], train_gan.fixed_noise(0)), "the fixed noise survives the resume"


def test_nan_loss_stops_cleanly_and_keeps_the_checkpoint(tiny_image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train_gan.main(list(map(str, gan_args(tiny_image_folder, out, "--epochs", 1))))
    before = (out / "gan.ckpt").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(gan_steps, "gradient_penalty", lambda score, x, lam: (score.sum() * float("nan"),) * 2)
    with pytest.raises(SystemExit) as exit_info:
        train_gan.main(list(map(str, gan_args(tiny_image_folder, out, "--epochs", 2, "--resume"))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith("error: a loss became NaN or infinite in epoch 2") and "--resume" in message
    assert "Traceback" not in err
    assert (out / "gan.ckpt").read_bytes() == before


def test_sample_writes_a_grid_of_the_asked_classes(tmp_path):
    from training.checkpoint import save_model

    gen = Generator(8)
    save_model(gen, tmp_path / "generator.model")
    result = run_script("sample.py", "--model", tmp_path / "generator.model", "--classes", "cat", "--n", 9,
                        "--output", tmp_path / "cats.png", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cats.png") as grid:
        assert grid.size == ((3 * 34 + 2) * 2, (3 * 34 + 2) * 2 + HEADER)
    result = run_script("sample.py", "--model", tmp_path / "generator.model", "--classes", "2", "ship",
                        "--n", 4, "--output", tmp_path / "two.png", "--device", "cpu")
    with Image.open(tmp_path / "two.png") as grid:
        assert grid.size == ((2 * 34 + 2) * 2, (4 * 34 + 2) * 2 + HEADER)
    result = run_script("sample.py", "--model", tmp_path / "generator.model", "--classes", "kat")
    assert result.returncode == 2 and "unknown class 'kat'" in result.stderr and "Traceback" not in result.stderr


def test_deep_and_minibatch_gan_trains_and_its_files_rebuild(tiny_image_folder, tmp_path):
    out = tmp_path / "deep"
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, out, "--epochs", 1, "--arch", "deep", "--width",
                                                  4, "--minibatch-discrimination", "--feature-matching", 1))
    assert result.returncode == 0, result.stderr
    disc = load_model(out / "discriminator.model", "discriminator")
    assert disc.arch == "deep" and disc.num_layers >= 9 and disc.minibatch is not None
    assert load_model(out / "generator.model", "generator").width == 4
    result = run_script("sample.py", "--model", out / "generator.model", "--classes", "cat", "--n", 4,
                        "--output", tmp_path / "cats.png", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    result = run_script("train_gan.py", *gan_args(tiny_image_folder, out, "--epochs", 2, "--resume", "--width", 4,
                                                  "--minibatch-discrimination", "--feature-matching", 1))
    assert result.returncode == 2 and "--arch deep" in result.stderr and result.stderr.count("\n") == 1


def test_sample_classes_follow_the_labels():
    """The one-hot part of each sample's noise is its class: generating class c twice with the same seed is
    deterministic, and differs from class c + 1 with the same seed."""
    import sample

    gen = Generator(8).eval()
    a = sample.sample(gen, [3], 2, seed=0)
    assert torch.equal(a, sample.sample(gen, [3], 2, seed=0))
    assert not torch.allclose(a, sample.sample(gen, [4], 2, seed=0))


def test_split_penalty_pass_equals_the_one_batch_formulation():
    """The penalty on the interpolated images' own pass gives the loss and gradients of one pass over real,
    fake and interpolated images together (bench.py keeps that formulation as its speed reference)."""

    torch.manual_seed(0)
    disc = Discriminator(8)
    real, fake = torch.rand(6, 3, 32, 32) * 2 - 1, torch.rand(6, 3, 32, 32) * 2 - 1
    y_real, y_fake, alpha = torch.arange(6), torch.arange(6).flip(0), torch.rand(6)
    split, _ = gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha)
    one_batch = bench.one_batch_discriminator_loss(disc, real, y_real, fake, y_fake, alpha, 10.0)
    assert abs(split.item() - one_batch.item()) < 1e-6
    params = list(disc.parameters())
    got = torch.cat([g.flatten() for g in torch.autograd.grad(split, params)])
    want = torch.cat([g.flatten() for g in torch.autograd.grad(one_batch, params)])
    assert (got - want).norm() <= 1e-5 * want.norm()


def test_eval_every_logs_the_measures_without_changing_the_training(tiny_image_folder, tmp_path):
    """Offline: the Inception metrics are reported unavailable in one note, the classifier's measures are
    logged every epoch, and the run trains exactly as one without them."""
    from training.checkpoint import save_model

    torch.manual_seed(0)
    save_model(Discriminator(8), tmp_path / "cifar10.model")
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch-home"))
    no_network = "import socket; socket.socket.connect = lambda *a: (_ for _ in ()).throw(OSError('offline'))"
    command = [sys.executable, "-c", f"{no_network}; import runpy, sys; sys.argv[0] = 'train_gan.py'; "
               f"sys.path.insert(0, {REPO!r}); runpy.run_path({os.path.join(REPO, 'train_gan.py')!r}, "
               "run_name='__main__')"]
    for out, extra in ((plain, []), (measured, ["--eval-every", 1, "--eval-n", 20, "--eval-classifier",
                                                tmp_path / "cifar10.model"])):
        result = subprocess.run(command + list(map(str, gan_args(tiny_image_folder, out, "--epochs", 2, *extra))),
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
    assert "note: Inception Score, FID and KID unavailable" in result.stdout
    evals = [r for r in read_metrics(measured / "gan_metrics.jsonl")[0] if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert 0 <= evals[-1]["class_acc"] <= 1 and len(evals[-1]["spread_ratio_per_class"]) == 10
    assert "inception_unavailable" in evals[-1] and "fid" not in evals[-1]
    events = EventAccumulator(str(measured / "tb" / "gan"))  # the measures in TensorBoard, at each epoch's end
    events.Reload()
    assert [e.value for e in events.Scalars("eval/class_acc")] == pytest.approx([r["class_acc"] for r in evals])
    assert [e.step for e in events.Scalars("per_class/spread_ratio/cat")] == [8, 16]
    a, b = (torch.load(out / "generator.model", weights_only=True)["state_dict"] for out in (plain, measured))
    assert all(torch.equal(a[k], b[k]) for k in a)
