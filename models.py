"""The networks: a discriminator for 32x32 CIFAR-10 images and a class-conditioned generator.

Discriminator: 3x3 conv blocks (conv -> LayerNorm over C,H,W -> LeakyReLU) from a block table, a max pool
over the final 4x4 map, and two heads: fc1 (critic score, for the WGAN) and fc10 (class logits, the
baseline classifier and the ACGAN auxiliary classifier). Two tables: "hw", the assignment's eight-layer net,
and "deep", ten layers in three widening stages. Optionally a minibatch-discrimination layer (Salimans et
al. 2016, "Improved Techniques for Training GANs", section 3.2) adds features that compare each sample
with the others of its group before the heads.

Generator: fc to 4x4, three upsampling transposed convs among plain convs, batch norm + ReLU, tanh. Under
torchrun its batch norms become GlobalBatchNorm (global_batch_norm), whose statistics cover the global batch.
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NOISE_DIM = 100
NUM_CLASSES = 10
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


def _engine_uses(ctx, i):
    """Whether the running backward pass uses the gradient of input i of a custom Function, as the engine tells
    its built-in nodes (the penalty's autograd.grad wants the input's gradient only, not the weight's)."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        return torch._C._will_engine_execute_node(ctx.next_functions[i][0])
    except RuntimeError:  # raised for a leaf that autograd.grad was asked for, whose gradient is used
        return True


class _Conv2d(torch.autograd.Function):
    """conv2d whose backward is made of ordinary convolutions, each differentiable again (the approach of
    StyleGAN2-ADA's conv2d_gradfix): the input gradient is a transposed convolution (_ConvInputGrad), the weight
    gradient convolution_backward asked for the weight alone (_ConvWeightGrad). Autograd's own double backward of a
    convolution runs convolutions whose kernel is a whole gradient map, and full-activation copies; this one runs
    the usual data- and weight-gradient kernels. A gradient nobody uses is not computed: the penalty's first-order
    pass, which wants the input's gradient alone, computes no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.conv, ctx.has_bias = (stride, padding), bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conv
        need = [_engine_uses(ctx, i) for i in range(3)]
        if not torch.is_grad_enabled():  # a plain backward: one fused call computes what is used
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, [weight.shape[0]] if ctx.has_bias else None, [stride] * 2, [padding] * 2, [1, 1],
                False, [0, 0], 1, need)
            return gx, gw, gb, None, None
        gx = _ConvInputGrad.apply(gy, weight, x.shape, stride, padding) if need[0] else None
        gw = _ConvWeightGrad.apply(gy, x, weight, stride, padding) if need[1] else None
        gb = gy.sum((0, 2, 3)) if need[2] and ctx.has_bias else None
        return gx, gw, gb, None, None


class _ConvInputGrad(torch.autograd.Function):
    """conv2d's input gradient, gy -> conv_transpose2d(gy, weight), sized back to the input's shape."""

    @staticmethod
    def forward(ctx, gy, weight, x_shape, stride, padding):
        ctx.conv = (stride, padding)
        ctx.save_for_backward(gy, weight)
        k = weight.shape[-1]
        extra = [x_shape[i] - ((gy.shape[i] - 1) * stride - 2 * padding + k) for i in (2, 3)]
        return F.conv_transpose2d(gy, weight, None, stride, padding, extra)

    @staticmethod
    def backward(ctx, ggx):
        # <ggx, J^T gy> = <J ggx, gy>: the gradient of gy is conv2d(ggx, weight), of the weight conv2d's weight
        # gradient with input ggx and output gradient gy
        gy, weight = ctx.saved_tensors
        stride, padding = ctx.conv
        d_gy = _Conv2d.apply(ggx, weight, None, stride, padding) if ctx.needs_input_grad[0] else None
        d_weight = _ConvWeightGrad.apply(gy, ggx, weight, stride, padding) if ctx.needs_input_grad[1] else None
        return d_gy, d_weight, None, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """conv2d's weight gradient for output gradient gy and input x; weight only gives the shape."""

    @staticmethod
    def forward(ctx, gy, x, weight, stride, padding):
        ctx.conv = (stride, padding)
        ctx.save_for_backward(gy, x)
        return torch.ops.aten.convolution_backward(gy, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False,
                                                   [0, 0], 1, [False, True, False])[1]

    @staticmethod
    def backward(ctx, ggw):
        # The weight gradient is linear in w's place: <ggw, W(gy, x)> = <gy, conv2d(x, ggw)>
        gy, x = ctx.saved_tensors
        stride, padding = ctx.conv
        d_gy = _Conv2d.apply(x, ggw, None, stride, padding) if ctx.needs_input_grad[0] else None
        d_x = _ConvInputGrad.apply(gy, ggw, x.shape, stride, padding) if ctx.needs_input_grad[1] else None
        return d_gy, d_x, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict) for square kernels, strides and paddings; with
    gradfix=True its backward is _Conv2d's, which the gradient penalty differentiates in ordinary kernels."""

    gradfix = False

    def forward(self, x):
        if not (self.gradfix and torch.is_grad_enabled()):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as autocast casts conv2d's arguments, before the Function sees them
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
            with torch.autocast(device, enabled=False):
                return _Conv2d.apply(x, weight, bias, self.stride[0], self.padding[0])
        return _Conv2d.apply(x, weight, bias, self.stride[0], self.padding[0])


