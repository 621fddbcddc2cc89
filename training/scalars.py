"""What a run's records are called in TensorBoard, without TensorBoard's modules (a trainer names its layout at
start-up; the writer, training.events, loads them only where events are written): each value's tag
<group>/<key>, which values are windows, and the GAN's Custom Scalars layout. The steps' monitored values follow
their tables (gan_steps.MONITORED, baseline_step.MONITORED), the generator's measures metrics.quality.MEASURES."""
from metrics.quality import MEASURES, record_keys
from training import baseline_step, gan_steps
from training.data import CLASSES

# The Scalars tab's groups (a tag's group is the part before its first /), by what a user looks for. The steps'
# monitored values are windowed (every run.LOG_EVERY batches; their epoch means stay in the metrics file) and in
# the groups their tables give; so are the generator's loss and its terms (g_...), whatever their names. The
# generator's measures are metrics.quality's; the epoch records' other keys are grouped here; any key named
# nowhere keeps its record's kind as its group.
MONITORS = gan_steps.MONITORED + baseline_step.MONITORED
GROUPS = {
    "losses": ("train_loss",),
    "accuracy": ("test_acc", "train_acc"),
    "speed": ("images_per_s", "seconds", "seconds_per_epoch", "eta_s", "eval_seconds"),
    "settings": ("lr", "lambda_gp"),
    "eval": record_keys(),
}
GROUP_OF = {key: group for group, keys in GROUPS.items() for key in keys} | {m.key: m.group for m in MONITORS}
WINDOWED = {m.key for m in MONITORS}


def group_of(key, kind):
    return "losses" if key.startswith("g_") else GROUP_OF.get(key, kind)


def windowed(key):
    return key in WINDOWED or key.startswith("g_")


def per_class_name(key):
    """A per-class list's name in its tags per_class/<name>/<class>."""
    return key.removesuffix("_per_class")


def monitor_charts(group, also=None):
    """The Custom Scalars charts of a group's discriminator monitors: one per report panel, under its title, with
    also's extra tag patterns ({title: [pattern]}) joined to the chart of that title, or added after them."""
    charts = {}
    for m in gan_steps.MONITORED:
        if m.group == group:
            charts.setdefault(m.panel, ["Multiline", []])[1].append(rf"^{group}/{m.key}$")
    for title, patterns in (also or {}).items():
        charts.setdefault(title, ["Multiline", []])[1].extend(patterns)
    return charts


# The GAN's Custom Scalars tab: the groups in the order a GAN user reads them, related curves in one chart (a
# report.py panel each). Tags are matched in every run of the logdir: the baseline's test accuracy joins the
# accuracy chart.
GAN_LAYOUT = {
    "health": monitor_charts("health", {"fixed-noise samples' spread, one line per class: 0 if the noise is ignored":
                                        [r"^per_class/noise_spread/"]}),
    "losses": monitor_charts("losses", {"class cross entropy": [r"^losses/g_ce$"],
                                        "generator loss and its terms": [r"^losses/g_(?!ce$)"]}),
    "accuracy": monitor_charts("accuracy", {"accuracy": [r"^accuracy/test_acc$"]}),
    "speed": {"images/s": ["Multiline", [r"^speed/images_per_s$"]],
              "seconds left at the measured pace": ["Multiline", [r"^speed/eta_s$"]]},
    "eval": {(f"{m.title}, one line per class: {m.better}" if m.per_class else f"{m.title}: {m.better}"):
             ["Multiline", [f"^per_class/{per_class_name(m.key)}/" if m.per_class else f"^eval/{m.key}$"]]
             for m in MEASURES},
}


def tags(kind, record):
    """A metrics record's numbers as scalar tags <group>/<key>; a per-class list as per_class/<name>/<class>, one
    curve per class (noise_spread_per_class: per_class/noise_spread/cat). An epoch record's means of the window
    values are left out."""
    found = {}
    for key, value in record.items():
        if key in ("type", "epoch", "batch", "n", "seed") or (kind == "epoch" and windowed(key)):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{group_of(key, kind)}/{key}"] = value
        elif isinstance(value, list) and len(value) == len(CLASSES):
            name = per_class_name(key)
            found.update({f"per_class/{name}/{c}": v for c, v in zip(CLASSES, value) if isinstance(v, (int, float))})
    return found
