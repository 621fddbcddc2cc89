"""Batch norm whose statistics cover the global batch under torchrun (the generator's, NCCL and gloo alike)."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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
