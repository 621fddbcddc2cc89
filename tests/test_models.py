"""The two networks against SPEC.md's tables: shapes, parameter counts, feature extraction, independence of the
discriminator's samples, and the generator's class-conditioned noise."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models

WIDTH = 16  # small nets for speed; the parameter-count tests use the spec's 196


def conv_params(c_in, c_out, kernel):
    return c_in * c_out * kernel * kernel + c_out  # weights + bias


def disc_params_from_table(w):
    """SPEC.md's discriminator table: 8 convs (k3, bias) each with a LayerNorm over (C, H, W) of its output
    (weight + bias per element), then fc1 and fc10."""
    rows = [(3, w, 32), (w, w, 16), (w, w, 16), (w, w, 8), (w, w, 8), (w, w, 8), (w, w, 8), (w, w, 4)]
    convs = sum(conv_params(c_in, c_out, 3) for c_in, c_out, _ in rows)
    layer_norms = sum(2 * c_out * side * side for _, c_out, side in rows)
    heads = (w * 1 + 1) + (w * 10 + 10)
    return convs + layer_norms + heads


def gen_params_from_table(w):
    """SPEC.md's generator table: fc1 100 -> w*4*4 with BatchNorm1d, transposed convs k4 (conv1, conv5, conv7),
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


def test_parameter_counts_at_width_196_match_the_spec_tables():
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


@pytest.mark.parametrize("k", range(1, 9))
def test_extract_features_gives_max_pooled_block_output(k):
    torch.manual_seed(0)
    d = models.Discriminator(WIDTH)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    features = d(x, extract_features=k)
    assert features.shape == (3, WIDTH)
    # The feature map after conv block k, taken with a hook on the k-th LayerNorm (the block's last module
    # with weights; LeakyReLU is monotone, so max-pooling commutes with it).
    maps = []
    norm = [m for m in d.modules() if isinstance(m, nn.LayerNorm)][k - 1]
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


def test_discriminator_samples_are_independent():
    """Sample i's outputs do not change when the other samples of the batch change, and carry no gradient to
    them (the gradient penalty needs this; batch norm would break it)."""
    torch.manual_seed(0)
    d = models.Discriminator(WIDTH).train()
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
