"""Compare the finished runs of a sweep: per configuration, the baseline's and the GAN discriminator's final test
accuracy and the generator's measures as mean ± std over the seeds, in one table, and every seed's test accuracy
per epoch in one plot.

    python compare.py runs/sweep                        # reads runs/sweep/<config>/seed-K/
    python compare.py runs/sweep --output-dir results   # where compare.md, compare.json and compare.png go

Each seed-K folder holds the trainers' --out-dir files (baseline_metrics.jsonl, gan_metrics.jsonl), directly or
one folder down (seed-K/baseline/, seed-K/gan/). The generator's measures (metrics/quality.py's: IS, FID, KID,
class accuracy, classifier FD, whichever were computed; a measure a seed could not have, as IS with the headless
InceptionV3, is shown as unavailable with the reason) come from evaluate.py's eval.json there (`--output
seed-K/eval.json`), else from the eval record that train_gan.py --eval-every wrote after its last epoch. The std
is the sample std (n - 1); n is the number of seeds with a value. A run that has reached fewer epochs than the others of its
configuration is still running or was stopped: it is listed as unfinished and left out, as are missing and damaged
files and a measure that is NaN or infinite (a diverged seed: the others' values still fill its cell); the rest is
still compared. A folder name that is not UTF-8 (an old zip's Latin-1 "café") is shown with \\x escapes; compare.json
is strict JSON.
"""
import argparse
import io
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metrics.quality import MEASURES as ALL_MEASURES, unavailable_line, value_text  # noqa: E402
from torch_utils.cli import UserError, run_main  # noqa: E402
from torch_utils.files import output_folder, read_metrics, write_together  # noqa: E402

JOBS = {"baseline": "baseline_metrics.jsonl", "gan": "gan_metrics.jsonl"}
MEASURES = tuple(m for m in ALL_MEASURES if not m.per_class)  # the generator's measures: a column each
SEED_FOLDER = re.compile(r"seed-(\d+)$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the sweep's folder, holding <config>/seed-K/")
    parser.add_argument("--output-dir", help="where compare.md, compare.json and compare.png go (default: RUNS)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Reading the runs

def seed_folders(root):
    """{config: [(seed, folder)]} of root/<config>/seed-K/ (or root/seed-K/ for a sweep of one configuration)."""
    def seeds(folder):
        found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                 if (m := SEED_FOLDER.match(name)) and os.path.isdir(os.path.join(folder, name))]
        return sorted(found)

    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; give the sweep's folder, which holds <config>/seed-K/")
    configs = {name: seeds(os.path.join(root, name)) for name in sorted(os.listdir(root))
               if os.path.isdir(os.path.join(root, name)) and not SEED_FOLDER.match(name)}
    configs = {name: found for name, found in configs.items() if found}
    if seeds(root):
        configs[os.path.basename(os.path.abspath(root))] = seeds(root)
    return configs


def find_file(folder, name):
    """folder/name, or folder/<one subfolder>/name; None when neither exists. Two of them is a problem."""
    found = [os.path.join(folder, name)] if os.path.isfile(os.path.join(folder, name)) else []
    found += sorted(os.path.join(folder, sub, name) for sub in os.listdir(folder)
                    if os.path.isfile(os.path.join(folder, sub, name)))
    if len(found) > 1:
        raise ValueError(f"{len(found)} copies of {name} ({', '.join(found)})")
    return found[0] if found else None


def printable(name):
    """A file name as UTF-8 text can hold it: the bytes of a name that is not UTF-8 (a Latin-1 "café" from an
    old zip, which Python reads as lone surrogates) as \\xe9 escapes; a UTF-8 name as it is."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_curve(records):
    """[(epoch, test accuracy)] of a trainer's epoch records, in epoch order."""
    curve = {}
    for r in records:
        if r.get("type", "epoch") == "epoch" and isinstance(r.get("epoch"), int) and finite_number(r.get("test_acc")):
            curve[r["epoch"]] = float(r["test_acc"])
    return sorted(curve.items())


