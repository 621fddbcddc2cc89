"""The networks: a discriminator for 32x32 CIFAR-10 images and a class-conditioned generator.

Discriminator: 3x3 conv blocks (conv -> LayerNorm over C,H,W -> LeakyReLU) from a block table, a max pool
over the final 4x4 map, and two heads: fc1 (critic score, for the WGAN) and fc10 (class logits, the
baseline classifier and the ACGAN auxiliary classifier). Two tables: "hw", the assignment's eight-layer net,
and "deep", ten layers in three widening stages. Optionally a minibatch-discrimination layer (Salimans et
al. 2016, "Improved Techniques for Training GANs", section 3.2) adds features that compare each sample
with the others of its group before the heads.

Generator: fc to 4x4, three upsampling transposed convs among plain convs, batch norm + ReLU, tanh. Under
torchrun its batch norms become GlobalBatchNorm (torch_utils.ops.global_batch_norm), whose statistics cover the
global batch.

The layers' faster kernels (the gradfix convolution, the LayerNorm's compact double backward, Triton) live in
torch_utils/ops; they compute the same numbers as nn.Conv2d and nn.LayerNorm, with the same state_dict.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_utils.ops import Conv2d, LayerNorm
from training.data import CLASSES

NOISE_DIM = 100
NUM_CLASSES = len(CLASSES)  # the classifier head's outputs, one per class name of the data
IMAGE_SIZE = 32

# Block tables: one (channels as a multiple of width, stride) per conv block, in order. The spatial side
# follows from the strides: each stride-2 conv halves it, from 32 down to the 4x4 the heads pool over.
ARCHS = {
    # The assignment's net: eight convs of `width` channels at 32, 16, 16, 8, 8, 8, 8, 4 pixels.
    "hw": [(1, 1), (1, 2), (1, 1), (1, 2), (1, 1), (1, 1), (1, 1), (1, 2)],
    # VGG-like: two convs at 32x32 (width), three at 16x16 (2 x width), four at 8x8 (4 x width), one
    # stride-2 conv to 4x4. Widening where the map shrinks keeps the cost per layer about even.
    "deep": [(1, 1), (1, 1), (2, 2), (2, 1), (2, 1), (4, 2), (4, 1), (4, 1), (4, 1), (4, 2)],
}
DEFAULT_WIDTH = {"hw": 196, "deep": 128}
LEAKY_SLOPE = 0.01  # the blocks' LeakyReLU: F.leaky_relu's default
MINIBATCH_KERNELS = 100  # B and C of the minibatch-discrimination layer when it is turned on
MINIBATCH_DIMS = 5


def block_shapes(arch, width):
    """(out_channels, stride, output side) of each conv block of a block table at the given width."""
    if arch not in ARCHS:
        raise ValueError(f"unknown discriminator arch {arch!r}; choose one of {', '.join(ARCHS)}")
    shapes, side = [], IMAGE_SIZE
    for multiple, stride in ARCHS[arch]:
        side //= stride
        shapes.append((multiple * width, stride, side))
    return shapes



class ConvBlock(nn.Module):
    """conv 3x3 -> LayerNorm over (C, H, W) -> LeakyReLU. LayerNorm keeps samples independent (no batch
    norm), which the gradient penalty needs."""

    def __init__(self, in_channels, out_channels, stride, side):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = LayerNorm([out_channels, side, side])

    def forward(self, x):
        # With the activation in the LayerNorm's kernels, the norm's output (for a hook) is activated. An
        # nn.LayerNorm put in its place (the reference in the tests) has no such switch.
        if getattr(self.norm, "fuse_leaky_relu", False):
            return self.norm(self.conv(x), slope=LEAKY_SLOPE)
        return F.leaky_relu(self.norm(self.conv(x)), LEAKY_SLOPE)


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016, section 3.2. For features f (N, A) and a learned tensor T (A, B, C):
    M_i = f_i T, a B x C matrix per sample; c_b(i, j) = exp(-||M_i,b - M_j,b||_1); output o_i,b = sum over j
    of c_b(i, j), shape (N, B). As in the paper's sum over j = 1..n, j = i is included: it adds exp(0) = 1.

    The sum runs over the sample's group only: groups=g splits the batch into g equal consecutive chunks
    (e.g. real and fake images passed together with groups=2), so that real images are compared only with
    real ones and fakes with fakes. Under DistributedDataParallel each process sees only its own share of
    the global batch: the groups are formed within that share, never across processes. o lies between 1
    and the group size and grows with it, so evaluate with groups of the size used in training."""

    def __init__(self, in_features, kernels=MINIBATCH_KERNELS, dims=MINIBATCH_DIMS):
        super().__init__()
        self.kernels, self.dims = kernels, dims
        # Scaled so that, measured on CIFAR-10 at initialization, a sample's nearest other sample in a group
        # of 128 lies about 1.5-2 away: exp(-d) neither saturates at 1 nor vanishes, and o starts near 3-5.
        self.T = nn.Parameter(torch.randn(in_features, kernels, dims) * (3 / math.sqrt(in_features)))

    def forward(self, f, groups=1):
        n = len(f)
        # In T's dtype (fp32) even under bf16 autocast: a bf16 sum over a group of 128 would round to steps of 0.5.
        with torch.autocast(f.device.type, enabled=False):
            m = (f.to(self.T.dtype) @ self.T.flatten(1)).view(groups, n // groups, self.kernels, self.dims)
            l1 = (m.unsqueeze(2) - m.unsqueeze(1)).abs().sum(-1)  # (groups, i, j, B)
            return torch.exp(-l1).sum(2).view(n, self.kernels)


class Judgement(NamedTuple):
    """The discriminator's two heads on a batch, a pair as the assignment's `fc1, fc10`: `_, output = model(x)`."""
    score: torch.Tensor  # (N, 1): the critic's score (fc1)
    logits: torch.Tensor  # (N, 10): the class logits (fc10)


class Discriminator(nn.Module):
    """The critic + classifier, built from the block table ARCHS[arch].

    width: channels of the first stage. For "hw" every conv has `width` channels (196 in the assignment,
    128 to halve the time); for "deep" the stages have width, 2 x width and 4 x width channels (128 gives
    128-256-512). None picks DEFAULT_WIDTH[arch].
    minibatch_kernels: 0 (off) or B, the number of minibatch-discrimination kernels of minibatch_dims
    dimensions each; when on, fc1 and fc10 take the pooled features and the B minibatch features.
    model.config holds these keyword arguments: type(model)(**model.config) rebuilds the same net."""

    def __init__(self, width=None, arch="hw", minibatch_kernels=0, minibatch_dims=MINIBATCH_DIMS):
        super().__init__()
        width = DEFAULT_WIDTH.get(arch) if width is None else width
        shapes = block_shapes(arch, width)
        self.width, self.arch = width, arch
        self.config = {"width": width, "arch": arch, "minibatch_kernels": minibatch_kernels,
                       "minibatch_dims": minibatch_dims}
        in_channels = [3] + [c for c, _, _ in shapes]
        self.blocks = nn.ModuleList(ConvBlock(c_in, c, stride, side)
                                    for c_in, (c, stride, side) in zip(in_channels, shapes))
        self.num_features = in_channels[-1]  # the pooled features feeding the heads, per sample
        self.minibatch = MinibatchDiscrimination(self.num_features, minibatch_kernels, minibatch_dims) \
            if minibatch_kernels else None
        heads_in = self.num_features + minibatch_kernels
        self.fc1 = nn.Linear(heads_in, 1)
        self.fc10 = nn.Linear(heads_in, NUM_CLASSES)

    @property
    def num_layers(self):
        """Conv layers, the valid range of extract_features being 1..num_layers."""
        return len(self.blocks)

    def forward(self, x, extract_features=0, groups=1):
        """The two heads, Judgement(score, logits). extract_features=k in 1..num_layers: instead, the output of
        conv block k max-pooled over its whole spatial extent, (N, channels of block k).
        groups: the minibatch features of a sample come from the batch's 1/groups chunk it is in (see
        MinibatchDiscrimination); the batch size must be a multiple of groups."""
        if not 0 <= extract_features <= self.num_layers:
            raise ValueError(f"extract_features must be 0 (both heads) or a conv layer in 1..{self.num_layers}, "
                             f"got {extract_features}")
        if extract_features:
            for block in self.blocks[:extract_features]:
                x = block(x)
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.heads_and_features(x, groups)[0]

    def heads_and_features(self, x, groups=1):
        """(Judgement, features) in one pass: features, (N, num_features), are the last block max-pooled, the
        heads' input without the minibatch features (what feature matching compares)."""
        if groups < 1 or len(x) % groups:
            raise ValueError(f"groups must be a positive divisor of the batch size {len(x)}, got {groups}")
        for block in self.blocks:
            x = block(x)
        features = F.max_pool2d(x, 4, 4).flatten(1)
        h = features if self.minibatch is None else torch.cat([features, self.minibatch(features, groups)], 1)
        return Judgement(self.fc1(h), self.fc10(h)), features


class Generator(nn.Module):
    """The assignment's generator. model.config = {"width": width}: type(model)(**model.config) rebuilds it."""

    def __init__(self, width=196):
        super().__init__()
        self.width = width
        self.config = {"width": width}
        self.fc1 = nn.Linear(NOISE_DIM, width * 4 * 4)
        self.bn0 = nn.BatchNorm1d(width * 4 * 4)
        up = lambda: nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        same = lambda: nn.Conv2d(width, width, 3, padding=1)
        # conv1..conv7 of the table, each followed by batch norm + ReLU; conv8 maps to RGB.
        self.convs = nn.ModuleList([up(), same(), same(), same(), up(), same(), up()])
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in self.convs)
        self.conv8 = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z):
        x = F.relu(self.bn0(self.fc1(z))).view(-1, self.width, 4, 4)
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return torch.tanh(self.conv8(x))



def class_noise(labels, generator=None):
    """Generator input for the given labels: N(0, 1) noise whose first 10 entries are the one-hot label."""
    z = torch.randn(len(labels), NOISE_DIM, device=labels.device, generator=generator)
    # Two kernels, and no host sync (F.one_hot reads the labels' range back to check it)
    z[:, :NUM_CLASSES] = 0
    return z.scatter_(1, labels[:, None], 1.0)
