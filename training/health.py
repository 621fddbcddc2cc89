"""Is a run healthy? The known failures of a WGAN-GP + ACGAN run, as rules over the records the trainers log
(monitor windows every training.LOG_EVERY batches, epoch records, eval records): pure functions of those
records, so that they are tested on constructed cases without training.

    history = {"monitor": [...], "epoch": [...], "eval": [...]}   # the records so far, each list oldest first
    for rule, message in warnings(history, "monitor"): ...          # after appending a monitor record

A rule fires once per stretch: at the record that makes its condition hold for `sustain` records in a row.
Records without a rule's values (the baseline's, a GAN run without --eval-classifier) never fire it.
"""
from typing import Callable, NamedTuple

from training.data import CLASSES

# Thresholds. Windows are of training.LOG_EVERY (50) batches.
SUSTAIN = 5  # windows in a row (250 batches) before a window rule fires: one noisy window is no failure
GRAD_NORM_RANGE = (0.5, 2.0)  # the penalty holds the critic's input-gradient norm near 1; outside this it fails
WASSERSTEIN_ABOVE = 100.0  # no 1-Lipschitz critic separates images in [-1, 1]^(3x32x32) by more (their
#                            L2 distance is at most 2 sqrt(3072) = 111): above it the constraint has broken
WASSERSTEIN_BELOW = 0.0  # real images no longer scored above fakes: the critic tells them apart no more
WARMUP_EPOCHS = 1  # ...after this many epochs: a fresh critic scores real and fake alike, its estimate starts at 0
FAKE_ACC_PERFECT = 0.99  # the auxiliary classifier is right on (nearly) every fake of the critic's batch...
G_CLASS_LOSS_HIGH = 1.0  # ...while the generator's class cross entropy stays above this (chance: ln 10 = 2.3)
NOISE_SPREAD_BELOW = 0.02  # RMS per-pixel spread (images in [-1, 1]) of one class's fixed-noise samples
#                            around their mean: below it they are all one picture (real classes: ~0.5)


class Rule(NamedTuple):
    name: str
    kind: str  # the records it reads: "monitor", "epoch" or "eval"
    sustain: int  # records in a row the condition must hold
    check: Callable  # record -> what is wrong (str), or None when healthy or not measured
    meaning: str
    advice: str  # what users usually try: flags a --resume may change, or a new run for one it may not


def grad_norm_off(r):
    norm, (low, high) = r.get("grad_norm"), GRAD_NORM_RANGE
    if norm is not None and not low <= norm <= high:
        return f"the critic's gradient norm at the interpolated images is {norm:.3g}, outside [{low:g}, {high:g}]"


def wasserstein_exploding(r):
    w = r.get("wasserstein")
    if w is not None and abs(w) > WASSERSTEIN_ABOVE:
        return f"the Wasserstein estimate is {w:.4g}, beyond +-{WASSERSTEIN_ABOVE:g}"


def wasserstein_collapsing(r):
    w = r.get("wasserstein")
    if w is not None and -WASSERSTEIN_ABOVE <= w <= WASSERSTEIN_BELOW and r.get("epoch", 0) > WARMUP_EPOCHS:
        return f"the Wasserstein estimate is {w:.3g}, at or below {WASSERSTEIN_BELOW:g}"


def fakes_classified_but_class_loss_high(r):
    acc, ce = r.get("fake_acc"), r.get("g_ce")
    if acc is not None and ce is not None and acc >= FAKE_ACC_PERFECT and ce > G_CLASS_LOSS_HIGH:
        return (f"the auxiliary classifier is right on {acc:.1%} of the critic's fakes while the generator's "
                f"class loss is {ce:.3g} (above {G_CLASS_LOSS_HIGH:g})")


def classes_below(r, key, threshold):
    """'class value' of each class whose value in the record's per-class list is under threshold."""
    values = r.get(key)
    if isinstance(values, list) and len(values) == len(CLASSES):
        return [f"{CLASSES[c]} {v:.3g}" for c, v in enumerate(values) if v < threshold]
    return []


