"""The health signals against hand computations on a tiny net, each warning on its constructed case (a critic
whose gradients blow up, a generator that ignores its noise, ...) and not on healthy values, a warning through
a real run into the log, the metrics and the events, and the report's health section."""
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import NOISE_DIM, NUM_CLASSES, Discriminator, Generator, class_noise
import report
from reporting import inputs
from reporting import pages
from torch_utils.files import append_metrics, read_metrics
import train_gan
from training import gan_steps
from training import health
from training.data import CLASSES

# Window values of a healthy run: the range seen on CIFAR-10 (train_gan.py --width 16 --batch-size 64, two
# epochs, 12 windows) in its first epochs.
HEALTHY = {"wasserstein": 0.9, "grad_norm": 0.98, "fake_acc": 0.1, "real_acc": 0.1, "g_ce": 2.33, "g_critic": 1.1}


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    real, fake = (torch.rand(n, 3, 32, 32, generator=g).double() * 2 - 1 for _ in range(2))
    return real, torch.arange(n) % NUM_CLASSES, fake, torch.randint(0, NUM_CLASSES, (n,), generator=g), \
        torch.rand(n, generator=g).double()


def test_the_critics_signals_match_a_hand_computation():
    torch.manual_seed(0)
    disc = Discriminator(8).double()
    real, y_real, fake, y_fake, alpha = batch(1)
    _, monitored = gan_steps.discriminator_loss(disc, disc, real, y_real, fake, y_fake, alpha)
    s_real, c_real = disc(real)
    s_fake, c_fake = disc(fake)
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(disc(x_hat).score.sum(), x_hat)
    norms = [g.flatten().norm().item() for g in grad]
    assert monitored["wasserstein"].item() == pytest.approx(s_real.mean().item() - s_fake.mean().item(), rel=1e-6)
    assert monitored["grad_norm"].item() == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    assert monitored["fake_acc"].item() == pytest.approx((c_fake.argmax(1) == y_fake).double().mean().item())
    assert monitored["real_acc"].item() == pytest.approx((c_real.argmax(1) == y_real).double().mean().item())