def generator_measures(folder, gan_records, last_epoch):
    """(measures {key: value}, where they come from, the measures that are no finite number as "FID nan", {key:
    why the record lacks it}) from eval.json, else from the eval record at last_epoch; ({}, None, [], {}) when
    there are none. A NaN or infinite measure (a diverged run) is left out of its column, which the other seeds'
    values still fill."""
    path = find_file(folder, "eval.json")
    if path is not None:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError(f"{path} holds no measures")
        source = f"eval.json, {record.get('n', '?')} samples"
    else:
        evals = [r for r in gan_records if r.get("type") == "eval" and r.get("epoch") == last_epoch]
        if not evals:
            return {}, None, [], {}
        record, source = evals[-1], f"eval record of epoch {last_epoch}, {evals[-1].get('n', '?')} samples"
    measures = {m.key: float(record[m.key]) for m in MEASURES if finite_number(record.get(m.key))}
    not_finite = [f"{m.title} {record[m.key]}" for m in MEASURES
                  if isinstance(record.get(m.key), float) and not math.isfinite(record[m.key])]
    unavailable = {m.key: line for m in MEASURES if (line := unavailable_line(m, record))}
    return measures, source, not_finite, unavailable


def read_seed(folder, problems, show):
    """{"baseline": curve, "gan": curve, "measures": {...}, "measures_from": text} of one seed's folder (what it
    has of them); each missing or damaged file is added to problems, its path as show(path) gives it."""
    run, gan_records, found = {}, [], False
    for job, name in JOBS.items():
        try:
            path = find_file(folder, name)
            if path is None:
                continue
            found = True
            records, skipped = read_metrics(path)
        except (OSError, ValueError) as e:
            problems.append(f"{show(folder)}: {getattr(e, 'strerror', None) or e}")
            continue
        curve = epoch_curve(records)
        if not curve:
            damaged = f" ({skipped} damaged line(s))" if skipped else ""
            problems.append(f"{show(path)}: no epoch with a test accuracy{damaged}, left out")
            continue
        if skipped:
            problems.append(f"{show(path)}: {skipped} damaged line(s) skipped, the rest compared")
        run[job] = curve
        if job == "gan":
            gan_records = records
    if run:
        try:
            last = run["gan"][-1][0] if "gan" in run else None
            run["measures"], source, not_finite, run["unavailable"] = generator_measures(folder, gan_records, last)
            run["measures_from"] = source if run["measures"] else None
            if not_finite:
                problems.append(f"{show(folder)}: {', '.join(not_finite)} ({source}), left out of those columns")
        except (OSError, ValueError) as e:  # a damaged eval.json: the accuracies still count
            problems.append(f"{show(folder)}: generator measures left out ({e})")
    elif not found:
        problems.append(f"{show(folder)}: no {' or '.join(JOBS.values())}")
    return run


# ---------------------------------------------------------------------------------------------------------
# Statistics

def mean_std(values):
    """{"mean", "std" (the sample std, None for one value), "n", "values"}, or None without values."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def compare_config(root, name, seeds, problems):
    """The row of one configuration: per job the final test accuracy over the seeds that reached its most epochs,
    and the generator's measures over the seeds whose GAN did."""
    show = lambda path: printable(os.path.relpath(path, root))  # noqa: E731
    runs = {seed: read_seed(folder, problems, show) for seed, folder in seeds}
    row, kept = {"config": printable(name), "seeds": [seed for seed, _ in seeds]}, {}
    for job in JOBS:
        reached = {seed: run[job][-1][0] for seed, run in runs.items() if job in run}
        epochs = max(reached.values(), default=None)
        kept[job] = [seed for seed, e in reached.items() if e == epochs]
        for seed, e in reached.items():
            if e != epochs:
                problems.append(f"{show(dict(seeds)[seed])}: {job} unfinished at epoch {e} of {epochs}, left out")
        row[job] = {"epochs": epochs, "seeds": kept[job],
                    "test_acc": mean_std([runs[seed][job][-1][1] for seed in kept[job]])}
    with_measures = [seed for seed in kept["gan"] if runs[seed].get("measures")]
    row["generator"] = {m.key: mean_std([runs[s]["measures"][m.key] for s in with_measures
                                         if m.key in runs[s]["measures"]]) for m in MEASURES}
    row["generator_from"] = {seed: runs[seed]["measures_from"] for seed in with_measures}
    # Why a measure is missing (the Inception Score with the headless weights), each reason once
    reasons = {m.key: list(dict.fromkeys(runs[s]["unavailable"][m.key] for s in kept["gan"]
                                         if m.key in runs[s].get("unavailable", {}))) for m in MEASURES}
    row["generator_unavailable"] = {key: lines for key, lines in reasons.items() if lines}
    curves = {job: {seed: runs[seed][job] for seed in kept[job]} for job in JOBS}
    return row, curves


