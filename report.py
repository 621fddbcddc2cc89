"""Gather the assignment's deliverables into one document to hand in: <out-dir>/report.md with its images
beside it, and the same content as <out-dir>/report.pdf (one figure per page).

    python report.py                                        # reads . and visualization/, writes report/
    python report.py --run-dir runs/w128 --vis-dir runs/w128/visualization --out-dir runs/w128/report

Reads from --run-dir: baseline_metrics.jsonl (train_baseline.py), gan_metrics.jsonl and output/NNN.png
(train_gan.py), progress.gif (make_gif.py, optional); from --vis-dir: one folder per discriminator as
visualize.py writes them (cifar10/ and discriminator/ by default). A part whose inputs are missing says so in
the document, and the command lists it, instead of failing.
"""
import argparse
import json
import os
import re
import shutil

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages

from data import CLASSES
from make_gif import epoch_grids
from files import UserError, read_metrics, run_main

PAGE = (11.69, 8.27)  # A4 landscape, inches
FEATURES_NAME = re.compile(r"^max_features_layer(\d+)\.png$")
PERTURB_FILES = [("real_images.png", "real images"), ("gradient_image.png", "gradient"),
                 ("jittered_images.png", "perturbed")]
# What the default model names of visualize.py (the file stems) stand for; other names are shown as they are.
DESCRIPTIONS = {"cifar10": "baseline classifier", "discriminator": "GAN discriminator"}
VISUALIZE = "python visualize.py all --model cifar10.model --model discriminator.model"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=".",
                        help="where the trainers wrote their metrics, output/ grids and models (default: .)")
    parser.add_argument("--vis-dir", default="visualization",
                        help="visualize.py's --out-dir: one folder per model (default: visualization)")
    parser.add_argument("--out-dir", default="report", help="where report.md, report.pdf and the images go "
                                                            "(default: report)")
    parser.add_argument("--grids", type=int, default=6,
                        help="generator grids to show, evenly spread from the first epoch to the last (default: 6)")
    return parser.parse_args(argv)


def label(name):
    return f"{DESCRIPTIONS[name]} ({name})" if name in DESCRIPTIONS else name


def read_records(path, missing, hint):
    """The records of a metrics file, or None (noted as missing) when there is none or it is unreadable."""
    if not os.path.isfile(path):
        missing.append(f"{path} ({hint})")
        return None
    try:
        records, skipped = read_metrics(path)
    except OSError as e:
        missing.append(f"{path} is unreadable ({e.strerror}); {hint}")
        return None
    if skipped:
        print(f"note: skipped {skipped} damaged line(s) of {path}")
    if not records:
        missing.append(f"{path} is empty ({hint})")
        return None
    return records


