"""What the report shows, read from the runs' folders before anything is drawn: the metrics, the decoded images,
the visualizations' numbers, and each input that is missing or damaged, noted as a gap.
"""
import io
import json
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from metrics.quality import MEASURES, format_table
from torch_utils.cli import UserError
from torch_utils.files import image_bytes, read_metrics
from torch_utils.images import (FEATURES_NAME, MAX_CLASS_FILE, RESULTS_FILE, epoch_grids, max_features_file,
                                perturb_files)

PERTURB_FILES, NOISE_FILES = perturb_files(), perturb_files("noise_")
# The files that make a folder of --vis-dir a model's visualizations.
MODEL_FILES = {RESULTS_FILE, MAX_CLASS_FILE} | {f for f, _ in PERTURB_FILES + NOISE_FILES}
# What the default model names of visualize.py (the file stems) stand for; other names are shown as they are.
DESCRIPTIONS = {"cifar10": "baseline classifier", "discriminator": "GAN discriminator"}
VISUALIZE = "python visualize.py all --model cifar10.model --model discriminator.model"
OPTIONAL = "optional: the assignment does not ask for it"


class Gap(NamedTuple):
    """An input the report lacks: section and model say where the document names it."""
    section: str
    text: str
    kind: str = "missing"  # or "damaged"
    optional: bool = False
    model: str = None

    def heading(self):
        return f"{self.kind} ({OPTIONAL})" if self.optional else self.kind


class Picture(NamedTuple):
    content: bytes  # the file as it is, copied beside report.md
    pixels: np.ndarray  # RGB, for the PDF


def decode_error(e):
    return "not an image file" if isinstance(e, UnidentifiedImageError) else str(e) or type(e).__name__


def read_picture(path):
    """(Picture, None), or (None, why the file cannot be read or decoded)."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        with Image.open(io.BytesIO(content)) as image:
            return Picture(content, np.asarray(image.convert("RGB"))), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, decode_error(e)


def read_gif(path):
    """(the GIF's bytes, None) once every frame decodes, or (None, why not). An animation in another format
    (make_gif.py writes WebP and APNG too) comes back converted to a GIF: the report names it progress.gif."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        with Image.open(io.BytesIO(content)) as image:
            frames, durations = [], []
            for frame in ImageSequence.Iterator(image):
                frame.load()  # which also reads a WebP frame's duration
                if image.format != "GIF":
                    frames.append(frame.convert("RGB"))
                    durations.append(round(frame.info.get("duration", 100)))
            if frames:
                content = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=durations,
                                      loop=image.info.get("loop", 0))
        return content, None
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, decode_error(e)


def latest(records, key):
    """One record per key (the last one written: a resumed run may repeat an epoch), in key order."""
    return sorted({key(r): r for r in records}.values(), key=key)


class Inputs:
    """What the report shows: the metrics, the decoded images, the visualizations' numbers, and the gaps."""

    def __init__(self):
        self.gaps = []
        self.pictures = {}  # path -> Picture, or None when the file cannot be decoded
        self.baseline = None  # baseline records, one per epoch
        self.gan_epochs, self.monitors, self.evals, self.warnings = [], [], [], []  # the GAN's records by type
        self.eval_json_path, self.eval_json = None, None  # evaluate.py's record
        self.grids = []  # (epoch index, path, Picture or None)
        self.gif = None  # (path, bytes)
        self.models = []  # read_model's dicts

    def note(self, section, text, kind="missing", optional=False, model=None):
        self.gaps.append(Gap(section, text, kind, optional, model))

    def picture(self, path, section, advice, model=None):
        """The Picture at path (None: the file is missing or damaged; a damaged one is noted here with the
        advice, a missing one by the caller, which knows how to make it)."""
        if path not in self.pictures and os.path.isfile(path):
            self.pictures[path], error = read_picture(path)
            if error:
                self.note(section, f"{path} cannot be decoded ({error}); {advice}", "damaged", model=model)
        return self.pictures.get(path)

    def metrics(self, path, hint, epoch_types):
        """The records of a metrics file, or None (noted) when there is none; damaged lines are skipped and
        noted. Only the records of epoch_types ("epoch" stands for the baseline's untyped ones) are kept."""
        if not os.path.isfile(path):
            self.note("curves", f"{path} ({hint})")
            return None
        try:
            records, skipped = read_metrics(path)
        except OSError as e:
            self.note("curves", f"{path} cannot be read ({e.strerror}); {hint}", "damaged")
            return None
        records = [dict(r, type=r.get("type", "epoch")) for r in records if isinstance(r.get("epoch"), int)]
        records = [r for r in records if r["type"] in epoch_types]
        if skipped:
            self.note("curves", f"{skipped} line(s) of {path} cut short or garbled: skipped, the other "
                                f"{len(records)} records are shown", "damaged")
        if not records:
            self.note("curves", f"{path} holds no records ({hint})")
            return None
        return records


