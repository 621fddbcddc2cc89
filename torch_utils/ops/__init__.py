"""GPU kernels and the layers built on them: the gradfix convolution, the LayerNorm with a compact double backward
(on PyTorch's kernels or Triton's), the global batch norm, and set_kernels, which switches a model's layers."""
import torch.nn as nn

from torch_utils.ops.conv2d_gradfix import Conv2d
from torch_utils.ops.layer_norm import LayerNorm


def set_kernels(model, conv_gradfix=False, layer_norm="native", fuse_leaky_relu=False, row_kernels=False):
    """The model's Conv2d and LayerNorm modules switched to the given kernels (the same math), in place:
    conv_gradfix, Conv2d.gradfix; layer_norm, LayerNorm.kernels ("native" or "triton"); with "triton",
    fuse_leaky_relu and row_kernels, LayerNorm's switches of those names. A plain nn.Conv2d beside these Conv2d
    layers, or a plain nn.LayerNorm, would keep its own kernels while the rest switch: refused."""
    if (fuse_leaky_relu or row_kernels) and layer_norm != "triton":
        raise ValueError("fuse_leaky_relu and row_kernels need the Triton LayerNorm kernels (layer_norm='triton')")
    modules = dict(model.named_modules())
    switched = {Conv2d: conv_gradfix, LayerNorm: layer_norm != "native"}
    for layer, plain in ((Conv2d, nn.Conv2d), (LayerNorm, nn.LayerNorm)):
        if not switched[layer]:
            continue
        ours = any(isinstance(m, layer) for m in modules.values())
        for name, module in modules.items():
            if type(module) is plain and (ours or plain is nn.LayerNorm):
                raise ValueError(f"{name} is a plain {plain.__name__}, which set_kernels cannot switch: build it "
                                 f"from torch_utils.ops.{layer.__name__}")
    for module in modules.values():
        if isinstance(module, Conv2d):
            module.gradfix = conv_gradfix
        elif isinstance(module, LayerNorm):
            module.kernels, module.fuse_leaky_relu, module.row_kernels = layer_norm, fuse_leaky_relu, row_kernels
    return model
