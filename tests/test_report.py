"""report.py: every deliverable in report.md and report.pdf, and notes instead of failures for missing inputs."""
import json
import os
import re

from PIL import Image

import report
from data import CLASSES

SECTIONS = ["## Test accuracy", "## Training curves", "## Generator progress", "## Perturbed real images",
            "## Synthetic images maximizing each class", "## Synthetic images maximizing features"]


def png(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (68, 40), colour).save(path)


def jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_run(run):
    """Metrics of a 4-epoch baseline and a 3-epoch GAN, and 8 generator grids."""
    jsonl(run / "baseline_metrics.jsonl",
          [{"epoch": e, "lr": 1e-4 if e < 3 else 1e-5, "train_loss": 2.0 / e, "train_acc": 0.2 * e,
            "test_acc": 0.1 + 0.2 * e, "seconds": 10.0, "images_per_s": 5000.0} for e in range(1, 5)])
    gan = []
    for e in range(1, 4):
        scores = {"gp": 0.5 / e, "fake_score": -e, "real_score": e, "real_ce": 1.0 / e, "fake_ce": 1.5 / e,
                  "real_acc": 0.3 * e}
        gan += [{"type": "monitor", "epoch": e, "batch": b, **scores} for b in (50, 100, 150)]
        gan.append({"type": "epoch", "epoch": e, "test_acc": 0.2 * e + 0.1234, "seconds": 60.0,
                    "images_per_s": 900.0, **scores})
    jsonl(run / "gan_metrics.jsonl", gan)
    for epoch in range(8):
        png(run / "output" / f"{epoch:03d}.png", (epoch * 30, 0, 0))


def write_model(vis, name, layers, perturb=True):
    folder = vis / name
    files = ["real_images.png", "gradient_image.png", "jittered_images.png", "max_class.png"] if perturb \
        else ["max_class.png"]
    for file in files + [f"max_features_layer{k}.png" for k in layers]:
        png(folder / file)
    results = {"max_class": {"iterations": 200, "lr": 0.1, "weight_decay": 0.001, "predicted": list(CLASSES)}}
    if perturb:
        results["perturb"] = {"images": 100, "gain": 8, "accuracy_before": 0.87, "accuracy_after": 0.04}
    (folder / "results.json").write_text(json.dumps(results))


def pdf_pages(path):
    """Page objects of a PDF (matplotlib writes each page dictionary uncompressed)."""
    with open(path, "rb") as f:
        return len(re.findall(rb"/Type\s*/Page(?![A-Za-z])", f.read()))


def linked_images(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_full_report(tmp_path, capsys):
    write_run(tmp_path)
    write_model(tmp_path / "visualization", "cifar10", [2, 3, 4, 6, 8])
    write_model(tmp_path / "visualization", "discriminator", [2, 8])
    out = tmp_path / "report"
    report.main(["--run-dir", str(tmp_path), "--vis-dir", str(tmp_path / "visualization"), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "missing" not in printed
    md = (out / "report.md").read_text()
    positions = [md.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "Missing" not in md
    # Both test accuracies at the last epoch.
    assert "| 4 | 90.00% |" in md and "| 3 | 72.34% |" in md
    assert "87.0% before, 4.0% after" in md
    for name in ("baseline classifier (cifar10)", "GAN discriminator (discriminator)"):
        assert md.count(f"### {name}") == 3  # perturbation, classes, features
    assert md.count("#### layer") == 7
    # Six grids spread from the first epoch to the last.
    grids = re.findall(r"!\[epoch (\d+)\]", md)
    assert len(grids) == 6 and grids[0] == "1" and grids[-1] == "8"
    links = linked_images(md)
    assert {"baseline_curves.png", "gan_curves.png", "cifar10/real_images.png", "cifar10/gradient_image.png",
            "cifar10/jittered_images.png", "cifar10/max_class.png", "discriminator/max_class.png",
            "discriminator/max_features_layer8.png"} <= set(links)
    for link in links:
        assert not os.path.isabs(link) and (out / link).is_file(), link
    # Title, 2 curve pages, the grids, and per model: the triplet, the classes and one page per layer.
    assert pdf_pages(out / "report.pdf") == 1 + 2 + 1 + (2 + 5) + (2 + 2)
    assert f"({pdf_pages(out / 'report.pdf')} pages)" in printed


def test_missing_inputs_are_named_not_fatal(tmp_path, capsys):
    out = tmp_path / "report"
    report.main(["--run-dir", str(tmp_path / "nothing"), "--vis-dir", str(tmp_path / "none"), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "missing: " in printed and "baseline_metrics.jsonl" in printed and "gan_metrics.jsonl" in printed
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md
    body = md[md.index("## Training curves"):]
    for start, end in zip(SECTIONS[1:], SECTIONS[2:] + [None]):
        part = body[body.index(start):body.index(end) if end else None]
        assert "- _Missing:" in part, start
    assert "| missing | missing |" in md
    assert linked_images(md) == []
    assert pdf_pages(out / "report.pdf") == 1


def test_partial_visualizations_are_noted(tmp_path, capsys):
    write_run(tmp_path)
    write_model(tmp_path / "visualization", "cifar10", [4], perturb=False)
    out = tmp_path / "report"
    report.main(["--run-dir", str(tmp_path), "--vis-dir", str(tmp_path / "visualization"), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "both discriminators" in printed and "two layers or more" in printed and "real_images.png" in printed
    md = (out / "report.md").read_text()
    assert "both discriminators" in md and "two layers or more" in md
    assert "cifar10/max_class.png" in linked_images(md)
    # Title, 2 curve pages, the grids, the class page and the one layer.
    assert pdf_pages(out / "report.pdf") == 1 + 2 + 1 + 1 + 1
