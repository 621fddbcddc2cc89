"""The generator's measures in one table (MEASURES), read without torch-fidelity by everything that shows them:
measures.py's records, the table evaluate.py prints and report.py includes (format_table), TensorBoard's eval
group and charts, report.py's plots and compare.py's columns. A new measure is one row here, plus the code in
measures.py that puts its value in the record under its key.

A record lacks a measure's value when it could not be measured; then record[measure.unavailable] (or, for all
of a network's measures at once, record[NETWORKS[network].unavailable]) says why.
"""
from typing import NamedTuple

from models import NUM_CLASSES
from training.data import CLASSES

COLLAPSE_BELOW = 0.5  # a class whose samples spread less than half as much as real images is flagged


class Measure(NamedTuple):
    key: str  # its value's key in evaluate.py's records (eval.json, the eval records of gan_metrics.jsonl)
    title: str  # its name in tables, plots and charts
    fmt: str  # how its value prints (a percent measure's value times 100)
    better: str  # which way is better
    help: str  # what it measures, in a line
    network: str  # what measures it: a key of NETWORKS
    spread: str = None  # key of its standard deviation over subsets, printed as +- beside it
    real: str = None  # key of the real images' own value: the level a generator can reach
    percent: bool = False  # shown as a percentage
    per_class: bool = False  # a list, one value per class in CLASSES order
    mark: float = None  # a threshold: plots draw it, the table flags the classes below it with flag
    flag: str = None
    needs_head: bool = False  # needs InceptionV3's 1008-class layer, which the headless weights lack

    @property
    def unavailable(self):
        """The record's key of why this measure is missing."""
        return f"{self.key}_unavailable"


class Network(NamedTuple):
    reference: str  # key of the description of the real images measured against
    unavailable: str = None  # key of why none of its measures could be made


NETWORKS = {"inception": Network("inception_reference", "inception_unavailable"),
            "classifier": Network("classifier_reference")}

MEASURES = (
    Measure("is_mean", "Inception Score", ".3f", "higher is better",
            "how confidently and how diversely InceptionV3's ImageNet classes label the samples", "inception",
            spread="is_std", real="reference_is_mean", needs_head=True),
    Measure("fid", "FID", ".3f", "lower is better",
            "Frechet distance of the samples' InceptionV3 pool features from the real images'", "inception"),
    Measure("kid_mean", "KID", ".5f", "lower is better",
            "kernel distance (MMD) of the same features, unbiased for small sample counts", "inception",
            spread="kid_std"),
    Measure("class_acc", "class accuracy", ".1f", "higher is better",
            "share of the samples that the classifier puts in the class they were generated for", "classifier",
            percent=True),
    Measure("classifier_fd", "classifier FD", ".3f", "lower is better",
            "Frechet distance of the samples' pooled last-layer classifier features from the test images'",
            "classifier"),
    Measure("class_acc_per_class", "class accuracy", ".1f", "higher is better", "the class accuracy of the class",
            "classifier", percent=True, per_class=True),
    Measure("spread_ratio_per_class", "spread ratio", ".2f", f"near 1 is healthy, under {COLLAPSE_BELOW:g}: collapse",
            "the samples' classifier-feature spread over the real images' (mode collapse: near 0)",
            "classifier", per_class=True, mark=COLLAPSE_BELOW, flag="collapsed?"),
)


def record_keys():
    """Every number key the measures put in a record: values, spreads and the real images' levels."""
    return tuple(key for m in MEASURES for key in (m.key, m.spread, m.real) if key)


def unavailable_line(measure, record):
    """Why the record lacks this measure's value, in a line; None when it has it or it was not asked for."""
    if measure.key in record:
        return None
    if measure.unavailable in record:
        return f"{measure.title} unavailable: {record[measure.unavailable]}"
    network = NETWORKS[measure.network].unavailable
    return record.get(network) if network else None  # that line names the measures


def value_text(measure, value):
    return f"{100 * value:{measure.fmt}}%" if measure.percent else f"{value:{measure.fmt}}"


def measure_line(measure, record):
    """A row of the table: the value (+- its spread), which way is better, the real images' level; or why it is
    unavailable."""
    if measure.key not in record:
        return f"  {measure.title:<20} unavailable: {record.get(measure.unavailable, 'not in the record')}"
    spread = f" +- {record[measure.spread]:{measure.fmt}}" if measure.spread in record else ""
    real = f" (the real images: {record[measure.real]:.2f})" if measure.real in record else ""
    return f"  {measure.title:<20} {value_text(measure, record[measure.key]):>8}{spread:<12} {measure.better}{real}"


def per_class_lines(measures, record):
    """The per-class measures as columns, a class per row, the classes under a measure's mark flagged."""
    measures = [m for m in measures if m.key in record]
    if not measures:
        return []
    widths = [max(9, len(m.title)) for m in measures]
    rows = [f"  {'class':<12}" + "".join(f" {m.title:>{w}}" for m, w in zip(measures, widths)) + "   ("
            + "; ".join(f"{m.title}: {m.better}" for m in measures) + ")"]
    for c, name in enumerate(CLASSES):
        flags = [m.flag for m in measures if m.mark is not None and record[m.key][c] < m.mark]
        rows.append(f"  {name:<12}" + "".join(f" {value_text(m, record[m.key][c]):>{w}}"
                                              for m, w in zip(measures, widths)) + "".join(f"  {f}" for f in flags))
    for m in measures:
        if m.mark is not None:
            below = [name for c, name in enumerate(CLASSES) if record[m.key][c] < m.mark]
            rows.append(f"  classes with a {m.title} below {m.mark:g} ({m.flag}): {', '.join(below) or 'none'}")
    return rows


def format_table(record):
    """The measures as aligned lines, each saying which direction is better."""
    if "samples" in record:  # real images in place of a generator's
        rows = [f"{record['n']} images: {record['samples']}"]
    else:
        rows = [f"{record['n']} samples, {record['n'] // NUM_CLASSES} per class, noise seed {record['seed']}"]
    for name, network in NETWORKS.items():
        measures = [m for m in MEASURES if m.network == name]
        if network.reference in record:
            titles = ", ".join(m.title for m in measures if not m.per_class)
            rows.append(f"reference of {titles}: {record[network.reference]}")
            rows += [measure_line(m, record) for m in measures if not m.per_class]
            rows += per_class_lines([m for m in measures if m.per_class], record)
        elif network.unavailable and network.unavailable in record:
            rows.append(record[network.unavailable])
    return "\n".join(rows)


def measures_help():
    """A line per measure: its name, which way is better and what it measures."""
    return [f"{m.title}{' per class' if m.per_class else ''}: {m.better}; {m.help}" for m in MEASURES]