def model_folders(vis_dir):
    """The folders of vis_dir that hold a model's visualizations, the baseline first, then the GAN, then others."""
    if not os.path.isdir(vis_dir):
        return []
    names = [d.name for d in os.scandir(vis_dir) if d.is_dir()
             and any(f in MODEL_FILES or FEATURES_NAME.match(f) for f in os.listdir(d.path))]
    return sorted(names, key=lambda n: (n not in DESCRIPTIONS, n))


def read_model(inputs, vis_dir, name):
    """One model's visualizations: its results.json and its images, each gap noted under the model."""
    folder = os.path.join(vis_dir, name)
    note = lambda section, text, **kw: inputs.note(section, text, model=name, **kw)
    results, path = {}, os.path.join(folder, RESULTS_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            note("perturb", f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); the images are "
                            f"shown without their numbers ({VISUALIZE})", "damaged")
        if not isinstance(results, dict):
            results = {}
    files = os.listdir(folder)
    layers = sorted(int(m.group(1)) for f in files if (m := FEATURES_NAME.match(f)))

    for file, _ in PERTURB_FILES:
        if not os.path.isfile(os.path.join(folder, file)):
            note("perturb", f"{folder}/{file} ({VISUALIZE})")
    if "perturb" not in results:
        note("perturb", f"{folder}/results.json with the perturbation's accuracies (visualize.py perturb)")
    if "perturb_noise" not in results and not any(f in files for f, _ in NOISE_FILES):
        note("perturb", f"the perturbation of noise images in {folder}/ (visualize.py perturb --start noise, "
                        f"or visualize.py all)", optional=True)
    else:
        for file, _ in NOISE_FILES:
            if file not in files:
                note("perturb", f"{folder}/{file} (visualize.py perturb --start noise)", optional=True)
        if "perturb_noise" not in results:
            note("perturb", f"{folder}/results.json with the noise perturbation's numbers (visualize.py perturb "
                            f"--start noise)", optional=True)
    if not os.path.isfile(os.path.join(folder, MAX_CLASS_FILE)):
        note("max_class", f"{folder}/max_class.png ({VISUALIZE})")
    if len(layers) < 2:
        note("max_features", f"{folder}/max_features_layer<K>.png for two layers or more "
                             f"(visualize.py max-features)")

    sections = [(f, "perturb") for f, _ in PERTURB_FILES + NOISE_FILES] + [(MAX_CLASS_FILE, "max_class")] + \
               [(max_features_file(k), "max_features") for k in layers]
    for file, section in sections:
        inputs.picture(os.path.join(folder, file), section, f"make it again ({VISUALIZE})", name)
    return {"name": name, "folder": folder, "results": results, "layers": layers}