def spread_collapsed(r):
    """evaluate.py's collapse check (its COLLAPSE_BELOW), as an eval record holds it."""
    collapsed = r.get("collapsed_classes")
    if collapsed:
        ratios = dict(zip(CLASSES, r.get("spread_ratio_per_class") or []))
        named = ", ".join(f"{c} {ratios[c]:.3g}" if c in ratios else c for c in collapsed)
        return f"evaluate.py's collapse check flags the per-class spread of the samples' features: {named}"


def samples_ignore_noise(r):
    low = classes_below(r, "noise_spread_per_class", NOISE_SPREAD_BELOW)
    if low:
        return (f"the fixed-noise samples of a class barely change with the noise ({', '.join(low)}; under "
                f"{NOISE_SPREAD_BELOW:g})")


RULES = [
    Rule("grad_norm_off", "monitor", SUSTAIN, grad_norm_off,
         "the gradient penalty no longer keeps the critic 1-Lipschitz, so its scores stop measuring a distance",
         "--resume with a lower --lr or a higher --lambda-gp"),
    Rule("wasserstein_exploding", "monitor", SUSTAIN, wasserstein_exploding,
         "the critic's scores run away: its constraint has broken and the generator gets no useful gradient",
         "--resume with a lower --lr or a higher --lambda-gp"),
    Rule("wasserstein_collapsing", "monitor", SUSTAIN, wasserstein_collapsing,
         "the critic no longer scores real images above fakes: it has stopped learning, or lost to the generator",
         "--resume with --n-critic 5 (five critic steps per generator step) or a lower --lr"),
    Rule("fakes_classified_but_class_loss_high", "monitor", SUSTAIN, fakes_classified_but_class_loss_high,
         "the classifier recognizes the fakes it trains on by cues that the generator's fresh samples lack, so "
         "its class term no longer steers the generator",
         "--resume with a lower --lr or with --feature-matching 0.1; if it persists, a new run (another --out-dir) "
         "with --minibatch-discrimination"),
    Rule("spread_collapsed", "eval", 1, spread_collapsed,
         "mode collapse: the samples of those classes are far less varied than real images of them",
         "--resume with a lower --lr; if it persists, a new run (another --out-dir) with --minibatch-discrimination"),
    Rule("samples_ignore_noise", "epoch", 1, samples_ignore_noise,
         "the generator ignores its noise for those classes: every sample of a class is the same picture",
         "--resume with a lower --lr; if it persists, a new run (another --out-dir) with --minibatch-discrimination"),
]


def warnings(history, kind, rules=RULES):
    """(rule name, one-line message) of each rule of this kind that fires at the last record of history[kind]."""
    records = history.get(kind, [])
    fired = []
    for rule in rules:
        if rule.kind != kind or len(records) < rule.sustain:
            continue
        details = [rule.check(r) for r in records[-rule.sustain - 1:]]
        stretch = details[-rule.sustain:]
        started_now = len(details) == rule.sustain or details[0] is None
        if all(stretch) and started_now:
            last = records[-1]
            where = f"epoch {last.get('epoch')}" + (f", batch {last['batch']}" if "batch" in last else "")
            over = f" for {rule.sustain} windows in a row" if rule.sustain > 1 else ""
            fired.append((rule.name, f"warning: {rule.name} at {where}: {stretch[-1]}{over}. It means "
                                     f"{rule.meaning}. Usually tried: {rule.advice}."))
    return fired


def keep(kind, rules=RULES):
    """How many of the latest records of a kind the rules read."""
    return max([r.sustain + 1 for r in rules if r.kind == kind], default=1)


def noise_spread(images, labels):
    """Per class, the RMS per-pixel distance of its images (N, C, H, W) from their mean: how much its samples
    change with the noise. A list in CLASSES order (NaN for a class with fewer than two images)."""
    spreads = []
    for c in range(len(CLASSES)):
        x = images[labels == c].float().flatten(1)
        spreads.append((x - x.mean(0)).pow(2).mean().sqrt().item() if len(x) > 1 else float("nan"))
    return spreads