def spread(items, count):
    """count items evenly spread from the first to the last (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def model_inputs(vis_dir, name):
    folder = os.path.join(vis_dir, name)
    results = {}
    if os.path.isfile(os.path.join(folder, "results.json")):
        try:
            with open(os.path.join(folder, "results.json")) as f:
                results = json.load(f)
        except (OSError, ValueError):
            pass  # the images are shown without their numbers; the document says so
    layers = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := FEATURES_NAME.match(f)))
    return {"name": name, "folder": folder, "results": results, "layers": layers}


def gather(args):
    """Everything the report shows that exists, and a list of what is missing."""
    missing = []
    found = {
        "baseline": read_records(os.path.join(args.run_dir, "baseline_metrics.jsonl"), missing,
                                 "run train_baseline.py"),
        "gan": read_records(os.path.join(args.run_dir, "gan_metrics.jsonl"), missing, "run train_gan.py"),
    }
    output = os.path.join(args.run_dir, "output")
    try:
        grids = epoch_grids(output)
    except UserError:
        grids = []
        missing.append(f"{output}/NNN.png generator grids (run train_gan.py)")
    found["grids"] = spread(grids, args.grids)
    gif = os.path.join(args.run_dir, "progress.gif")
    found["gif"] = gif if os.path.isfile(gif) else None

    names = sorted(d.name for d in os.scandir(args.vis_dir) if d.is_dir()) if os.path.isdir(args.vis_dir) else []
    names.sort(key=lambda n: (n not in DESCRIPTIONS, n))  # the baseline, then the GAN, then others
    found["models"] = [model_inputs(args.vis_dir, n) for n in names]
    if not names:
        missing.append(f"{args.vis_dir}/<model>/ visualizations ({VISUALIZE})")
    elif len(names) == 1:
        missing.append(f"a second model in {args.vis_dir}/: the assignment shows both discriminators ({VISUALIZE})")
    for model in found["models"]:
        folder, results = model["folder"], model["results"]
        for file, _ in PERTURB_FILES + [("max_class.png", None)]:
            if not os.path.isfile(os.path.join(folder, file)):
                missing.append(f"{folder}/{file} ({VISUALIZE})")
        if "perturb" not in results:
            missing.append(f"{folder}/results.json with the perturbation's accuracies (visualize.py perturb)")
        if len(model["layers"]) < 2:
            missing.append(f"{folder}/max_features_layer<K>.png for two layers or more (visualize.py max-features)")
    found["missing"] = missing
    return found


def last_epoch(records):
    """The last per-epoch record: every baseline record, the "epoch" records of the GAN."""
    epochs = [r for r in records or [] if r.get("type", "epoch") == "epoch"]
    return epochs[-1] if epochs else None


def test_accuracies(found):
    """(discriminator, trained by, last epoch, test accuracy) of both nets; None where the metrics are missing."""
    rows = []
    for key, what, script in [("baseline", "baseline classifier", "train_baseline.py, cifar10.model"),
                              ("gan", "GAN discriminator (auxiliary classifier)", "train_gan.py, discriminator.model")]:
        record = last_epoch(found[key])
        rows.append((what, script, record and record["epoch"], record and record["test_acc"]))
    return rows


def plot_baseline(records):
    fig, (loss, acc) = plt.subplots(1, 2, figsize=PAGE)
    epochs = [r["epoch"] for r in records]
    loss.plot(epochs, [r["train_loss"] for r in records], label="train loss")
    acc.plot(epochs, [r["train_acc"] for r in records], label="train accuracy (augmented)")
    acc.plot(epochs, [r["test_acc"] for r in records], label="test accuracy")
    # Dotted lines where the learning rate steps down.
    for before, after in zip(records, records[1:]):
        if after["lr"] != before["lr"]:
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


def plot_gan(records):
    """Critic scores, gradient penalty, class cross entropies and accuracies over training. The monitor records
    (every 50 batches) sit at epoch - 1 + batch / batches per epoch, counting epochs from 1 as the logs do."""
    epochs = [r for r in records if r.get("type") == "epoch"]
    monitors = [r for r in records if r.get("type") == "monitor"]
    per_epoch = max((r["batch"] for r in monitors), default=1) or 1
    points = monitors or epochs
    x = [r["epoch"] - 1 + r["batch"] / per_epoch for r in monitors] if monitors else [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(2, 2, figsize=PAGE)
    panels = [(axes[0, 0], "critic score fc1", [("real_score", "real"), ("fake_score", "fake")]),
              (axes[0, 1], "gradient penalty", [("gp", "GP")]),
              (axes[1, 0], "class cross entropy", [("real_ce", "real"), ("fake_ce", "fake")]),
              (axes[1, 1], "accuracy", [("real_acc", "real training batches")])]
    for ax, title, series in panels:
        for key, name in series:
            ax.plot(x, [r.get(key, float("nan")) for r in points], label=name, linewidth=0.8)
        ax.set_title(title)
    axes[1, 1].plot([r["epoch"] for r in epochs], [r["test_acc"] for r in epochs], label="test set", marker=".")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GAN (train_gan.py)")
    fig.tight_layout()
    return fig


def image_page(paths_titles, title, rows=1):
    """A page of PNGs side by side (rows x ceil(n / rows)), each under its title."""
    cols = -(-len(paths_titles) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=PAGE, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, caption) in zip(axes.flat, paths_titles):
        ax.imshow(plt.imread(path), interpolation="nearest")
        ax.set_title(caption)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.05, hspace=0.15)
    return fig


def text_page(title, lines):
    fig = plt.figure(figsize=PAGE)
    fig.text(0.05, 0.92, title, fontsize=18, weight="bold", va="top")
    fig.text(0.05, 0.84, "\n".join(lines), fontsize=10, va="top", family="monospace", wrap=True)
    return fig


class Document:
    """report.md and report.pdf, written side by side: each part adds Markdown lines, copies its images
    beside report.md, and adds PDF pages."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.lines = []
        self.pdf = PdfPages(os.path.join(out_dir, "report.pdf"))
        self.pages = 0

    def add(self, *lines):
        self.lines.extend(lines)

    def copy(self, src, rel):
        """src copied to <out-dir>/rel; returns rel, the Markdown link."""
        dst = os.path.join(self.out_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)
        return rel

    def page(self, fig, png=None):
        """A figure as a PDF page and, with png, as an image beside report.md."""
        if png is not None:
            fig.savefig(os.path.join(self.out_dir, png), dpi=100)
        self.pdf.savefig(fig)
        plt.close(fig)
        self.pages += 1

    def close(self):
        self.pdf.close()
        with open(os.path.join(self.out_dir, "report.md"), "w") as f:
            f.write("\n".join(self.lines) + "\n")


