"""The GAN's losses and updates: the WGAN-GP critic with its ACGAN classifier, the generator against it, and one
training iteration's two updates as train_gan.py runs them (and bench.py times them).

    nets, recipe = Nets(gen_ddp, disc_ddp, gen, disc, opt_g, opt_d), Recipe.from_args(args, bf16=bf16)
    generator, discriminator = training_steps(nets, recipe, cuda_graphs)
    monitored = discriminator(real, labels, rng, penalty_factor(batch, args.gp_every))
    monitored = generator(n, rng, real)

A new generator loss term is a term in generator_loss (named g_...: the metrics file, TensorBoard and report.py
show every g_ term), a Recipe field for its weight and a train_gan.py flag of the same name. A new discriminator
loss term is a term in discriminator_loss with its line in MONITORED, and again a Recipe field and a flag; a new
value the discriminator's update monitors, its line in MONITORED and its computation in discriminator_loss.
"""
import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from models import NUM_CLASSES, class_noise
from torch_utils.runtime import GraphedStep, autocast
from training.running_means import Monitor

# The discriminator step's monitored values, each a mean over the batch, in the console table's column order: the
# accuracy on the real and on the fake batch, gradient penalty, critic scores of fake and real images, class cross
# entropy of real and fake images, and the health signals: the Wasserstein estimate (real - fake score) and the
# mean norm of the critic's input gradient at the interpolated images (the penalty's own quantity, held near 1).
MONITORED = (
    Monitor("real_acc", "accuracy", "accuracy", "real training batches", "real acc", "8.4f"),
    Monitor("gp", "losses", "gradient penalty", "GP", "gp", "7.3f"),
    Monitor("fake_score", "losses", "critic score fc1", "fake", "fake", "8.3f"),
    Monitor("real_score", "losses", "critic score fc1", "real", "real", "8.3f"),
    Monitor("real_ce", "losses", "class cross entropy", "real"),
    Monitor("fake_ce", "losses", "class cross entropy", "fake"),
    Monitor("fake_acc", "accuracy", "accuracy", "fake batches"),
    Monitor("wasserstein", "health", "Wasserstein estimate (real - fake)", "estimate"),
    Monitor("grad_norm", "health", "critic's gradient norm at x_hat", "mean norm"),
)
MONITORED_KEYS = frozenset(m.key for m in MONITORED)