def read_eval_json(inputs, path):
    """evaluate.py's record in path, or None (noted when the file is there but unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        format_table(record)  # every field the table shows is there
        return record
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        inputs.note("quality", f"{path} cannot be read as evaluate.py's output ({type(e).__name__}: {e})",
                    "damaged", optional=True)
        return None


def eval_advice(args):
    return (f"python train_gan.py --eval-every K writes them into {args.gan_dir}/gan_metrics.jsonl; or measure "
            f"the final generator with python evaluate.py --generator {args.gan_dir}/generator.model "
            f"--classifier {args.baseline_dir}/cifar10.model --output {args.gan_dir}/eval.json")


def spread(items, count):
    """count items evenly spread from the first to the last (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def gif_path(args):
    if args.gif:
        return args.gif
    candidates = [os.path.join(args.gan_dir, "progress.gif"), os.path.join(args.vis_dir, "progress.gif")]
    return next((p for p in candidates if os.path.isfile(p)), None)


def gather(args):
    """Everything the report shows, read from the input folders, with the gaps noted."""
    inputs = Inputs()
    baseline = inputs.metrics(os.path.join(args.baseline_dir, "baseline_metrics.jsonl"), "run train_baseline.py",
                              {"epoch"})
    inputs.baseline = baseline and latest(baseline, lambda r: r["epoch"])
    gan = inputs.metrics(os.path.join(args.gan_dir, "gan_metrics.jsonl"), "run train_gan.py",
                         {"epoch", "monitor", "eval", "warning"}) or []
    inputs.gan_epochs = latest([r for r in gan if r["type"] == "epoch"], lambda r: r["epoch"])
    inputs.monitors = latest([r for r in gan if r["type"] == "monitor" and isinstance(r.get("batch"), int)],
                             lambda r: (r["epoch"], r["batch"]))
    inputs.evals = latest([r for r in gan if r["type"] == "eval"], lambda r: r["epoch"])
    inputs.warnings = latest([r for r in gan if r["type"] == "warning"],
                             lambda r: (r["epoch"], r.get("batch", 0), str(r.get("rule"))))
    inputs.eval_json_path = os.path.join(args.gan_dir, "eval.json")
    inputs.eval_json = read_eval_json(inputs, inputs.eval_json_path)
    if not inputs.evals:
        what = f"generator quality measures ({', '.join(m.title for m in MEASURES if not m.per_class)}) over epochs"
        inputs.note("quality", f"{what}: {eval_advice(args)}", optional=True)

    output = os.path.join(args.gan_dir, "output")
    try:
        grids = spread(epoch_grids(output), args.grids)
    except UserError:
        grids = []
        inputs.note("generator", f"{output}/NNN.png generator grids (run train_gan.py)")
    advice = "its place stays empty (sample.py draws from the final generator)"
    inputs.grids = [(epoch, path, inputs.picture(path, "generator", advice)) for epoch, path in grids]

    gif = gif_path(args)
    if gif is None or not os.path.isfile(gif):
        where = gif or f"{args.gan_dir}/progress.gif or {args.vis_dir}/progress.gif"
        inputs.note("generator", f"{where}, the animation of every epoch (python make_gif.py --input {output} "
                                 f"--output {args.vis_dir}/progress.gif)")
    else:
        content, error = read_gif(gif)
        if error:
            inputs.note("generator", f"{gif} cannot be decoded ({error}); make it again with make_gif.py",
                        "damaged")
        else:
            inputs.gif = (gif, content)

    names = model_folders(args.vis_dir)
    inputs.models = [read_model(inputs, args.vis_dir, n) for n in names]
    if not names:
        inputs.note("models", f"{args.vis_dir}/<model>/ visualizations ({VISUALIZE})")
    elif len(names) == 1:
        inputs.note("models", f"a second model in {args.vis_dir}/: the assignment shows both discriminators "
                              f"({VISUALIZE})")
    return inputs


def test_accuracies(found):
    """(discriminator, trained by, last epoch, test accuracy) of both nets; None where the metrics are missing."""
    rows = []
    for records, what, script in [(found.baseline, "baseline classifier", "train_baseline.py, cifar10.model"),
                                  (found.gan_epochs, "GAN discriminator (auxiliary classifier)",
                                   "train_gan.py, discriminator.model")]:
        record = records[-1] if records else None
        accuracy = record and record.get("test_acc")
        rows.append((what, script, record and record["epoch"], accuracy))
    return rows