def missing_note(found, *needles):
    """The Markdown notes for the missing inputs whose description contains any of the needles."""
    notes = [f"- _Missing: {m}._" for m in found["missing"] if any(n in m for n in needles)]
    return [*notes, ""] if notes else []


def write_summary(doc, found, args):
    rows = test_accuracies(found)
    doc.add("# Understanding CNNs and GANs on CIFAR-10: results", "",
            f"Made by `report.py` from `{args.run_dir}` (training) and `{args.vis_dir}` (visualizations).", "",
            "## Test accuracy", "", "| discriminator | trained by | epochs | test accuracy |", "|---|---|---|---|",
            *(f"| {what} | {script} | {epoch or 'missing'} | {'missing' if acc is None else f'{acc:.2%}'} |"
              for what, script, epoch, acc in rows), "")
    lines = [f"{what}: " + ("missing" if acc is None else f"{acc:.2%} after {epoch} epochs")
             for what, _, epoch, acc in rows]
    for model in found["models"]:
        p = model["results"].get("perturb")
        if p:
            lines.append(f"{label(model['name'])}: accuracy {p['accuracy_before']:.0%} on {p['images']} test "
                         f"images, {p['accuracy_after']:.0%} after the perturbation (gain {p['gain']:g})")
    if found["missing"]:
        lines += ["", "Missing:", *found["missing"]]
    doc.page(text_page("Understanding CNNs and GANs on CIFAR-10", ["Test accuracy (last epoch):", *lines]))


def write_curves(doc, found):
    doc.add("## Training curves", "")
    if found["baseline"]:
        doc.page(plot_baseline(found["baseline"]), "baseline_curves.png")
        doc.add("![baseline training curves](baseline_curves.png)", "")
    if found["gan"]:
        doc.page(plot_gan(found["gan"]), "gan_curves.png")
        doc.add("![GAN training curves](gan_curves.png)", "")
    doc.add(*missing_note(found, "metrics.jsonl"))


def write_generator(doc, found):
    doc.add("## Generator progress", "")
    grids = found["grids"]
    if grids:
        doc.add("The fixed noise batch through the generator at epochs spread over training: one column per "
                "class, ten samples each.", "")
        cells = [(doc.copy(path, f"progress/{os.path.basename(path)}"), f"epoch {epoch + 1}") for epoch, path in grids]
        for start in range(0, len(cells), 3):
            row = cells[start:start + 3]
            doc.add("| " + " | ".join(caption for _, caption in row) + " |", "|---" * len(row) + "|",
                    "| " + " | ".join(f"![{caption}]({rel})" for rel, caption in row) + " |", "")
        doc.page(image_page([(path, f"epoch {epoch + 1}") for epoch, path in grids], "generator progress",
                            rows=2 if len(grids) > 3 else 1))
    if found["gif"]:
        doc.add(f"Every epoch as an animation: [progress.gif]({doc.copy(found['gif'], 'progress.gif')})", "")
    doc.add(*missing_note(found, "generator grids"))


