"""A Conv2d whose backward is built from ordinary convolutions, so that the gradient penalty's double backward runs
in cuDNN's kernels instead of autograd's generic ones (as StyleGAN2-ADA's conv2d_gradfix)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def engine_uses(ctx, i):
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
        need = [engine_uses(ctx, i) for i in range(3)]
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
