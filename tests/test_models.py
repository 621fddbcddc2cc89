"""The networks against the assignment's tables (shapes, parameter counts), the deep preset, feature
extraction, rebuilding from model.config, independence of the discriminator's samples, minibatch
discrimination against a hand computation and its groups, and the generator's class-conditioned noise."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from torch_utils.ops import layer_norm

WIDTH = 16  # small nets for speed; the parameter-count tests use the assignment's 196


def conv_params(c_in, c_out, kernel):
    return c_in * c_out * kernel * kernel + c_out  # weights + bias


def disc_params_from_table(w):
    """The assignment's discriminator table: 8 convs (k3, bias) each with a LayerNorm over (C, H, W) of its output
    (weight + bias per element), then fc1 and fc10."""
    rows = [(3, w, 32), (w, w, 16), (w, w, 16), (w, w, 8), (w, w, 8), (w, w, 8), (w, w, 8), (w, w, 4)]
    convs = sum(conv_params(c_in, c_out, 3) for c_in, c_out, _ in rows)
    layer_norms = sum(2 * c_out * side * side for _, c_out, side in rows)
    heads = (w * 1 + 1) + (w * 10 + 10)
    return convs + layer_norms + heads


def gen_params_from_table(w):
    """The assignment's generator table: fc1 100 -> w*4*4 with BatchNorm1d, transposed convs k4 (conv1, conv5, conv7),
    convs k3 (conv2, conv3, conv4, conv6) each with BatchNorm2d (weight + bias per channel), conv8 w -> 3."""
    fc1 = 100 * w * 16 + w * 16
    batch_norm_1d = 2 * w * 16
    transposed = 3 * conv_params(w, w, 4)
    convs = 4 * conv_params(w, w, 3)
    batch_norm_2d = 7 * 2 * w
    conv8 = conv_params(w, 3, 3)
    return fc1 + batch_norm_1d + transposed + convs + batch_norm_2d + conv8


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_at_width_196_match_the_assignment_tables():
    assert disc_params_from_table(196) == 3_137_971
    assert gen_params_from_table(196) == 3_559_363
    assert count(models.Discriminator(196)) == 3_137_971
    assert count(models.Generator(196)) == 3_559_363


def test_parameter_counts_follow_the_tables_at_another_width():
    assert count(models.Discriminator(WIDTH)) == disc_params_from_table(WIDTH)
    assert count(models.Generator(WIDTH)) == gen_params_from_table(WIDTH)


def conv_output_shapes(model, x):
    """(channels, height, width) of every conv / transposed conv output, in the order they run."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape[1:])))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def test_discriminator_heads_and_layer_sizes():
    d = models.Discriminator(WIDTH)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    score, logits = d(x)
    assert score.shape == (5, 1) and logits.shape == (5, 10)
    sides = [32, 16, 16, 8, 8, 8, 8, 4]
    assert conv_output_shapes(d, x) == [(WIDTH, s, s) for s in sides]


def test_discriminator_has_no_batch_norm():
    d = models.Discriminator(WIDTH)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert sum(isinstance(m, nn.LayerNorm) for m in d.modules()) == 8


