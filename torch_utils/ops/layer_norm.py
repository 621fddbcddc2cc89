"""A LayerNorm whose second derivative, which the gradient penalty takes, is a few fused expressions; on PyTorch's
kernels or the Triton ones (triton_layer_norm), with the LeakyReLU after it optionally computed inside them."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_utils.ops.conv2d_gradfix import engine_uses


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
        mask = [engine_uses(ctx, i) for i in range(3)]
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
    penalty takes, is a few fused expressions instead of autograd's generic ones (see _LayerNormGrad). kernels: "native"
    (PyTorch's) or "triton" (triton_layer_norm: rows split over the whole GPU; CUDA, or the CPU under
    TRITON_INTERPRET=1). A channels_last input is normalized as its NHWC view with the weight permuted alike: the
    per-sample statistics do not depend on the layout, and no transposing copy is made.
    forward(x, slope) returns F.leaky_relu(layer_norm(x), slope); with fuse_leaky_relu and the Triton kernels,
    the activation is computed inside them (no passes of its own). row_kernels, with the Triton kernels: each row's
    few numbers in one small kernel instead of a dozen torch operations (see triton_layer_norm)."""

    kernels = "native"
    fuse_leaky_relu = False
    row_kernels = False

    def forward(self, x, slope=None):
        if slope is not None and not (self.fuse_leaky_relu and self.kernels == "triton"):
            return F.leaky_relu(self._layer_norm(x), slope)
        return self._layer_norm(x, slope)

    def _layer_norm(self, x, slope=None):
        """layer_norm(x), or with a slope (Triton's kernels only) leaky_relu(layer_norm(x), slope)."""
        channels_last = is_channels_last(x) and len(self.normalized_shape) == 3
        grad = torch.is_grad_enabled()
        if not (grad or channels_last or self.kernels != "native"):  # no Python overhead on the plain path
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
        if grad:
            y = _LayerNorm.apply(x, weight, bias, shape, self.eps, kernels, options)
        else:
            y = kernels.forward(x, shape, weight, bias, self.eps, **options)[0]
        return y.permute(0, 3, 1, 2) if channels_last else y