# ---------------------------------------------------------------------------------------------------------
# Writing the table and the plot

def cell(stats, fmt, unavailable=False):
    """mean ± std (n=...) of stats, printed as fmt(value) gives them; "unavailable" or "-" without values."""
    if stats is None:
        return "unavailable" if unavailable else "-"
    if stats["std"] is None:
        return f"{fmt(stats['mean'])} (n=1)"
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])} (n={stats['n']})"


def accuracy(value):
    return f"{value:.4f}"


def markdown(rows, problems, root):
    measured = [m for m in MEASURES if any(r["generator"][m.key] or m.key in r["generator_unavailable"] for r in rows)]
    head = ["configuration", "epochs (baseline / GAN)", "baseline test acc", "GAN discriminator test acc",
            *(m.title for m in measured)]
    lines = [f"# Comparison of {root}", "",
             "Final test accuracy and the generator's measures per configuration: mean ± sample std over the seeds "
             "(n of them).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        epochs = " / ".join("-" if r[job]["epochs"] is None else str(r[job]["epochs"]) for job in JOBS)
        lines.append("| " + " | ".join([r["config"], epochs, cell(r["baseline"]["test_acc"], accuracy),
                                        cell(r["gan"]["test_acc"], accuracy),
                                        *(cell(r["generator"][m.key], lambda v, m=m: value_text(m, v),
                                               m.key in r["generator_unavailable"]) for m in measured)]) + " |")
    sources = [f"- {r['config']}: " + "; ".join(f"seed {s}: {text}" for s, text in r["generator_from"].items())
               for r in rows if r["generator_from"]]
    if sources:
        lines += ["", "Generator measures from:", *sources]
    unavailable = [f"- {r['config']}: {line}" for r in rows
                   for line in dict.fromkeys(line for lines in r["generator_unavailable"].values() for line in lines)]
    if unavailable:
        lines += ["", "Unavailable measures:", *unavailable]
    if problems:
        lines += ["", "Missing, damaged or unfinished:", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def plot(all_curves):
    """PNG bytes: test accuracy per epoch of every seed compared, the baseline and the GAN discriminator side by
    side, one colour per configuration."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (job, title) in zip(axes, (("baseline", "baseline"), ("gan", "GAN discriminator"))):
        for i, (name, curves) in enumerate(all_curves.items()):
            for k, curve in enumerate(curves[job].values()):
                epochs, acc = zip(*curve)
                ax.plot(epochs, acc, color=f"C{i % 10}", linewidth=1.5, marker="." if len(curve) < 20 else None,
                        label=name if k == 0 else None)
        ax.set_title(f"{title}: test accuracy, every seed")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def run(args):
    out, runs = args.output_dir or args.runs, printable(args.runs)
    configs = seed_folders(args.runs)
    output_folder(out, "--output-dir", create=False)
    problems, rows, all_curves = [], [], {}
    for name, seeds in configs.items():
        row, curves = compare_config(args.runs, name, seeds, problems)
        if row["baseline"]["test_acc"] or row["gan"]["test_acc"]:
            rows.append(row)
            all_curves[row["config"]] = curves
    if not rows:
        found = f"; {len(problems)} problem(s), the first: {problems[0]}" if problems else ""
        raise UserError(f"no finished run under {runs}: expected {runs}/<config>/seed-K/ holding "
                        f"{' or '.join(JOBS.values())}{found}")
    report = {"runs": runs, "configurations": rows, "left_out": problems}
    paths = [os.path.join(out, f"compare.{ext}") for ext in ("md", "json", "png")]
    table = markdown(rows, problems, runs)
    # Strict JSON: no NaN or Infinity (left out above), which strict readers refuse
    content = json.dumps(report, indent=2, allow_nan=False) + "\n"
    write_together([(paths[0], table.encode()), (paths[1], content.encode()), (paths[2], plot(all_curves))],
                   hint="choose another --output-dir")
    print(table, end="")
    print(f"wrote {', '.join(printable(path) for path in paths)}")


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
