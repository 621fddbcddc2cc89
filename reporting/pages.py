"""The report's figures and its document: report.md and report.pdf built in memory, a section at a time, from
what reporting.inputs.gather read.
"""
import io
import os
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.ticker import MaxNLocator

from metrics.quality import MEASURES, format_table, measures_help, unavailable_line
from reporting.inputs import DESCRIPTIONS, NOISE_FILES, PERTURB_FILES, test_accuracies
from torch_utils.files import atomic_write
from torch_utils.images import MAX_CLASS_FILE, max_features_file
from training import gan_steps, health
from training.data import CLASSES

PAGE = (11.69, 8.27)  # A4 landscape, inches
STARTS = {"real": "real test images", "mean": "the mean image of the test batch", "noise": "uniform noise images"}
SCALINGS = {"min-max per batch": "one min-max over the whole batch, as the assignment does",
            "min-max per image": "each image min-max scaled on its own"}
QUALITY = MEASURES  # the generator-quality measures plotted over epochs, those the eval records hold


def label(name):
    return f"{DESCRIPTIONS[name]} ({name})" if name in DESCRIPTIONS else name


# ---------------------------------------------------------------------------------------------------------
# Figures

def plot_baseline(records):
    fig, (loss, acc) = plt.subplots(1, 2, figsize=PAGE)
    epochs = [r["epoch"] for r in records]
    value = lambda key: [r.get(key, float("nan")) for r in records]
    loss.plot(epochs, value("train_loss"), label="train loss")
    acc.plot(epochs, value("train_acc"), label="train accuracy (augmented)")
    acc.plot(epochs, value("test_acc"), label="test accuracy")
    # Dotted lines where the learning rate steps down.
    for before, after in zip(records, records[1:]):
        if after.get("lr") != before.get("lr"):
            for ax in (loss, acc):
                ax.axvline(after["epoch"] - 0.5, color="grey", linestyle=":")
    loss.set_ylabel("cross entropy")
    acc.set_ylabel("accuracy")
    for ax in (loss, acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("baseline classifier (train_baseline.py); dotted: learning rate steps")
    return fig


def plot_gan(epochs, monitors):
    """Critic scores, the Wasserstein estimate, gradient penalty and the critic's gradient norm, class cross
    entropies, the generator's loss terms, accuracies, and how much each class's fixed-noise samples vary, over
    training. The monitor records (every 50 batches) sit at epoch - 1 + batch / batches per epoch, counting
    epochs from 1 as the logs do; dotted lines: the health rules' thresholds."""
    per_epoch = max((r["batch"] for r in monitors), default=1) or 1
    points = monitors or epochs
    x = [r["epoch"] - 1 + r["batch"] / per_epoch for r in monitors] if monitors else [r["epoch"] for r in epochs]
    # A panel per report panel of the discriminator's monitors, in the table's order, then the generator's loss
    # with every term the records hold (under its name in the metrics file); its class term joins the class
    # cross entropies. The last axes: the fixed-noise samples' spread.
    panels = {}
    for m in gan_steps.MONITORED:
        panels.setdefault(m.panel, []).append((m.key, m.label))
    panels.setdefault("class cross entropy", []).append(("g_ce", "generator's class term"))
    terms = [(key, key) for key in dict.fromkeys(k for r in points for k in r if k.startswith("g_") and k != "g_loss")]
    panels["generator loss"] = [("g_loss", "loss"), *terms]
    fig, axes = plt.subplots(2, (len(panels) + 2) // 2, figsize=PAGE)
    panel_axes = dict(zip(panels, axes.flat))
    for title, series in panels.items():
        ax = panel_axes[title]
        for key, name in series:
            ax.plot(x, [r.get(key, float("nan")) for r in points], label=name, linewidth=0.8)
        ax.set_title(title, fontsize=9)
    axes_of = {m.key: panel_axes[m.panel] for m in gan_steps.MONITORED}
    for bound in health.GRAD_NORM_RANGE:
        axes_of["grad_norm"].axhline(bound, color="grey", linestyle=":")
    axes_of["wasserstein"].axhline(health.WASSERSTEIN_BELOW, color="grey", linestyle=":")
    axes_of["real_acc"].plot([r["epoch"] for r in epochs], [r.get("test_acc", float("nan")) for r in epochs],
                             label="test set", marker=".")
    spread = [r for r in epochs if isinstance(r.get("noise_spread_per_class"), list)]
    spread_axes = axes.flat[len(panels)]
    spread_axes.plot([r["epoch"] for r in spread], [min(r["noise_spread_per_class"]) for r in spread],
                     marker=".", label="least varied class")
    spread_axes.axhline(health.NOISE_SPREAD_BELOW, color="grey", linestyle=":", label="warning below")
    spread_axes.set_title("fixed-noise samples' spread per class", fontsize=9)
    for ax in axes.flat[:len(panels) + 1]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes.flat[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle("GAN (train_gan.py)")
    fig.tight_layout()
    return fig


def plot_quality(evals, measures):
    """One panel per measure (quality.Measure) over the epochs of the eval records, four to a row: a measure
    with a spread with its error bars, with the real images' level as a dotted line, a per-class measure a line
    per class, a measure's mark (the collapse threshold) dotted."""
    cols = min(4, len(measures))
    fig, axes = plt.subplots(-(-len(measures) // cols), cols, figsize=PAGE, squeeze=False)
    for ax in axes.flat[len(measures):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, measures):
        points = [r for r in evals if m.key in r]
        epochs = [r["epoch"] for r in points]
        scale = 100 if m.percent else 1
        if m.per_class:
            for c, name in enumerate(CLASSES):
                ax.plot(epochs, [scale * r[m.key][c] for r in points], marker=".", linewidth=0.8, label=name)
            ax.legend(fontsize=6)
        elif m.spread:
            ax.errorbar(epochs, [scale * r[m.key] for r in points], yerr=[scale * r.get(m.spread, 0) for r in points],
                        marker="o", capsize=3, label="samples")
        else:
            ax.plot(epochs, [scale * r[m.key] for r in points], marker="o", label="samples")
        reference = points[-1].get(m.real) if m.real else None
        if reference is not None:
            ax.axhline(scale * reference, color="grey", linestyle=":", label="real images")
            ax.legend()
        if m.mark is not None:
            ax.axhline(scale * m.mark, color="grey", linestyle=":")
        ax.set_title(f"{m.title}{' (%)' if m.percent else ''}{', per class' if m.per_class else ''}: {m.better}",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    n = evals[-1].get("n")
    fig.suptitle(f"generator quality over training (train_gan.py --eval-every), {n} samples from fixed noise")
    fig.tight_layout()
    return fig


def image_page(cells, title, rows=1):
    """A page of images side by side (rows x ceil(n / rows)). cells: (Picture, or None for a file that cannot
    be decoded, caption, path)."""
    cols = -(-len(cells) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=PAGE, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, caption, path) in zip(axes.flat, cells):
        if picture is None:
            ax.text(0.5, 0.5, f"damaged: cannot be decoded\n{path}", ha="center", va="center", color="red",
                    transform=ax.transAxes, wrap=True)
        else:
            ax.imshow(picture.pixels, interpolation="nearest")
        ax.set_title(caption)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.05, hspace=0.15)
    return fig


def text_page(title, lines):
    fig = plt.figure(figsize=PAGE)
    fig.text(0.05, 0.92, title, fontsize=18, weight="bold", va="top")
    fig.text(0.05, 0.84, "\n".join(lines), fontsize=10, va="top", family="monospace", wrap=True)
    return fig


# ---------------------------------------------------------------------------------------------------------
# The document

class Document:
    """report.md and report.pdf, built in memory side by side: each part adds Markdown lines, the images to
    put beside report.md, and PDF pages. write() then writes each file atomically, report.pdf last."""

    def __init__(self):
        self.lines = []
        self.files = {}  # path relative to the out-dir -> bytes
        self.buffer = io.BytesIO()
        self.pdf = PdfPages(self.buffer)
        self.pages = 0

    def add(self, *lines):
        self.lines.extend(lines)

    def image(self, picture, rel, caption, path):
        """The Markdown for a picture copied to <out-dir>/rel, or a note when it cannot be decoded."""
        if picture is None:
            return f"_damaged: `{path}` cannot be decoded_"
        self.files[rel] = picture.content
        return f"![{caption}]({rel})"

    def attach(self, rel, content):
        self.files[rel] = content
        return rel

    def page(self, fig, png=None):
        """A figure as a PDF page and, with png, as an image beside report.md."""
        if png is not None:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            self.files[png] = buffer.getvalue()
        self.pdf.savefig(fig)
        plt.close(fig)
        self.pages += 1

    def write(self, out_dir):
        self.pdf.close()
        for rel, content in self.files.items():
            atomic_write(os.path.join(out_dir, rel), content)
        atomic_write(os.path.join(out_dir, "report.md"), ("\n".join(self.lines) + "\n").encode())
        atomic_write(os.path.join(out_dir, "report.pdf"), self.buffer.getvalue())


def gap_notes(found, section, model=None):
    """The Markdown notes for the gaps of a section (of one model's part of it)."""
    notes = [f"- _{g.heading()[0].upper()}{g.heading()[1:]}: {g.text}._" for g in found.gaps
             if g.section == section and g.model == model]
    return [*notes, ""] if notes else []


def gap_lines(found):
    """The gaps as the summary page and the command list them: the assignment's deliverables first."""
    ordered = sorted(found.gaps, key=lambda g: (g.optional, g.kind))
    return [f"{g.heading()}: {g.text}" for g in ordered]


def percent(value, digits=1):
    return "missing" if value is None else f"{value:.{digits}%}"


def write_summary(doc, found, args):
    rows = test_accuracies(found)
    doc.add("# Understanding CNNs and GANs on CIFAR-10: results", "",
            f"Made by `report.py` from `{args.baseline_dir}` (baseline), `{args.gan_dir}` (GAN) and "
            f"`{args.vis_dir}` (visualizations).", "",
            "## Test accuracy", "", "| discriminator | trained by | epochs | test accuracy |", "|---|---|---|---|",
            *(f"| {what} | {script} | {epoch or 'missing'} | {percent(acc, 2)} |" for what, script, epoch, acc in rows),
            "")
    lines = [f"{what}: " + ("missing" if acc is None else f"{acc:.2%} after {epoch} epochs")
             for what, _, epoch, acc in rows]
    for model in found.models:
        p = model["results"].get("perturb")
        if p:
            lines.append(f"{label(model['name'])}: accuracy {p['accuracy_before']:.0%} on {p['images']} test "
                         f"images, {p['accuracy_after']:.0%} after the perturbation (gain {p['gain']:g})")
    missing = sum(not g.optional for g in found.gaps)
    if found.gaps:
        lines += ["", f"{missing} deliverable(s) of the assignment missing or damaged; all gaps:", *gap_lines(found)]
    doc.page(text_page("Understanding CNNs and GANs on CIFAR-10", ["Test accuracy (last epoch):", *lines]))


def write_curves(doc, found):
    doc.add("## Training curves", "")
    if found.baseline:
        doc.page(plot_baseline(found.baseline), "baseline_curves.png")
        doc.add("![baseline training curves](baseline_curves.png)", "")
    if found.gan_epochs or found.monitors:
        doc.page(plot_gan(found.gan_epochs, found.monitors), "gan_curves.png")
        doc.add("![GAN training curves](gan_curves.png)", "")
    doc.add(*gap_notes(found, "curves"))


def write_health(doc, found):
    """The warnings the health rules raised during training (train_gan.py), in the order of training."""
    if not (found.gan_epochs or found.monitors):
        return
    doc.add("## Training health", "")
    if found.warnings:
        lines = [f"epoch {r['epoch']}" + (f", batch {r['batch']}" if "batch" in r else "") + f": {r.get('message')}"
                 for r in found.warnings]
        doc.add("The health rules raised these warnings (docs/watching.md, \"Warnings\", has the thresholds):", "",
                *(f"- {line}" for line in lines), "")
        doc.page(text_page("Training health: warnings", [text for line in lines for text in textwrap.wrap(line, 130)]))
    else:
        doc.add("The health rules raised no warning.", "")


def write_generator(doc, found):
    doc.add("## Generator progress", "")
    grids = found.grids
    if grids:
        doc.add("The fixed noise batch through the generator at epochs spread over training: one column per "
                "class, ten samples each.", "")
        cells = [(doc.image(picture, f"progress/{os.path.basename(path)}", f"epoch {epoch + 1}", path),
                  f"epoch {epoch + 1}") for epoch, path, picture in grids]
        for start in range(0, len(cells), 3):
            row = cells[start:start + 3]
            doc.add("| " + " | ".join(caption for _, caption in row) + " |", "|---" * len(row) + "|",
                    "| " + " | ".join(link for link, _ in row) + " |", "")
        title = "generator progress" + (", every epoch: progress.gif beside report.md" if found.gif else "")
        doc.page(image_page([(picture, f"epoch {epoch + 1}", path) for epoch, path, picture in grids], title,
                            rows=2 if len(grids) > 3 else 1))
    if found.gif:
        path, content = found.gif
        doc.add(f"Every epoch as an animation: [progress.gif]({doc.attach('progress.gif', content)}) "
                f"(from `{path}`)", "")
    doc.add(*gap_notes(found, "generator"))


def write_quality(doc, found):
    doc.add("## Generator quality", "",
            "Measured on class-balanced samples from fixed noise: the Inception measures against the CIFAR-10 "
            "training split (torch-fidelity's InceptionV3), the classifier's against the test split. These "
            "measures are extra: the assignment does not ask for them.", "",
            *(f"- {line}" for line in measures_help()), "")
    evals = found.evals
    if evals:
        measures = [m for m in QUALITY if any(m.key in r for r in evals)]
        if measures:
            doc.page(plot_quality(evals, measures), "generator_quality.png")
            doc.add("![generator quality over epochs](generator_quality.png)", "")
        else:
            doc.add("_The eval records hold none of the measures (see the table)._", "")
        for line in dict.fromkeys(unavailable_line(m, evals[-1]) for m in QUALITY if m not in measures):
            if line:
                doc.add(f"_{line}._", "")
        last = evals[-1]
        write_table(doc, last, f"At epoch {last['epoch']}, the last measurement of `train_gan.py --eval-every`")
    if found.eval_json:
        record = found.eval_json
        write_table(doc, record, f"The final generator measured by `evaluate.py` (`{found.eval_json_path}`, "
                                 f"generator `{record.get('generator')}`)")
    doc.add(*gap_notes(found, "quality"))


def write_table(doc, record, title):
    try:
        table = format_table(record)
    except (KeyError, TypeError, IndexError) as e:
        table = f"the record is incomplete ({type(e).__name__}: {e})"
    doc.add(f"{title}:", "", "```", table, "```", "")
    doc.page(text_page(title.replace("`", ""), table.splitlines()))


def scaling_text(p):
    scaling = p.get("gradient_scaling")
    if scaling is None:
        return "the gradient image's scaling is not recorded in results.json"
    return f"the gradient image is scaled {scaling}" + (f" ({SCALINGS[scaling]})" if scaling in SCALINGS else "")


def alternative_text(p):
    share = p.get("alternative_after")
    return "" if share is None else f", and {share:.1%} are then classified as label + 1"


def start_text(results):
    start = results.get("start")
    return STARTS.get(start, start) if start else "a start not recorded in results.json"


def perturb_cells(doc, found, model, files):
    """The Markdown table and the PDF cells of one perturbation's three images (those that exist)."""
    name, folder = model["name"], model["folder"]
    present = [(f, c, os.path.join(folder, f)) for f, c in files if os.path.isfile(os.path.join(folder, f))]
    cells = [(found.pictures.get(path), c, path) for f, c, path in present]
    if present:
        doc.add("| " + " | ".join(c for _, c, _ in present) + " |", "|---" * len(present) + "|",
                "| " + " | ".join(doc.image(picture, f"{name}/{f}", c, path)
                                  for (f, _, _), (picture, c, path) in zip(present, cells)) + " |", "")
    return cells


def write_perturbation(doc, found):
    doc.add("## Perturbed images", "",
            "Each pixel moves `gain` intensity levels (of 255) against the sign of the gradient of the cross "
            "entropy of the label true + 1. The scaling of the gradient image is stated for each model, as "
            "visualize.py recorded it.", "")
    for model in found.models:
        name, results = model["name"], model["results"]
        doc.add(f"### {label(name)}", "")
        p = results.get("perturb")
        if p:
            doc.add(f"{p['images']} real test images: accuracy {p['accuracy_before']:.1%} before, "
                    f"{p['accuracy_after']:.1%} after the perturbation (gain {p['gain']:g}){alternative_text(p)}; "
                    f"{scaling_text(p)}.", "")
        cells = perturb_cells(doc, found, model, PERTURB_FILES)
        if cells:
            title = label(name) + (f": accuracy {p['accuracy_before']:.0%} -> {p['accuracy_after']:.0%} "
                                   f"(gain {p['gain']:g}, gradient {p.get('gradient_scaling', 'scaling unknown')})"
                                   if p else "")
            doc.page(image_page(cells, title))
        n = results.get("perturb_noise")
        if n or any(os.path.isfile(os.path.join(model["folder"], f)) for f, _ in NOISE_FILES):
            doc.add("#### noise images", "")
        if n:
            doc.add(f"{n['images']} images of uniform noise, labelled as the model classifies them: after the "
                    f"perturbation (gain {n['gain']:g}) {n['accuracy_after']:.1%} keep that class"
                    f"{alternative_text(n)}; {scaling_text(n)}.", "")
        cells = perturb_cells(doc, found, model, NOISE_FILES)
        if cells:
            title = f"{label(name)}, noise images" + (
                f": {n['accuracy_after']:.0%} keep their class (gain {n['gain']:g}, gradient "
                f"{n.get('gradient_scaling', 'scaling unknown')})" if n else "")
            doc.page(image_page(cells, title))
        doc.add(*gap_notes(found, "perturb", name))
    doc.add(*gap_notes(found, "models"))


def write_max_class(doc, found):
    doc.add("## Synthetic images maximizing each class", "")
    for model in found.models:
        name, folder = model["name"], model["folder"]
        doc.add(f"### {label(name)}", "")
        path = os.path.join(folder, MAX_CLASS_FILE)
        if os.path.isfile(path):
            def summary(c, start):
                hits = sum(p == cls for p, cls in zip(c.get("predicted", []), CLASSES))
                return (f"{c['iterations']} steps of lr {c['lr']:g}, weight decay {c['weight_decay']:g}, starting "
                        f"from {start}; {hits} of 10 images are classified as their class.")
            write_synthesis(doc, found, model, path, MAX_CLASS_FILE, model["results"].get("max_class"), summary,
                            f"class maximization, {name}", f"{label(name)}: one image per class")
        doc.add(*gap_notes(found, "max_class", name))
    doc.add(*gap_notes(found, "models"))


def write_synthesis(doc, found, model, path, file, settings, summary, caption, page_title):
    """One synthesized image of a model: summary(settings, start) of how it was made (or a note that
    results.json does not say), the image, and its PDF page."""
    start = start_text(settings or {})
    doc.add(summary(settings, start) if settings else
            f"_{model['folder']}/results.json does not record this synthesis' settings or start._", "")
    doc.add(doc.image(found.pictures.get(path), f"{model['name']}/{file}", caption, path), "")
    doc.page(image_page([(found.pictures.get(path), "", path)], f"{page_title}, from {start}"))


def write_max_features(doc, found):
    doc.add("## Synthetic images maximizing features", "",
            "Image i maximizes feature i of the layer (its map max-pooled over space), for the first 100 "
            "features, row by row.", "")
    for model in found.models:
        name, folder = model["name"], model["folder"]
        doc.add(f"### {label(name)}", "")
        for layer in model["layers"]:
            file = max_features_file(layer)
            path = os.path.join(folder, file)
            doc.add(f"#### layer {layer}", "")
            summary = lambda c, start: (f"{c.get('features', '?')} features, {c['iterations']} steps of lr "
                                        f"{c['lr']:g}, weight decay {c['weight_decay']:g}, starting from {start}.")
            write_synthesis(doc, found, model, path, file, model["results"].get("max_features", {}).get(str(layer)),
                            summary, f"layer {layer}, {name}", f"{label(name)}: features of layer {layer}")
        doc.add(*gap_notes(found, "max_features", name))
    doc.add(*gap_notes(found, "models"))