def test_generator_output_and_layer_sizes():
    g = models.Generator(WIDTH)
    z = models.class_noise(torch.arange(10))
    sides = [8, 8, 8, 8, 16, 16, 32, 32]
    assert conv_output_shapes(g, z) == [(WIDTH, s, s) for s in sides[:-1]] + [(3, 32, 32)]
    images = g(z)
    assert images.shape == (10, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1  # tanh


DEEP_WIDTH = 8  # the deep preset's first stage; its stages have 8, 16 and 32 channels here


def test_deep_preset_has_at_least_nine_convs_in_widening_stages_down_to_4x4():
    d = models.Discriminator(DEEP_WIDTH, arch="deep")
    assert d.num_layers == len(d.blocks) >= 9
    shapes = conv_output_shapes(d, torch.zeros(2, 3, 32, 32))
    assert len(shapes) == d.num_layers
    w = DEEP_WIDTH
    assert [(c, s) for c, s, _ in shapes] == [(w, 32), (w, 32), (2 * w, 16), (2 * w, 16), (2 * w, 16),
                                              (4 * w, 8), (4 * w, 8), (4 * w, 8), (4 * w, 8), (4 * w, 4)]
    assert sum(isinstance(m, nn.LayerNorm) for m in d.modules()) == d.num_layers
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert d.fc1.in_features == d.fc10.in_features == d.num_features == 4 * w


def test_default_widths_per_arch():
    """width=None picks 196 for the assignment's net and 128-256-512 channels for the deep one."""
    hw, deep = models.Discriminator(), models.Discriminator(arch="deep")
    assert hw.width == hw.config["width"] == 196
    assert deep.width == deep.config["width"] == 128
    assert [b.conv.out_channels for b in deep.blocks] == [128, 128, 256, 256, 256, 512, 512, 512, 512, 512]


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="hw, deep"):
        models.Discriminator(8, arch="resnet")


def test_deep_preset_trains_on_the_cpu():
    """A few Adam steps on one batch lower the loss of both heads, with finite gradients everywhere."""
    torch.manual_seed(0)
    d = models.Discriminator(DEEP_WIDTH, arch="deep")
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = torch.arange(8)
    target = torch.linspace(-1, 1, 8).view(8, 1)
    optimizer = torch.optim.Adam(d.parameters(), 1e-3)
    losses = []
    for _ in range(5):
        score, logits = d(x)
        loss = F.cross_entropy(logits, labels) + F.mse_loss(score, target)
        optimizer.zero_grad()
        loss.backward()
        for name, p in d.named_parameters():
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def layer_cases():
    return [("hw", WIDTH, k) for k in range(1, 9)] + [("deep", DEEP_WIDTH, k) for k in range(1, 11)]


@pytest.mark.parametrize("arch, width, k", layer_cases())
def test_extract_features_gives_max_pooled_block_output(arch, width, k):
    torch.manual_seed(0)
    d = models.Discriminator(width, arch=arch)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    features = d(x, extract_features=k)
    norm = [m for m in d.modules() if isinstance(m, nn.LayerNorm)][k - 1]
    assert features.shape == (3, norm.normalized_shape[0])
    # The feature map after conv block k, taken with a hook on the k-th LayerNorm (the block's last module
    # with weights; LeakyReLU is monotone, so max-pooling commutes with it).
    maps = []
    hook = norm.register_forward_hook(lambda m, i, out: maps.append(out))
    d(x)
    hook.remove()
    expected = F.leaky_relu(maps[0]).amax((2, 3))
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize("k", [-1, 9])
def test_extract_features_out_of_range_names_the_valid_range(k):
    d = models.Discriminator(WIDTH)
    with pytest.raises(ValueError, match=r"1 ?(\.\.|to|-) ?8"):
        d(torch.zeros(1, 3, 32, 32), extract_features=k)


@pytest.mark.parametrize("k", [-1, 11])
def test_extract_features_out_of_range_of_the_deep_preset(k):
    d = models.Discriminator(DEEP_WIDTH, arch="deep")
    with pytest.raises(ValueError, match=r"1\.\.10"):
        d(torch.zeros(1, 3, 32, 32), extract_features=k)


def test_the_features_are_the_pooled_input_of_the_heads():
    torch.manual_seed(0)
    d = models.Discriminator(WIDTH)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    (score, logits), features = d.heads_and_features(x)
    assert d(x)._fields == ("score", "logits")
    assert features.shape == (3, WIDTH)
    # Without minibatch features the heads read exactly these features.
    torch.testing.assert_close(score, d.fc1(features))
    torch.testing.assert_close(logits, d.fc10(features))
    # They are the last block's map max-pooled, the same as extracting the last layer.
    torch.testing.assert_close(features, d(x, extract_features=d.num_layers))


