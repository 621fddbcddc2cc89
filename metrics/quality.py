"""evaluate.py's record of a generator's quality, read without torch-fidelity: the mode-collapse threshold and the
table that evaluate.py prints and report.py includes."""
from models import NUM_CLASSES
from training.data import CLASSES

COLLAPSE_BELOW = 0.5  # a class whose samples spread less than half as much as real images is flagged


def format_table(record):
    """The measures as aligned lines, each saying which direction is better."""
    rows = [f"{record['n']} samples, {record['n'] // NUM_CLASSES} per class, noise seed {record['seed']}"]
    if "fid" in record:
        rows += [f"reference of IS/FID/KID: {record['inception_reference']}",
                 f"  Inception Score      {record['is_mean']:8.3f} +- {record['is_std']:.3f}   higher is better "
                 f"(the real images: {record['reference_is_mean']:.2f})",
                 f"  FID                  {record['fid']:8.3f}            lower is better",
                 f"  KID                  {record['kid_mean']:8.5f} +- {record['kid_std']:.5f} lower is better"]
    elif "inception_unavailable" in record:
        rows.append(record["inception_unavailable"])
    if "class_acc" in record:
        rows += [f"reference of the classifier's measures: {record['classifier_reference']}",
                 f"  class accuracy       {100 * record['class_acc']:7.1f}%            higher is better",
                 f"  classifier FD        {record['classifier_fd']:8.3f}            lower is better",
                 f"  {'class':<12} {'accuracy':>8} {'spread':>7}   (samples' spread / real images', near 1 is healthy)"]
        for c, name in enumerate(CLASSES):
            ratio = record["spread_ratio_per_class"][c]
            flag = "  collapsed?" if name in record["collapsed_classes"] else ""
            rows.append(f"  {name:<12} {100 * record['class_acc_per_class'][c]:7.1f}% {ratio:7.2f}{flag}")
        collapsed = ", ".join(record["collapsed_classes"]) or "none"
        rows.append(f"  classes with a spread below {COLLAPSE_BELOW} (possible mode collapse): {collapsed}")
    return "\n".join(rows)