class Nets(NamedTuple):
    """The two nets and their optimizers. gen_ddp and disc_ddp are what the forward passes go through: the
    DistributedDataParallel wrappers under torchrun, else gen and disc themselves."""
    gen_ddp: torch.nn.Module
    disc_ddp: torch.nn.Module
    gen: torch.nn.Module
    disc: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the updates compute their losses: the penalty's weight, the feature-matching term's weight (0: off) and
    bf16 autocast of the discriminator. from_args reads each field from the flag of its name."""
    lambda_gp: float = 10.0
    feature_matching: float = 0.0
    bf16: bool = False

    @classmethod
    def from_args(cls, args, **given):
        from_flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**from_flags, **given})


def gradient_penalty(score_hat, x_hat, lambda_gp):
    """(lambda * mean((||d score / d x_hat||_2 - 1)^2), kept in the graph (create_graph) so that the
    discriminator's update differentiates through it; the mean of those norms, detached). Outside autocast even
    when the forward pass was in it: the gradient's ops would otherwise be autocast too, undoing the fp32 that a
    layer chose for its forward (the minibatch-discrimination layer's); they follow the forward's dtypes instead."""
    with torch.autocast(score_hat.device.type, enabled=False):
        grad, = torch.autograd.grad(score_hat.sum(), x_hat, create_graph=True)
        norms = grad.flatten(1).norm(dim=1)
        return lambda_gp * ((norms - 1) ** 2).mean(), norms.detach().mean()


def discriminator_loss(disc_ddp, disc, real, real_labels, fake, fake_labels, alpha, recipe=Recipe(), penalty_factor=1):
    """mean(fc1(fake)) - mean(fc1(real)) + CE(fc10(real)) + CE(fc10(fake)) + GP (recipe.lambda_gp), and the
    monitored values (MONITORED).

    Two passes: real and fake images together through disc_ddp for the critic and class terms, then the
    interpolated images alone through disc for the penalty. The penalty's gradient (create_graph) and its
    double backward are the most expensive passes of an iteration; over the interpolated images alone they
    cost a third of what they would over one batch of all three. LayerNorm keeps samples independent, so the
    loss and gradients are those of one batch.

    penalty_factor: what GP is multiplied by in the loss: 1; K on every K-th iteration of a lazy penalty
    (--gp-every K); 0 skips the penalty's pass (the other iterations), and gp and grad_norm are not monitored.

    disc_ddp is the DistributedDataParallel wrapper of disc under torchrun (else disc itself). The penalty's
    pass goes through the plain module: the one backward of the loss sums both passes' gradients into each
    parameter before DDP's hook all-reduces it, so an update is still one all-reduce of one process's
    gradients, whereas a second forward through the wrapper before one backward is not what DDP supports."""
    n = len(real)
    with record_function("discriminator forward (real + fake)"):
        # groups=2: with minibatch discrimination, real images are compared with real ones only, fakes with fakes
        judged = disc_ddp(torch.cat([real, fake]), groups=2)
        scores, logits = judged.score.float(), judged.logits.float()
        real_score, fake_score = scores[:n].mean(), scores[n:].mean()
        real_ce = F.cross_entropy(logits[:n], real_labels)
        fake_ce = F.cross_entropy(logits[n:], fake_labels)
    loss = fake_score - real_score + real_ce + fake_ce
    real_acc = (logits[:n].argmax(1) == real_labels).float().mean()
    fake_acc = (logits[n:].argmax(1) == fake_labels).float().mean()
    monitored = {"fake_score": fake_score, "real_score": real_score, "real_ce": real_ce, "fake_ce": fake_ce,
                 "real_acc": real_acc, "fake_acc": fake_acc, "wasserstein": real_score - fake_score}
    if penalty_factor:
        with record_function("penalty gradient"):
            x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
            gp, monitored["grad_norm"] = gradient_penalty(disc(x_hat).score.float(), x_hat, recipe.lambda_gp)
        loss = loss + penalty_factor * gp
        monitored["gp"] = gp
    assert monitored.keys() <= MONITORED_KEYS, f"not in MONITORED: {sorted(monitored.keys() - MONITORED_KEYS)}"
    return loss, {name: value.detach() for name, value in monitored.items()}


def feature_matching_loss(real_features, fake_features):
    """||mean of the real features - mean of the fake features||^2, the means over the batch."""
    return (real_features.float().mean(0) - fake_features.float().mean(0)).pow(2).sum()


def generator_loss(disc, fake, labels, recipe=Recipe(), real=None):
    """-mean(fc1(G(z))) + CE(fc10(G(z)), label); with recipe.feature_matching W > 0 also
    W * feature_matching_loss of D's pooled last-block features on the real batch and on the fake one. Returns
    the loss and its terms, detached: g_critic, g_ce (and g_fm)."""
    fake_judged, fake_features = disc.heads_and_features(fake)
    terms = {"g_critic": -fake_judged.score.float().mean(), "g_ce": F.cross_entropy(fake_judged.logits.float(), labels)}
    if recipe.feature_matching:
        with torch.no_grad():
            real_features = disc.heads_and_features(real)[1]
        terms["g_fm"] = recipe.feature_matching * feature_matching_loss(real_features, fake_features)
    return sum(terms.values()), {name: value.detach() for name, value in terms.items()}


def generator_draws(n, rng):
    """(labels, noise) of a generator step: random labels and their class noise."""
    labels = torch.randint(0, NUM_CLASSES, (n,), device=rng.device, generator=rng)
    return labels, class_noise(labels, rng)


def generator_update(nets, recipe, labels, noise, real=None):
    """One generator update on the given noise and labels (and, for feature matching, a real batch). The
    discriminator (the plain module, not its DDP wrapper) is frozen: its parameters get no gradient and stay as
    they are. recipe.bf16: autocast the discriminator to bf16 (the generator stays fp32: its gradient has come
    back through both nets). Returns the monitored values: the loss g_loss and its terms."""
    nets.disc.requires_grad_(False)
    with record_function("generator forward + backward"):
        fake = nets.gen_ddp(noise)
        with autocast(noise.device, recipe.bf16):
            loss, terms = generator_loss(nets.disc, fake, labels, recipe, real)
        nets.opt_g.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer"):
        nets.opt_g.step()
    nets.disc.requires_grad_(True)
    return {"g_loss": loss.detach(), **terms}


def generator_step(nets, recipe, n, rng, real=None):
    """generator_update on fresh noise with random labels drawn from rng."""
    return generator_update(nets, recipe, *generator_draws(n, rng), real)


def discriminator_draws(n, rng):
    """(fake labels, their class noise, the penalty's interpolation weights) of a discriminator step."""
    fake_labels = torch.randint(0, NUM_CLASSES, (n,), device=rng.device, generator=rng)
    noise = class_noise(fake_labels, rng)
    return fake_labels, noise, torch.rand(n, device=rng.device, generator=rng)


def discriminator_update(nets, recipe, real, real_labels, fake_labels, noise, alpha, penalty_factor=1):
    """One discriminator update against the fake batch of the given noise (made without gradients, so G is
    untouched); returns the monitored values. recipe.bf16: autocast the discriminator to bf16. penalty_factor:
    see discriminator_loss."""
    with torch.no_grad(), record_function("generator forward (fake batch)"):
        fake = nets.gen_ddp(noise)
    with autocast(real.device, recipe.bf16):
        loss, monitored = discriminator_loss(nets.disc_ddp, nets.disc, real, real_labels, fake, fake_labels, alpha,
                                             recipe, penalty_factor)
    with record_function("discriminator backward"):
        nets.opt_d.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer"):
        nets.opt_d.step()
    return monitored


def discriminator_step(nets, recipe, real, real_labels, rng, penalty_factor=1):
    """discriminator_update against a fresh fake batch drawn from rng."""
    return discriminator_update(nets, recipe, real, real_labels, *discriminator_draws(len(real), rng), penalty_factor)


def training_steps(nets, recipe, cuda_graphs):
    """(generator(n, rng, real), discriminator(real, labels, rng, penalty_factor)): one iteration's two updates as
    train() runs them, each drawing its random inputs from rng first. cuda_graphs: each update (and the
    discriminator's with and without the penalty) a runtime.GraphedStep, the draws made outside the graph in the
    eager order, so that both paths train on the same numbers; the optimizers must be capturable."""
    if not cuda_graphs:  # the module's functions looked up at each call (the tests patch them)
        return (lambda n, rng, real: generator_step(nets, recipe, n, rng, real),
                lambda real, labels, rng, factor: discriminator_step(nets, recipe, real, labels, rng, factor))
    g_graph = GraphedStep(functools.partial(generator_update, nets, recipe))
    d_graphs = {}

    def generator(n, rng, real):
        labels, noise = generator_draws(n, rng)
        return g_graph(labels=labels, noise=noise, **({"real": real} if real is not None else {}))

    def discriminator(real, labels, rng, factor):
        if factor not in d_graphs:
            d_graphs[factor] = GraphedStep(functools.partial(discriminator_update, nets, recipe,
                                                             penalty_factor=factor))
        fake_labels, noise, alpha = discriminator_draws(len(real), rng)
        return d_graphs[factor](real=real, real_labels=labels, fake_labels=fake_labels, noise=noise, alpha=alpha)
    return generator, discriminator


def penalty_factor(batch, gp_every):
    """The penalty's factor in the loss at this batch: gp_every on every gp_every-th batch, else 0 (not computed)."""
    return gp_every if batch % gp_every == 0 else 0
