"""The assignment's own lines run against models.py: they unpack the discriminator's two heads as a pair
(`_, output = model(X)`), take features with `model(X, extract_features=k)`, and compute the same numbers as the
repo's losses (written here as the assignment writes them, on the CPU: no Variable, no .cuda())."""
import numpy as np
import torch
import torch.nn as nn
from torch import autograd

from models import Discriminator, Generator
from training import gan_steps

batch_size, n_z, n_classes = 6, 100, 10


def calc_gradient_penalty(netD, real_data, fake_data, alpha):
    DIM = 32
    LAMBDA = 10
    alpha = alpha.view(batch_size, 1).expand(batch_size, int(real_data.nelement() / batch_size)).contiguous()
    alpha = alpha.view(batch_size, 3, DIM, DIM)
    fake_data = fake_data.view(batch_size, 3, DIM, DIM)
    interpolates = alpha * real_data.detach() + ((1 - alpha) * fake_data.detach())
    interpolates.requires_grad_(True)
    disc_interpolates, _ = netD(interpolates)
    gradients = autograd.grad(outputs=disc_interpolates, inputs=interpolates,
                              grad_outputs=torch.ones(disc_interpolates.size()),
                              create_graph=True, retain_graph=True, only_inputs=True)[0]
    gradients = gradients.view(gradients.size(0), -1)
    return ((gradients.norm(2, dim=1) - 1) ** 2).mean() * LAMBDA


def test_the_baseline_step_unpacks_the_two_heads():
    torch.manual_seed(0)
    model = Discriminator(8)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    X_train_batch, Y_train_batch = torch.rand(batch_size, 3, 32, 32) * 2 - 1, torch.arange(batch_size)
    losses = []
    for _ in range(5):
        _, output = model(X_train_batch)
        loss = criterion(output, Y_train_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert output.shape == (batch_size, n_classes)
    assert losses[-1] < losses[0]  # the pair's second item is the classifier head that trains


def test_the_gan_lines_compute_the_repo_losses():
    torch.manual_seed(1)
    aG, aD = Generator(8), Discriminator(8)
    criterion = nn.CrossEntropyLoss()
    label = np.random.RandomState(0).randint(0, n_classes, batch_size)
    noise = np.random.RandomState(1).normal(0, 1, (batch_size, n_z))
    label_onehot = np.zeros((batch_size, n_classes))
    label_onehot[np.arange(batch_size), label] = 1
    noise[np.arange(batch_size), :n_classes] = label_onehot[np.arange(batch_size)]
    noise = torch.from_numpy(noise.astype(np.float32))
    fake_label = torch.from_numpy(label)

    fake_data = aG(noise)
    gen_source, gen_class = aD(fake_data)
    gen_cost = -gen_source.mean() + criterion(gen_class, fake_label)
    assert torch.allclose(gen_cost, gan_steps.generator_loss(aD, fake_data, fake_label)[0], rtol=1e-6)

    real_data, real_label = torch.rand(batch_size, 3, 32, 32) * 2 - 1, torch.arange(batch_size)
    disc_real_source, disc_real_class = aD(real_data)
    disc_fake_source, disc_fake_class = aD(fake_data.detach())
    alpha = torch.rand(batch_size)
    gradient_penalty = calc_gradient_penalty(aD, real_data, fake_data, alpha)
    disc_cost = (disc_fake_source.mean() - disc_real_source.mean() + criterion(disc_real_class, real_label)
                 + criterion(disc_fake_class, fake_label) + gradient_penalty)
    ours, _ = gan_steps.discriminator_loss(aD, aD, real_data, real_label, fake_data.detach(), fake_label, alpha)
    assert torch.allclose(disc_cost, ours, rtol=1e-5)


def test_the_visualization_lines_take_heads_and_features():
    torch.manual_seed(2)
    model = Discriminator(16).eval()  # at least the 10 features the assignment's loop indexes
    X = (torch.rand(10, 3, 32, 32) * 2 - 1).requires_grad_(True)
    Y_batch_alternate = (torch.arange(10) + 1) % 10
    _, output = model(X)
    loss = nn.CrossEntropyLoss(reduction="none")(output, Y_batch_alternate)
    gradients = torch.autograd.grad(outputs=loss, inputs=X, grad_outputs=torch.ones(loss.size()),
                                    create_graph=False, retain_graph=False, only_inputs=True)[0]
    assert gradients.abs().sum() > 0

    _, output = model(X)
    prediction = output.data.max(1)[1]
    assert torch.equal(prediction, model(X).logits.argmax(1))

    output = model(X, extract_features=8)
    loss = -output[torch.arange(10).type(torch.int64), torch.arange(10).type(torch.int64)]
    gradients = torch.autograd.grad(outputs=loss, inputs=X, grad_outputs=torch.ones(loss.size()),
                                    create_graph=True, retain_graph=False, only_inputs=True)[0]
    assert output.shape == (10, 16) and gradients.abs().sum() > 0


def test_the_heads_are_named_and_the_features_come_from_their_own_method():
    torch.manual_seed(3)
    disc = Discriminator(8)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    judged = disc(x)
    score, logits = judged
    assert score is judged.score and logits is judged.logits and len(judged) == 2
    heads, features = disc.heads_and_features(x)
    assert torch.equal(heads.score, score) and torch.equal(heads.logits, logits)
    # the pooled last block: what extract_features gives for the last layer
    assert torch.equal(features, disc(x, extract_features=disc.num_layers))