class NativeKernels:
    """PyTorch's own LayerNorm kernels; triton_layer_norm has the same two functions."""
    forward = staticmethod(torch.native_layer_norm)
    backward = staticmethod(torch.ops.aten.native_layer_norm_backward)


def layer_norm_kernels(name):
    """The module of LayerNorm kernels called name: "native" (PyTorch's) or "triton" (triton_layer_norm)."""
    if name == "native":
        return NativeKernels
    from torch_utils.ops import triton_layer_norm  # Triton compiles on first use: only when asked for

    return triton_layer_norm


class _LayerNormGrad(torch.autograd.Function):
    """layer_norm's first backward (g -> gradients of x, weight and bias) as one fused kernel, as nn.LayerNorm's,
    with its own derivative in closed form. The gradient penalty differentiates this backward once more; autograd's
    generic formula for that spends about 65 elementwise passes over the activation per layer, this one 18.
    mean and rstd are functions of x (the derivative of x accounts for them); bias only gives gb its shape, or with
    a LeakyReLU fused in, the activation's factor. kernels: NativeKernels or triton_layer_norm; options, keyword
    arguments of triton_layer_norm's functions (slope: g is the gradient of leaky_relu(layer_norm(x), slope))."""

    @staticmethod
    def forward(ctx, g, x, weight, bias, mean, rstd, shape, mask, kernels, options):
        gx, gw, gb = kernels.backward(g, x, shape, mean, rstd, weight, bias, mask, **options)
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.kernels, ctx.options = shape, kernels, options
        ctx.save_for_backward(g, x, weight, bias, mean, rstd, gx)
        return gx, gw, gb

    @staticmethod
    def backward(ctx, a, a_w, a_b):
        # With xh = (x - mean) * rstd, gh = g * weight and <.> the mean over the normalized dims:
        # gx = rstd * P(gh), P(v) = v - <v> - xh <v xh> (P is symmetric); gw = sum over the batch of g * xh; gb of g.
        g, x, weight, bias, mean, rstd, gx = ctx.saved_tensors
        shape = ctx.shape
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        batch_dims = tuple(range(x.dim() - len(shape)))
        # Under CPU autocast x may be bf16 (mean and rstd are fp32): this backward computes in fp32
        x_in, x = x, x.to(mean.dtype)
        cast = lambda t, like: None if t is None else t.to(like.dtype)
        if hasattr(ctx.kernels, "double_backward"):  # the same formulas below, fused into three kernels
            dg, dx, dw = ctx.kernels.double_backward(a, a_w, a_b, g, x, gx, shape, mean, rstd, weight, bias,
                                                     ctx.needs_input_grad[:3], **ctx.options)
            return cast(dg, g), cast(dx, x_in), cast(dw, weight), None, None, None, None, None, None, None
        project = lambda v: ctx.kernels.backward(  # rstd * P(v)
            v.to(x.dtype).contiguous(), x, shape, mean, rstd, None, None, [True, False, False])[0]
        # -xh * rstd: the factors rstd and the signs below come out of it without further passes
        nxh_r = (mean - x) * (rstd * rstd)
        dg = dx = dw = None
        if a is not None:
            q = project(a)
            gh = g if weight is None else g * weight
            dg = q if weight is None else q * weight
            if weight is not None and ctx.needs_input_grad[2]:
                dw = (g * q).sum(batch_dims)
            if ctx.needs_input_grad[1]:
                # d/dx of sum(a * gx): through xh in <gh xh> and <a xh>, and through the factor rstd
                s1 = (gh * nxh_r).mean(dims, keepdim=True)  # -rstd <gh xh>
                s2 = (a * nxh_r).mean(dims, keepdim=True)  # -rstd <a xh>
                s3 = (a * gx).mean(dims, keepdim=True)
                u = torch.addcmul(a * s1, gh, s2)
                if a_w is not None:
                    u = torch.addcmul(u, g, a_w)
                dx = torch.addcmul(project(u), nxh_r, s3)
        elif a_w is not None and ctx.needs_input_grad[1]:
            dx = project(g * a_w)
        if a_w is not None:
            xh_w = (x - mean) * rstd * a_w
            dg = dg + xh_w if dg is not None else xh_w
        if a_b is not None:
            dg = dg + a_b if dg is not None else a_b.expand_as(g)
        return cast(dg, g), cast(dx, x_in), cast(dw, weight), None, None, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """layer_norm as one fused kernel forward and backward (native_layer_norm and its backward, or Triton's), the
    backward differentiable through _LayerNormGrad; options, keyword arguments of triton_layer_norm's functions (with
    a slope: leaky_relu(layer_norm(x)))."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, kernels, options):
        out, mean, rstd = kernels.forward(x, shape, weight, bias, eps, **options)
        ctx.shape, ctx.kernels, ctx.options = shape, kernels, options
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [_engine_uses(ctx, i) for i in range(3)]
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated in turn
            gx, gw, gb = _LayerNormGrad.apply(g, x, weight, bias, mean, rstd, ctx.shape, mask, ctx.kernels,
                                              ctx.options)
        else:
            gx, gw, gb = ctx.kernels.backward(g.contiguous(), x, ctx.shape, mean, rstd, weight, bias, mask,
                                              **ctx.options)
        return gx, gw, gb, None, None, None, None


def is_channels_last(x):
    """Whether x is a 4-d tensor laid out NHWC (and not also plain NCHW, as when H = W = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters, state dict and forward), whose second derivative, which the gradient
    penalty takes, is a few fused expressions instead of autograd's generic ones (see _LayerNormGrad).
    compact_double_backward=False runs nn.LayerNorm's own autograd instead (the reference). kernels: "native"
    (PyTorch's) or "triton" (triton_layer_norm: rows split over the whole GPU; CUDA, or the CPU under
    TRITON_INTERPRET=1). A channels_last input is normalized as its NHWC view with the weight permuted alike: the
    per-sample statistics do not depend on the layout, and no transposing copy is made.
    forward(x, leaky_relu=True) returns F.leaky_relu(layer_norm(x)); with fuse_leaky_relu and the Triton kernels,
    the activation is computed inside them (no passes of its own). row_kernels, with the Triton kernels: each row's
    few numbers in one small kernel instead of a dozen torch operations (see triton_layer_norm)."""

    compact_double_backward = True
    kernels = "native"
    fuse_leaky_relu = False
    row_kernels = False

    def forward(self, x, leaky_relu=False):
        if leaky_relu and not (self.fuse_leaky_relu and self.kernels == "triton"):
            return F.leaky_relu(self._layer_norm(x), LEAKY_SLOPE)
        return self._layer_norm(x, LEAKY_SLOPE if leaky_relu else None)

    def _layer_norm(self, x, slope=None):
        """layer_norm(x), or with a slope (Triton's kernels only) leaky_relu(layer_norm(x), slope)."""
        channels_last = is_channels_last(x) and len(self.normalized_shape) == 3
        custom = self.compact_double_backward and torch.is_grad_enabled()
        if not (custom or channels_last or self.kernels != "native"):  # no Python overhead on the plain path
            return super().forward(x)
        # CUDA autocast runs layer_norm in fp32 (CPU autocast does not): as it would for F.layer_norm
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        weight, bias, shape = self.weight, self.bias, list(self.normalized_shape)
        if channels_last:
            x = x.permute(0, 2, 3, 1)
            weight, bias = (None if t is None else t.permute(1, 2, 0) for t in (weight, bias))
            shape = shape[1:] + shape[:1]
        kernels = layer_norm_kernels(self.kernels)
        options = {} if self.kernels == "native" else {"row_kernels": self.row_kernels}
        if slope is not None:
            options["slope"] = slope
        if custom:
            y = _LayerNorm.apply(x, weight, bias, shape, self.eps, kernels, options)
        elif torch.is_grad_enabled():  # the reference: autograd's own derivatives
            y = F.layer_norm(x, shape, weight, bias, self.eps)
            y = y if slope is None else F.leaky_relu(y, slope)
        else:
            y = kernels.forward(x, shape, weight, bias, self.eps, **options)[0]
        return y.permute(0, 3, 1, 2) if channels_last else y


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
            return self.norm(self.conv(x), leaky_relu=True)
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
    """What the discriminator makes of a batch."""
    score: torch.Tensor  # (N, 1): the critic's score (fc1)
    logits: torch.Tensor  # (N, 10): the class logits (fc10)
    features: torch.Tensor  # (N, num_features): the pooled last block, the heads' input without minibatch features


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
        """A Judgement: the critic's score, the class logits and the pooled features (for feature matching).
        extract_features=k in 1..num_layers: instead, the output of conv block k max-pooled over its whole
        spatial extent, (N, channels of block k).
        groups: the minibatch features of a sample come from the batch's 1/groups chunk it is in (see
        MinibatchDiscrimination); the batch size must be a multiple of groups."""
        if not 0 <= extract_features <= self.num_layers:
            raise ValueError(f"extract_features must be 0 (both heads) or a conv layer in 1..{self.num_layers}, "
                             f"got {extract_features}")
        if groups < 1 or len(x) % groups:
            raise ValueError(f"groups must be a positive divisor of the batch size {len(x)}, got {groups}")
        for k, block in enumerate(self.blocks, start=1):
            x = block(x)
            if k == extract_features:
                return F.adaptive_max_pool2d(x, 1).flatten(1)
        features = F.max_pool2d(x, 4, 4).flatten(1)
        h = features if self.minibatch is None else torch.cat([features, self.minibatch(features, groups)], 1)
        return Judgement(self.fc1(h), self.fc10(h), features)


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


class SumOverProcesses(torch.autograd.Function):
    """all_reduce (sum) that autograd differentiates: the gradient of a sum over the processes is the sum of
    every process's gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):  # the base of nn.BatchNorm1d and 2d
    """Batch norm over the global batch under torchrun, as SyncBatchNorm, in one all_reduce of per-channel sums
    per forward and without SyncBatchNorm's host sync (it indexes its gathered counts with a boolean mask in every
    forward); on gloo (CPU) too. The running statistics come from the global batch, so they are the same on every
    process and DDP need not broadcast them. Same parameters and buffers as nn.BatchNorm: same state_dict."""

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims, shape, c = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), self.num_features
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() // c)])
        total = SumOverProcesses.apply(local)
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)  # rounding may take it below 0
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as nn.BatchNorm keeps it
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(shape) + (self.bias - mean * scale).view(shape)


def global_batch_norm(module):
    """The module with each BatchNorm1d/2d replaced by a GlobalBatchNorm holding the same parameter and buffer
    tensors (so an optimizer made before keeps working); in place."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, device="meta")
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, key, getattr(child, key))
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            global_batch_norm(child)
    return module


def set_kernels(model, conv_gradfix=False, layer_norm="native", fuse_leaky_relu=False, row_kernels=False):
    """The model's Conv2d and LayerNorm modules switched to the given kernels (the same math), in place:
    conv_gradfix, Conv2d.gradfix; layer_norm, LayerNorm.kernels ("native" or "triton"); with "triton",
    fuse_leaky_relu and row_kernels, LayerNorm's switches of those names."""
    if (fuse_leaky_relu or row_kernels) and layer_norm != "triton":
        raise ValueError("fuse_leaky_relu and row_kernels need the Triton LayerNorm kernels (layer_norm='triton')")
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.gradfix = conv_gradfix
        elif isinstance(module, LayerNorm):
            module.kernels, module.fuse_leaky_relu, module.row_kernels = layer_norm, fuse_leaky_relu, row_kernels
    return model


def class_noise(labels, generator=None):
    """Generator input for the given labels: N(0, 1) noise whose first 10 entries are the one-hot label."""
    z = torch.randn(len(labels), NOISE_DIM, device=labels.device, generator=generator)
    # Two kernels, and no host sync (F.one_hot reads the labels' range back to check it)
    z[:, :NUM_CLASSES] = 0
    return z.scatter_(1, labels[:, None], 1.0)
