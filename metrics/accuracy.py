"""The classifier's accuracy, the one definition the trainers' test pass and visualize.py's perturbations share."""
import torch

from training.data import to_float


@torch.no_grad()
def accuracy(model, batches):
    """Fraction of the images whose class head (fc10) argmax is their label, over batches of (images in [-1, 1],
    labels); one host sync at the end."""
    correct, count = 0, 0
    for images, labels in batches:
        correct = correct + (model(images).logits.argmax(1) == labels).sum()
        count += len(labels)
    return float(correct) / count


def loader_accuracy(model, loader):
    """accuracy over the loader's images, in eval mode; the model is left in train mode."""
    model.eval()
    result = accuracy(model, ((to_float(images), labels) for _, images, labels in loader.batches()))
    model.train()
    return result
