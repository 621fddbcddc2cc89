"""The two networks of the assignment, as the tables in SPEC.md give them.

Discriminator: eight 3x3 conv blocks (conv -> LayerNorm over C,H,W -> LeakyReLU), a 4x4 max pool, and two
heads: fc1 (critic score, for the WGAN) and fc10 (class logits, the baseline classifier and the ACGAN
auxiliary classifier). Generator: fc to 4x4, three upsampling transposed convs, batch norm + ReLU, tanh.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NOISE_DIM = 100
NUM_CLASSES = 10

# (stride, output side) of the discriminator's eight conv blocks for 32x32 inputs.
DISC_BLOCKS = [(1, 32), (2, 16), (1, 16), (2, 8), (1, 8), (1, 8), (1, 8), (2, 4)]


class ConvBlock(nn.Module):
    """conv 3x3 -> LayerNorm over (C, H, W) -> LeakyReLU. LayerNorm keeps samples independent (no batch
    norm), which the gradient penalty needs."""

    def __init__(self, in_channels, out_channels, stride, side):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.LayerNorm([out_channels, side, side])

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)))


class Discriminator(nn.Module):
    def __init__(self, width=196):
        super().__init__()
        self.width = width
        channels = [3] + [width] * len(DISC_BLOCKS)
        self.blocks = nn.ModuleList(
            ConvBlock(channels[i], channels[i + 1], stride, side) for i, (stride, side) in enumerate(DISC_BLOCKS)
        )
        self.fc1 = nn.Linear(width, 1)
        self.fc10 = nn.Linear(width, NUM_CLASSES)

    def forward(self, x, extract_features=0):
        """Returns (critic score (N, 1), class logits (N, 10)); with extract_features=k in 1..8, the output of
        conv block k max-pooled over its whole spatial extent, shape (N, width)."""
        if not 0 <= extract_features <= len(self.blocks):
            raise ValueError(f"extract_features must be 0 (both heads) or a conv layer in 1..{len(self.blocks)}, "
                             f"got {extract_features}")
        for k, block in enumerate(self.blocks, start=1):
            x = block(x)
            if k == extract_features:
                return F.adaptive_max_pool2d(x, 1).flatten(1)
        h = F.max_pool2d(x, 4, 4).flatten(1)
        return self.fc1(h), self.fc10(h)


class Generator(nn.Module):
    def __init__(self, width=196):
        super().__init__()
        self.width = width
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
    z[:, :NUM_CLASSES] = F.one_hot(labels, NUM_CLASSES).to(z.dtype)
    return z
