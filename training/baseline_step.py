"""The baseline classifier's update: cross entropy of the discriminator's class head, its critic head frozen.
train_baseline.py runs it; bench.py times it."""
import torch.nn.functional as F

from torch_utils.runtime import autocast
from training.running_means import Monitor

# train_step's monitored values, means over the batch; the epoch record holds their epoch means as train_loss and
# train_acc, the console table's columns
MONITORED = (Monitor("loss", "losses", "training loss", "loss"), Monitor("acc", "accuracy", "accuracy", "train"))


def freeze_critic_head(model):
    """The classifier never uses the critic head fc1: freeze it, so that no optimizer state is kept for it and
    DistributedDataParallel, which expects a gradient for every trainable parameter, finds none missing."""
    model.fc1.requires_grad_(False)


def train_step(net, optimizer, x, labels, bf16=False):
    """One Adam step on cross entropy of fc10; returns (loss, accuracy) on the batch as device tensors.
    bf16: autocast the forward pass to bf16."""
    with autocast(x.device, bf16):
        logits = net(x).logits.float()
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).float().mean()