def no_models(found):
    return missing_note(found, "visualizations (", "second model")


def write_perturbation(doc, found):
    doc.add("## Perturbed real images", "",
            "Each pixel moves `gain` intensity levels (of 255) against the gradient of the cross entropy of "
            "the label true + 1; the gradient is shown min-max scaled per image.", "")
    for model in found["models"]:
        name, folder, p = model["name"], model["folder"], model["results"].get("perturb")
        doc.add(f"### {label(name)}", "")
        if p:
            doc.add(f"Accuracy on {p['images']} test images: {p['accuracy_before']:.1%} before, "
                    f"{p['accuracy_after']:.1%} after the perturbation (gain {p['gain']:g}).", "")
        present = [(f, c) for f, c in PERTURB_FILES if os.path.isfile(os.path.join(folder, f))]
        if present:
            doc.add("| " + " | ".join(c for _, c in present) + " |", "|---" * len(present) + "|",
                    "| " + " | ".join(f"![{c}]({doc.copy(os.path.join(folder, f), f'{name}/{f}')})"
                                      for f, c in present) + " |", "")
            title = label(name) + (f": accuracy {p['accuracy_before']:.0%} -> {p['accuracy_after']:.0%}" if p else "")
            doc.page(image_page([(os.path.join(folder, f), c) for f, c in present], title))
        doc.add(*missing_note(found, *(f"{folder}/{f}" for f, _ in PERTURB_FILES), f"{folder}/results.json"))
    doc.add(*no_models(found))


def write_max_class(doc, found):
    doc.add("## Synthetic images maximizing each class", "")
    for model in found["models"]:
        name, folder = model["name"], model["folder"]
        doc.add(f"### {label(name)}", "")
        path = os.path.join(folder, "max_class.png")
        if os.path.isfile(path):
            c = model["results"].get("max_class")
            if c:
                hits = sum(p == cls for p, cls in zip(c["predicted"], CLASSES))
                doc.add(f"{c['iterations']} steps of lr {c['lr']:g}, weight decay {c['weight_decay']:g}; "
                        f"{hits} of 10 images are classified as their class.", "")
            doc.add(f"![class maximization, {name}]({doc.copy(path, f'{name}/max_class.png')})", "")
            doc.page(image_page([(path, "")], f"{label(name)}: one image per class"))
        doc.add(*missing_note(found, f"{folder}/max_class.png"))
    doc.add(*no_models(found))


def write_max_features(doc, found):
    doc.add("## Synthetic images maximizing features", "",
            "Image i maximizes feature i of the layer (its map max-pooled over space), for the first 100 "
            "features, row by row.", "")
    for model in found["models"]:
        name, folder = model["name"], model["folder"]
        doc.add(f"### {label(name)}", "")
        for layer in model["layers"]:
            file = f"max_features_layer{layer}.png"
            path = os.path.join(folder, file)
            doc.add(f"#### layer {layer}", "", f"![layer {layer}, {name}]({doc.copy(path, f'{name}/{file}')})", "")
            doc.page(image_page([(path, "")], f"{label(name)}: features of layer {layer}"))
        doc.add(*missing_note(found, f"{folder}/max_features_layer"))
    doc.add(*no_models(found))


def report(args):
    if args.grids < 2:
        raise UserError(f"--grids must be at least 2, got {args.grids}")
    found = gather(args)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {args.out_dir}: {e.strerror}")
    doc = Document(args.out_dir)
    write_summary(doc, found, args)
    write_curves(doc, found)
    write_generator(doc, found)
    write_perturbation(doc, found)
    write_max_class(doc, found)
    write_max_features(doc, found)
    doc.close()
    for item in found["missing"]:
        print(f"missing: {item}")
    print(f"wrote {os.path.join(args.out_dir, 'report.md')} and {os.path.join(args.out_dir, 'report.pdf')} "
          f"({doc.pages} page{'s' if doc.pages != 1 else ''})")


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda: report(args))


if __name__ == "__main__":
    main()