def test_hw_preset_keeps_the_state_dict_keys_of_existing_model_files():
    names = {f"blocks.{i}.{layer}.{p}" for i in range(8) for layer in ("conv", "norm") for p in ("weight", "bias")}
    names |= {f"{fc}.{p}" for fc in ("fc1", "fc10") for p in ("weight", "bias")}
    assert set(models.Discriminator(WIDTH).state_dict()) == names
    # A model file written before the presets existed records only the width; it still rebuilds the net.
    assert models.Discriminator(**{"width": WIDTH}).config == {
        "width": WIDTH, "arch": "hw", "minibatch_kernels": 0, "minibatch_dims": models.MINIBATCH_DIMS}


@pytest.mark.parametrize("arch, width", [("hw", WIDTH), ("deep", DEEP_WIDTH)])
@pytest.mark.parametrize("kernels", [0, 6])
def test_config_rebuilds_the_same_discriminator_through_a_file(tmp_path, arch, width, kernels):
    torch.manual_seed(0)
    d = models.Discriminator(width, arch=arch, minibatch_kernels=kernels, minibatch_dims=3).eval()
    assert all(type(v) in (int, str) for v in d.config.values())
    torch.save({"config": d.config, "state_dict": d.state_dict()}, tmp_path / "d.model")
    saved = torch.load(tmp_path / "d.model", weights_only=True)
    rebuilt = type(d)(**saved["config"]).eval()
    rebuilt.load_state_dict(saved["state_dict"])  # strict: same keys and shapes
    assert rebuilt.config == d.config and rebuilt.num_layers == d.num_layers
    assert ("minibatch.T" in saved["state_dict"]) == (kernels > 0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for a, b in zip(d(x, groups=2), rebuilt(x, groups=2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_rebuilds_the_same_generator():
    torch.manual_seed(0)
    g = models.Generator(WIDTH).eval()
    assert g.config == {"width": WIDTH}
    rebuilt = type(g)(**g.config).eval()
    rebuilt.load_state_dict(g.state_dict())
    z = models.class_noise(torch.arange(4))
    torch.testing.assert_close(g(z), rebuilt(z), rtol=0, atol=0)


@pytest.mark.parametrize("arch, width", [("hw", WIDTH), ("deep", DEEP_WIDTH)])
def test_discriminator_samples_are_independent(arch, width):
    """Sample i's outputs do not change when the other samples of the batch change, and carry no gradient to
    them (the gradient penalty needs this; batch norm would break it)."""
    torch.manual_seed(0)
    d = models.Discriminator(width, arch=arch).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    other = x.clone()
    other[1:] = torch.rand(3, 3, 32, 32) * 2 - 1
    for a, b in zip(d(x), d(other)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        assert not torch.allclose(a[1:], b[1:])
    x.requires_grad_(True)
    score, logits = d(x)
    (score[0].sum() + logits[0].sum()).backward()
    assert x.grad[0].abs().sum() > 0
    assert torch.all(x.grad[1:] == 0)


def test_minibatch_discrimination_matches_a_hand_computation():
    """Three samples, A = 2 features, B = 2 kernels of C = 2 dims: M_i = f_i T, the L1 distances between
    the samples' rows b, exp(-d) summed over j with j = i included (exp(0) = 1)."""
    layer = models.MinibatchDiscrimination(2, kernels=2, dims=2)
    T = [[[0.5, -1.0], [0.25, 0.0]],   # T[a][b][c]
         [[1.0, 0.5], [-0.5, 2.0]]]
    f = [[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]
    with torch.no_grad():
        layer.T.copy_(torch.tensor(T))
    out = layer(torch.tensor(f))
    # By hand: M_0 = 1 * T[0] + 2 * T[1] = [[2.5, 0.0], [-0.75, 4.0]],
    # M_1 = -T[1] = [[-1.0, -0.5], [0.5, -2.0]], M_2 = 3 * T[0] + 0.5 * T[1] = [[2.0, -2.75], [0.5, 1.0]].
    # L1 distances, kernel 0: d01 = 3.5 + 0.5 = 4, d02 = 0.5 + 2.75 = 3.25, d12 = 3 + 2.25 = 5.25;
    # kernel 1: d01 = 1.25 + 6 = 7.25, d02 = 1.25 + 3 = 4.25, d12 = 0 + 3 = 3.
    e = math.exp
    expected = [[1 + e(-4.0) + e(-3.25), 1 + e(-7.25) + e(-4.25)],
                [1 + e(-4.0) + e(-5.25), 1 + e(-7.25) + e(-3.0)],
                [1 + e(-3.25) + e(-5.25), 1 + e(-4.25) + e(-3.0)]]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_minibatch_groups_are_separate_batches():
    torch.manual_seed(0)
    layer = models.MinibatchDiscrimination(4, kernels=3, dims=2)
    f = torch.randn(6, 4)
    together = layer(f, groups=3)
    apart = torch.cat([layer(f[i:i + 2]) for i in range(0, 6, 2)])
    torch.testing.assert_close(together, apart)
    assert not torch.allclose(together, layer(f))  # one group of six sums over all of them


def mbd_discriminator(arch="hw", width=WIDTH):
    torch.manual_seed(0)
    return models.Discriminator(width, arch=arch, minibatch_kernels=6, minibatch_dims=3)


def outputs_with_minibatch_features(d, x, groups):
    (score, logits), features = d.heads_and_features(x, groups=groups)
    return score, logits, d.minibatch(features, groups)


@pytest.mark.parametrize("arch, width", [("hw", WIDTH), ("deep", DEEP_WIDTH)])
def test_minibatch_features_only_see_their_own_group(arch, width):
    """Real, fake and interpolated images in one batch with groups=3: a sample's minibatch features and
    D's outputs do not change when the other groups change, and do when its own group changes."""
    d = mbd_discriminator(arch, width)
    assert d.fc1.in_features == d.fc10.in_features == d.num_features + 6
    x = torch.rand(9, 3, 32, 32) * 2 - 1
    base = outputs_with_minibatch_features(d, x, 3)
    others = x.clone()
    others[3:] = torch.rand(6, 3, 32, 32) * 2 - 1
    for a, b in zip(base, outputs_with_minibatch_features(d, others, 3)):
        torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)
        assert not torch.allclose(a[3:], b[3:])
    own = x.clone()
    own[2] = torch.rand(3, 32, 32) * 2 - 1
    for a, b in zip(base, outputs_with_minibatch_features(d, own, 3)):
        assert not torch.allclose(a[:2], b[:2])
    # With one group, changing the last sample reaches the first.
    for a, b in zip(outputs_with_minibatch_features(d, x, 1), outputs_with_minibatch_features(d, others, 1)):
        assert not torch.allclose(a[0], b[0])


def test_minibatch_gradient_stays_in_the_group_and_supports_the_gradient_penalty():
    """The score of group 0 carries no gradient to the other groups, and the gradient penalty's double
    backward reaches T."""
    d = mbd_discriminator()
    x = (torch.rand(6, 3, 32, 32) * 2 - 1).requires_grad_(True)
    score, _ = d(x, groups=3)
    grad, = torch.autograd.grad(score[:2].sum(), x, create_graph=True)
    assert grad[:2].abs().sum() > 0 and torch.all(grad[2:] == 0)
    ((grad[:2].flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
    assert torch.isfinite(d.minibatch.T.grad).all() and d.minibatch.T.grad.abs().sum() > 0


def test_minibatch_features_stay_fp32_under_bf16_autocast():
    """A bf16 sum over a group of 128 would be off by up to 0.5; the layer computes in fp32."""
    torch.manual_seed(0)
    layer = models.MinibatchDiscrimination(16, kernels=4, dims=2)
    with torch.no_grad():
        layer.T.mul_(0.01)  # distances near 0: every sample adds close to 1, sums near 128
        f = torch.randn(128, 16)
        exact = layer(f)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(f)
    assert out.dtype == torch.float32 and exact.min() > 100
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups", [-1, 0, 4, 5])
def test_groups_must_divide_the_batch(groups):
    with pytest.raises(ValueError, match="divisor of the batch size 6"):
        mbd_discriminator()(torch.zeros(6, 3, 32, 32), groups=groups)


def test_class_noise_puts_one_hot_labels_first():
    labels = torch.tensor([0, 3, 9, 3, 7])
    z = models.class_noise(labels, generator=torch.Generator().manual_seed(1))
    assert z.shape == (5, 100)
    expected = torch.zeros(5, 10)
    expected[torch.arange(5), labels] = 1
    assert torch.equal(z[:, :10], expected)
    rest = z[:, 10:]
    assert 0.7 < rest.std() < 1.3 and abs(rest.mean()) < 0.3  # N(0, 1) noise
    assert not torch.equal(rest[1], rest[3])  # same label, different noise
    again = models.class_noise(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


# ---------------------------------------------------------------------------------------------------------
# layer_norm.LayerNorm: nn.LayerNorm with a compact second derivative (the gradient penalty's double backward)

def layer_norm_inputs(dtype=torch.float64, shape=(3, 2, 2), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *size: torch.randn(*size, generator=g, dtype=dtype, requires_grad=True)
    return make(n, *shape), make(*shape), make(*shape)


def test_layer_norm_passes_gradcheck_and_gradgradcheck_in_float64():
    x, weight, bias = layer_norm_inputs()
    f = lambda x, w, b: layer_norm._LayerNorm.apply(x, w, b, [3, 2, 2], 1e-5, layer_norm.NativeKernels, {})
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))  # every first derivative's derivative


def test_layer_norm_equals_nn_layer_norm_to_the_second_derivative():
    """Values, first and second derivatives of a penalty-like loss equal nn.LayerNorm's (float64, affine)."""
    results = []
    for compact in (True, False):
        torch.manual_seed(0)
        norm = (layer_norm.LayerNorm if compact else nn.LayerNorm)([3, 2, 2]).double()
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
        x = layer_norm_inputs()[0]
        y = norm(x)
        gx, = torch.autograd.grad((y * y.sin()).sum(), x, create_graph=True)
        penalty = ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
        results.append([y, gx, *torch.autograd.grad(penalty, (x, norm.weight, norm.bias))])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_layer_norm_first_backward_computes_only_what_the_pass_uses():
    """The penalty's autograd.grad asks for the input's gradient alone: the fused backward kernel is then asked
    for no weight and bias gradients (as nn.LayerNorm's is); a full backward asks for all three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    masks = []

    class Masks(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            if op is torch.ops.aten.native_layer_norm_backward.default:
                masks.append(list(args[-1]))
            return op(*args, **(kwargs or {}))

    norm = layer_norm.LayerNorm([3, 2, 2])
    x = torch.randn(4, 3, 2, 2).requires_grad_(True)
    with Masks():
        torch.autograd.grad(norm(x * 1).sum(), x, create_graph=True)
        norm(x * 1).sum().backward()
    assert masks == [[True, False, False], [True, True, True]]


def as_before(d):
    """d (a discriminator or one ConvBlock) with plain nn.LayerNorm modules in its blocks, as model files and
    checkpoints were written before: the reference of autograd's own derivatives."""
    for block in getattr(d, "blocks", [d]):
        plain = nn.LayerNorm(block.norm.normalized_shape)
        plain.load_state_dict(block.norm.state_dict())
        block.norm = plain
    return d


def test_discriminator_loss_and_gradients_equal_those_of_nn_layer_norm():
    """gan_steps' discriminator loss with the penalty, fp32: the loss and each parameter's gradient agree with
    nn.LayerNorm's to 1e-6 (relative; fp32 rounds each in another order)."""
    from training import gan_steps

    g = torch.Generator().manual_seed(1)
    real, fake = (torch.rand(6, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    real_labels, fake_labels = (torch.randint(0, 10, (6,), generator=g) for _ in range(2))
    alpha = torch.rand(6, generator=g)
    results = []
    for before in (False, True):
        torch.manual_seed(0)
        d = models.Discriminator(8)
        if before:
            as_before(d)
        loss, _ = gan_steps.discriminator_loss(d, d, real, real_labels, fake, fake_labels, alpha)
        loss.backward()
        results.append((loss.item(), {name: p.grad for name, p in d.named_parameters()}))
    (loss, grads), (loss_before, grads_before) = results
    assert loss == pytest.approx(loss_before, rel=1e-6)
    for name, grad in grads.items():
        assert (grad - grads_before[name]).norm() <= 1e-6 * grads_before[name].norm() + 1e-9, name


def test_layer_norm_under_cpu_bf16_autocast_behaves_like_nn_layer_norm():
    """CPU autocast leaves layer_norm to its input's dtype (bf16 after a bf16 conv), as for nn.LayerNorm: the
    same output and first derivative (the same fused kernels), and a second derivative as close to fp32's."""
    def run(compact, bf16):
        torch.manual_seed(0)
        block = models.ConvBlock(3, 8, 1, 8)
        if not compact:
            as_before(block)
        x = torch.randn(4, 3, 8, 8).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = block.norm(block.conv(x))
            gx, = torch.autograd.grad((y.float() * y.float().sin()).sum(), x, create_graph=True)
        gx.square().sum().backward()
        return y, gx, torch.cat([block.conv.weight.grad.flatten(), block.norm.weight.grad.flatten()])

    (y, gx, grads), (y_nn, gx_nn, grads_nn), (_, _, grads_fp32) = run(True, True), run(False, True), run(True, False)
    assert y.dtype == y_nn.dtype == torch.bfloat16
    assert torch.equal(y, y_nn) and torch.equal(gx, gx_nn)
    error, error_nn = ((g - grads_fp32).norm() / grads_fp32.norm() for g in (grads, grads_nn))
    assert error_nn > 1e-3  # bf16 does change them: the comparison below has something to compare
    assert error <= 1.1 * error_nn  # measured: 0.0121 and 0.0122


def test_model_files_and_checkpoints_written_with_nn_layer_norm_still_load(tmp_path):
    from training.checkpoint import load_model, model_record, restore_model, save_model

    torch.manual_seed(0)
    before = as_before(models.Discriminator(WIDTH)).eval()
    save_model(before, tmp_path / "cifar10.model")
    loaded = load_model(tmp_path / "cifar10.model", "discriminator")
    assert all(isinstance(block.norm, layer_norm.LayerNorm) for block in loaded.blocks)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), before(x), rtol=0, atol=0)
    resumed = models.Discriminator(WIDTH)
    restore_model(resumed, model_record(before), "gan.ckpt")
    torch.testing.assert_close(resumed.eval()(x), before(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_norm_under_cuda_bf16_autocast_runs_in_fp32_like_nn_layer_norm():
    """CUDA autocast runs layer_norm in fp32: layer_norm.LayerNorm casts its input as autocast does for nn.LayerNorm."""
    results = []
    for compact in (True, False):
        torch.manual_seed(0)
        block = models.ConvBlock(3, 8, 1, 8)
        if not compact:
            as_before(block)
        block.cuda()
        x = torch.randn(4, 3, 8, 8, device="cuda").requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block.norm(block.conv(x))
            gx, = torch.autograd.grad((y * y.sin()).sum(), x, create_graph=True)
        gx.square().sum().backward()
        results.append((y, gx, block.conv.weight.grad))
    (y, gx, grad), (y_nn, gx_nn, grad_nn) = results
    assert y.dtype == y_nn.dtype == torch.float32
    torch.testing.assert_close(y, y_nn)
    # fp32 LayerNorms around the same bf16 convolutions, whose CUDA backward may sum in another order
    torch.testing.assert_close(gx, gx_nn, rtol=1e-3, atol=1e-5)
    assert (grad - grad_nn).norm() <= 1e-2 * grad_nn.norm()