def test_the_generators_loss_splits_into_its_terms():
    torch.manual_seed(0)
    gen, disc = Generator(8), Discriminator(8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    fake, real = gen(class_noise(labels)), torch.rand(6, 3, 32, 32) * 2 - 1
    loss, terms = gan_steps.generator_loss(disc, fake, labels, gan_steps.Recipe(feature_matching=0.5), real)
    scores, logits = disc(fake)
    assert terms["g_critic"].item() == pytest.approx(-scores.mean().item(), rel=1e-6)
    assert terms["g_ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert loss.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    assert set(terms) == {"g_critic", "g_ce", "g_fm"} and terms["g_fm"].item() > 0


def windows(values, count, start_epoch=2):
    return [{"type": "monitor", "epoch": start_epoch, "batch": 50 * (i + 1), **values} for i in range(count)]


def fired_along(records, kind="monitor"):
    """For each record appended in turn, the rules that fire at it."""
    history, fired = {kind: []}, []
    for record in records:
        history[kind].append(record)
        fired.append([rule for rule, _ in health.warnings(history, kind)])
    return fired


def test_a_critic_whose_gradients_blow_up_warns_once_when_it_has_lasted():
    torch.manual_seed(0)
    disc = Discriminator(8).double()
    with torch.no_grad():
        disc.fc1.weight.mul_(1000)
    records = []
    for seed in range(health.SUSTAIN + 2):
        monitored = gan_steps.discriminator_loss(disc, disc, *batch(seed)[:4], batch(seed)[4])[1]
        records += windows({k: v.item() for k, v in monitored.items()}, 1)
    assert all(r["grad_norm"] > health.GRAD_NORM_RANGE[1] for r in records)
    fired = fired_along(records)
    assert ["grad_norm_off" in f for f in fired] == [False] * (health.SUSTAIN - 1) + [True, False, False]
    # One window out of range, then a healthy one, starts no stretch.
    assert not any(fired_along(windows(dict(HEALTHY, grad_norm=5.0), 1) + windows(HEALTHY, 10)))


@pytest.mark.parametrize("values, rule", [
    ({"wasserstein": 300.0}, "wasserstein_exploding"),
    ({"wasserstein": -300.0}, "wasserstein_exploding"),
    ({"wasserstein": -0.2}, "wasserstein_collapsing"),
    ({"fake_acc": 1.0, "g_ce": 2.0}, "fakes_classified_but_class_loss_high"),
])
def test_each_window_rule_fires_on_its_case_and_on_no_healthy_window(values, rule):
    fired = fired_along(windows(dict(HEALTHY, **values), health.SUSTAIN))
    assert fired[-1] == [rule] and not any(fired[:-1])
    assert not any(fired_along(windows(HEALTHY, 3 * health.SUSTAIN)))


def test_a_fresh_critic_scoring_real_and_fake_alike_is_not_a_collapse():
    assert not any(fired_along(windows(dict(HEALTHY, wasserstein=-0.01), 10, start_epoch=1)))


def test_a_generator_that_ignores_its_noise_warns_and_a_fresh_one_does_not():
    torch.manual_seed(0)
    gen = Generator(8)
    with torch.no_grad():  # batch norm's running statistics as a few batches of training leave them
        for _ in range(30):
            gen(class_noise(torch.randint(0, NUM_CLASSES, (64,))))
    noise = train_gan.fixed_noise(0)
    labels = noise[:, :NUM_CLASSES].argmax(1)
    fresh = health.noise_spread(train_gan.fixed_samples(gen, noise), labels)
    with torch.no_grad():
        gen.fc1.weight[:, NUM_CLASSES:] = 0  # only the one-hot class reaches the net
    deaf = health.noise_spread(train_gan.fixed_samples(gen, noise), labels)
    assert max(deaf) < 1e-6 < health.NOISE_SPREAD_BELOW < min(fresh)
    history = {"epoch": [{"epoch": 1, "noise_spread_per_class": fresh}]}
    assert health.warnings(history, "epoch") == []
    history["epoch"].append({"epoch": 2, "noise_spread_per_class": deaf})
    (rule, message), = health.warnings(history, "epoch")
    assert rule == "samples_ignore_noise" and "airplane" in message and "truck" in message
    history["epoch"].append({"epoch": 3, "noise_spread_per_class": deaf})
    assert health.warnings(history, "epoch") == []  # said once per stretch


def test_the_collapse_check_of_evaluate_warns_with_the_classes_it_flags():
    ratios = [1.0] * NUM_CLASSES
    ratios[3] = 0.2
    flagged = {"epoch": 5, "spread_ratio_per_class": ratios, "collapsed_classes": ["cat"]}
    (rule, message), = health.warnings({"eval": [flagged]}, "eval")
    assert rule == "spread_collapsed" and "cat 0.2" in message and message.startswith("warning: ")
    assert "It means" in message and "Usually tried" in message
    assert health.warnings({"eval": [dict(flagged, collapsed_classes=[])]}, "eval") == []


def deaf_generator(width):
    """A generator that ignores its noise: only the one-hot class goes in."""
    gen = Generator(width)
    gen.register_forward_pre_hook(lambda module, args: (args[0] * (torch.arange(NOISE_DIM) < NUM_CLASSES),))
    return gen


def test_a_warning_of_a_real_run_reaches_the_log_the_metrics_the_events_and_the_report(
        tiny_image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(train_gan, "Generator", deaf_generator)
    train_gan.main([str(a) for a in ("--data-dir", tiny_image_folder, "--out-dir", out, "--width", 8, "--batch-size",
                                     32, "--device", "cpu", "--limit-test", 20, "--epochs", 1)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("warning: samples_ignore_noise at epoch 1: ")
    warnings = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "warning"]
    assert warnings == [{"type": "warning", "epoch": 1, "rule": "samples_ignore_noise", "message": lines[0]}]
    events = EventAccumulator(str(out / "tb" / "gan"))
    events.Reload()
    text, = events.Tensors("warnings/samples_ignore_noise/text_summary")
    assert text.step == 8 and text.tensor_proto.string_val[0].decode() == lines[0]

    report.main(["--gan-dir", str(out), "--baseline-dir", str(tmp_path), "--vis-dir", str(tmp_path / "none"),
                 "--out-dir", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Training health" in md and f"- epoch 1: {lines[0]}" in md


def test_the_report_plots_the_signals_and_says_when_no_warning_came(tmp_path):
    records = [{"type": "monitor", "epoch": 1, "batch": 50, "g_loss": 2.0, "gp": 0.5, **HEALTHY},
               {"type": "epoch", "epoch": 1, "test_acc": 0.2, "noise_spread_per_class": [0.3] * NUM_CLASSES,
                **HEALTHY},
               {"type": "eval", "epoch": 1, "n": 100, "spread_ratio_per_class": [0.9] * NUM_CLASSES,
                "collapsed_classes": []}]
    for record in records:
        append_metrics(tmp_path / "gan_metrics.jsonl", record)
    fig = pages.plot_gan([records[1]], [records[0]])
    titles = [ax.get_title() for ax in fig.axes]
    for title in ("Wasserstein estimate (real - fake)", "critic's gradient norm at x_hat", "generator loss",
                  "fixed-noise samples' spread per class"):
        assert title in titles
    accuracy = fig.axes[titles.index("accuracy")]
    assert [line.get_label() for line in accuracy.get_lines()] == ["real training batches", "fake batches",
                                                                    "test set"]
    quality = pages.plot_quality([records[2]],
                                        [m for m in pages.QUALITY if m[0] == "spread_ratio_per_class"])
    assert [line.get_label() for line in quality.axes[0].get_lines()][:NUM_CLASSES] == list(CLASSES)
    found = inputs.gather(report.parse_args(["--gan-dir", str(tmp_path), "--vis-dir", str(tmp_path / "none")]))
    doc = pages.Document()
    pages.write_health(doc, found)
    assert "The health rules raised no warning." in doc.lines
