"""report.py: every deliverable in report.md and report.pdf from the runs' own folders; missing and damaged inputs
named instead of failing; a kill or a failed write never costs the previous report."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO
import make_gif
from metrics.quality import format_table
import report
from reporting import inputs
from reporting import pages
from training.data import CLASSES

SECTIONS = ["## Test accuracy", "## Training curves", "## Generator progress", "## Generator quality",
            "## Perturbed images", "## Synthetic images maximizing each class",
            "## Synthetic images maximizing features"]


def png(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (68, 40), colour).save(path)


def jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def baseline_records():
    return [{"epoch": e, "lr": 1e-4 if e < 3 else 1e-5, "train_loss": 2.0 / e, "train_acc": 0.2 * e,
             "test_acc": 0.1 + 0.2 * e, "seconds": 10.0, "images_per_s": 5000.0} for e in range(1, 5)]


def eval_record(epoch):
    """An eval record as train_gan.py --eval-every writes it, with the Inception and the classifier measures."""
    return {"type": "eval", "epoch": epoch, "n": 1000, "seed": 0, "eval_seconds": 3.5,
            "inception_reference": "CIFAR-10 train split, 50000 images", "is_mean": 2.0 + epoch, "is_std": 0.1,
            "reference_is_mean": 11.2, "fid": 120.0 / epoch, "kid_mean": 0.05 / epoch, "kid_std": 0.002,
            "classifier_reference": "CIFAR-10 test split, 10000 images", "class_acc": 0.25 * epoch,
            "class_acc_per_class": [0.25 * epoch] * 10, "classifier_fd": 40.0 / epoch,
            "spread_ratio_per_class": [0.9] * 9 + [0.3], "collapsed_classes": ["truck"]}


def gan_records(evals=True):
    """3 epochs: 3 monitor lines and an epoch line each, and eval records after epochs 2 and 3."""
    records = []
    for e in range(1, 4):
        scores = {"gp": 0.5 / e, "fake_score": -e, "real_score": e, "real_ce": 1.0 / e, "fake_ce": 1.5 / e,
                  "real_acc": 0.3 * e}
        records += [{"type": "monitor", "epoch": e, "batch": b, **scores} for b in (50, 100, 150)]
        records.append({"type": "epoch", "epoch": e, "test_acc": 0.2 * e + 0.1234, "seconds": 60.0,
                        "images_per_s": 900.0, **scores})
        if evals and e >= 2:
            records.append(eval_record(e))
    return records


def write_baseline(folder):
    jsonl(folder / "baseline_metrics.jsonl", baseline_records())


def write_gan(folder, evals=True):
    """Metrics of a 3-epoch GAN and 8 generator grids."""
    jsonl(folder / "gan_metrics.jsonl", gan_records(evals))
    for epoch in range(8):
        png(folder / "output" / f"{epoch:03d}.png", (epoch * 30, 0, 0))


def write_model(vis, name, layers, perturb=True, noise=True, scaling="min-max per batch", start="mean"):
    """A model's folder as visualize.py writes it."""
    folder = vis / name
    files = ["max_class.png"]
    if perturb:
        files += [f for f, _ in inputs.PERTURB_FILES]
    if noise:
        files += [f for f, _ in inputs.NOISE_FILES]
    for file in files + [f"max_features_layer{k}.png" for k in layers]:
        png(folder / file)
    settings = {"iterations": 200, "lr": 0.1, "weight_decay": 0.001, "start": start}
    results = {"max_class": {**settings, "predicted": list(CLASSES)},
               "max_features": {str(k): {**settings, "features": 100} for k in layers}}
    if perturb:
        results["perturb"] = {"images": 100, "start": "real", "gain": 8, "gradient_scaling": scaling,
                              "accuracy_before": 0.87, "accuracy_after": 0.04, "alternative_after": 0.61}
    if noise:
        results["perturb_noise"] = {"images": 100, "start": "noise", "gain": 8, "gradient_scaling": scaling,
                                    "accuracy_before": 1.0, "accuracy_after": 0.12, "alternative_after": 0.55}
    (folder / "results.json").write_text(json.dumps(results))


def write_models(vis):
    write_model(vis, "cifar10", [2, 3, 4, 6, 8])
    write_model(vis, "discriminator", [2, 8], scaling="min-max per image", start="noise")


def pdf_pages(path):
    """Page objects of a PDF (matplotlib writes each page dictionary uncompressed)."""
    with open(path, "rb") as f:
        return len(re.findall(rb"/Type\s*/Page(?![A-Za-z])", f.read()))


def pdf_text(path):
    """The lines of text of an uncompressed PDF from matplotlib, which draws each line as one TJ array of
    single characters."""
    with open(path, "rb") as f:
        arrays = re.findall(rb"\[((?:[^\]\\]|\\.)*)\]\s*TJ", f.read())
    chars = lambda array: re.findall(rb"\(((?:\\.|[^\\)])*)\)", array)
    return "\n".join(b"".join(re.sub(rb"\\(.)", rb"\1", c) for c in chars(a)).decode("latin-1") for a in arrays)


def linked_images(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def section(md, title):
    """The text of one ## section of report.md."""
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else None]


def run_report(capsys, *flags):
    report.main([str(f) for f in flags])
    return capsys.readouterr().out


# Title; 2 curve pages; the grids; the quality plot and table; per model the real and the noise triplets, the
# classes and one page per layer.
FULL_PAGES = 1 + 2 + 1 + 2 + (2 + 1 + 5) + (2 + 1 + 2)


def test_full_report(tmp_path, capsys):
    write_baseline(tmp_path)
    write_gan(tmp_path)
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "progress.gif")])
    write_models(tmp_path / "visualization")
    out = tmp_path / "report"
    printed = run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path,
                         "--vis-dir", tmp_path / "visualization", "--out-dir", out)
    assert "missing" not in printed and "damaged" not in printed
    md = (out / "report.md").read_text()
    positions = [md.index(title) for title in SECTIONS]
    assert positions == sorted(positions)
    assert "Missing" not in md and "damaged" not in md.lower()
    # Both test accuracies at the last epoch.
    assert "| 4 | 90.00% |" in md and "| 3 | 72.34% |" in md
    assert "87.0% before, 4.0% after the perturbation (gain 8), and 61.0% are then classified as label + 1" in md
    for name in ("baseline classifier (cifar10)", "GAN discriminator (discriminator)"):
        assert md.count(f"### {name}") == 3  # perturbation, classes, features
    assert md.count("#### layer") == 7 and md.count("#### noise images") == 2
    # Six grids spread from the first epoch to the last, and the GIF beside them.
    grids = re.findall(r"!\[epoch (\d+)\]", md)
    assert len(grids) == 6 and grids[0] == "1" and grids[-1] == "8"
    assert "[progress.gif](progress.gif)" in md
    assert (out / "progress.gif").read_bytes() == (tmp_path / "progress.gif").read_bytes()
    links = linked_images(md)
    assert {"baseline_curves.png", "gan_curves.png", "generator_quality.png", "cifar10/real_images.png",
            "cifar10/gradient_image.png", "cifar10/jittered_images.png", "cifar10/noise_jittered_images.png",
            "cifar10/max_class.png", "discriminator/max_class.png",
            "discriminator/max_features_layer8.png"} <= set(links)
    for link in links:
        assert not os.path.isabs(link) and (out / link).is_file(), link
    # Copies are the inputs byte for byte.
    assert (out / "cifar10" / "max_class.png").read_bytes() == \
        (tmp_path / "visualization" / "cifar10" / "max_class.png").read_bytes()
    assert pdf_pages(out / "report.pdf") == FULL_PAGES
    assert f"({FULL_PAGES} pages)" in printed
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)


def test_the_jobs_layout_gives_a_complete_report(tmp_path, capsys, monkeypatch):
    """jobs/README's layout: the baseline in the submit directory, the GAN in runs/gan128, and
    jobs/visualize.* writing visualization/<model>/ and visualization/progress.gif; report.py with only
    --gan-dir finds it all."""
    monkeypatch.chdir(tmp_path)
    write_baseline(tmp_path)
    gan = tmp_path / "runs" / "gan128"
    write_gan(gan)
    write_models(tmp_path / "visualization")
    make_gif.main(["--input", "runs/gan128/output", "--output", "visualization/progress.gif"])
    capsys.readouterr()
    printed = run_report(capsys, "--gan-dir", "runs/gan128")
    assert "missing" not in printed and "damaged" not in printed
    md = (tmp_path / "report" / "report.md").read_text()
    for title in SECTIONS:
        assert title in md
    assert "Missing" not in md
    assert "| 4 | 90.00% |" in md and "| 3 | 72.34% |" in md
    assert "(from `visualization/progress.gif`)" in md
    assert (tmp_path / "report" / "progress.gif").read_bytes() == \
        (tmp_path / "visualization" / "progress.gif").read_bytes()
    assert pdf_pages(tmp_path / "report" / "report.pdf") == FULL_PAGES


def test_an_explicit_gif_that_is_missing_is_listed(tmp_path, capsys):
    write_gan(tmp_path)
    printed = run_report(capsys, "--gan-dir", tmp_path, "--gif", tmp_path / "elsewhere.gif",
                         "--out-dir", tmp_path / "report")
    assert f"missing: {tmp_path / 'elsewhere.gif'}" in printed
    md = (tmp_path / "report" / "report.md").read_text()
    assert "elsewhere.gif" in section(md, "## Generator progress")


@pytest.mark.parametrize("name", ["progress.webp", "progress.apng"])
def test_an_animation_in_another_format_is_converted_to_the_gif_the_report_names(tmp_path, capsys, name):
    """make_gif.py writes WebP and APNG too; the report's progress.gif is a GIF of the same frames and durations."""
    write_gan(tmp_path)
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / name), "--fps", "5"])
    out = tmp_path / "report"
    run_report(capsys, "--gan-dir", tmp_path, "--gif", tmp_path / name, "--out-dir", out)
    assert f"(from `{tmp_path / name}`)" in (out / "report.md").read_text()
    with Image.open(out / "progress.gif") as gif, Image.open(tmp_path / name) as source:
        assert gif.format == "GIF" and gif.n_frames == source.n_frames == 8 and gif.info["loop"] == 0
        gif.seek(1)
        assert gif.info["duration"] == 200


def test_missing_inputs_are_named_not_fatal(tmp_path, capsys):
    out = tmp_path / "report"
    printed = run_report(capsys, "--baseline-dir", tmp_path / "nothing", "--gan-dir", tmp_path / "nothing",
                         "--vis-dir", tmp_path / "none", "--out-dir", out)
    assert "missing: " in printed and "baseline_metrics.jsonl" in printed and "gan_metrics.jsonl" in printed
    assert "progress.gif" in printed
    md = (out / "report.md").read_text()
    for title in SECTIONS[1:]:
        assert "- _Missing" in section(md, title), title
    assert "| missing | missing |" in md
    assert linked_images(md) == []
    assert pdf_pages(out / "report.pdf") == 1


def test_partial_visualizations_are_noted(tmp_path, capsys):
    write_baseline(tmp_path)
    write_gan(tmp_path)
    write_model(tmp_path / "visualization", "cifar10", [4], perturb=False, noise=False)
    out = tmp_path / "report"
    printed = run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path,
                         "--vis-dir", tmp_path / "visualization", "--out-dir", out)
    assert "both discriminators" in printed and "two layers or more" in printed and "real_images.png" in printed
    assert "missing (optional: the assignment does not ask for it): the perturbation of noise images" in printed
    md = (out / "report.md").read_text()
    assert "both discriminators" in md and "two layers or more" in md
    assert "cifar10/max_class.png" in linked_images(md)
    # Title, 2 curve pages, the grids, the quality plot and table, the class page and the one layer.
    assert pdf_pages(out / "report.pdf") == 1 + 2 + 1 + 2 + 1 + 1


def test_the_report_states_the_gradient_scaling_and_start_used(tmp_path, capsys):
    write_models(tmp_path / "visualization")
    out = tmp_path / "report"
    run_report(capsys, "--gan-dir", tmp_path, "--vis-dir", tmp_path / "visualization", "--out-dir", out)
    md = (out / "report.md").read_text()
    perturbation = section(md, "## Perturbed images")
    baseline = perturbation[:perturbation.index("### GAN discriminator")]
    gan = perturbation[perturbation.index("### GAN discriminator"):]
    assert "scaled min-max per batch" in baseline and "per image" not in baseline
    assert "scaled min-max per image" in gan and "per batch" not in gan
    # The noise perturbation: its numbers and its three images.
    assert "12.0% keep that class, and 55.0% are then classified as label + 1" in baseline
    assert "![perturbed](discriminator/noise_jittered_images.png)" in gan
    classes = section(md, "## Synthetic images maximizing each class")
    assert "starting from the mean image of the test batch" in classes.split("### GAN")[0]
    assert "starting from uniform noise images" in classes.split("### GAN")[1]
    features = section(md, "## Synthetic images maximizing features")
    assert features.split("### GAN")[1].count("starting from uniform noise images") == 2


def test_generator_quality_plots_and_the_last_table(tmp_path, capsys):
    write_gan(tmp_path)
    out = tmp_path / "report"
    printed = run_report(capsys, "--gan-dir", tmp_path, "--out-dir", out)
    assert "--eval-every" not in printed
    quality = section((out / "report.md").read_text(), "## Generator quality")
    assert "![generator quality over epochs](generator_quality.png)" in quality
    assert Image.open(out / "generator_quality.png").size[0] > 500
    # The table of the last eval record (epoch 3), as evaluate.py prints it.
    assert "At epoch 3" in quality and format_table(eval_record(3)) in quality
    assert "FID" in quality and "class accuracy" in quality and "collapse" in quality
    assert "Missing" not in quality
    # evaluate.py's own output beside the runs is shown as well.
    (tmp_path / "eval.json").write_text(json.dumps({"generator": "generator.model", **eval_record(9)}))
    run_report(capsys, "--gan-dir", tmp_path, "--out-dir", out)
    quality = section((out / "report.md").read_text(), "## Generator quality")
    assert format_table(eval_record(3)) in quality and format_table(eval_record(9)) in quality


def test_with_the_headless_inception_the_report_says_why_there_is_no_inception_score(tmp_path, capsys):
    """Eval records of the headless InceptionV3: FID and KID plotted, the Inception Score said unavailable once,
    with its reason, above the plot and in the table."""
    why = "these InceptionV3 weights have no classifier head; FID and KID are the field's"
    records = gan_records()
    for r in records:
        if r["type"] == "eval":
            for key in ("is_mean", "is_std", "reference_is_mean"):
                del r[key]
            r["is_mean_unavailable"] = why
    jsonl(tmp_path / "gan_metrics.jsonl", records)
    out = tmp_path / "report"
    run_report(capsys, "--gan-dir", tmp_path, "--out-dir", out)
    quality = section((out / "report.md").read_text(), "## Generator quality")
    assert quality.count(f"_Inception Score unavailable: {why}._") == 1
    assert f"  Inception Score      unavailable: {why}" in quality
    assert "![generator quality over epochs](generator_quality.png)" in quality
    evals = [r for r in records if r["type"] == "eval"]
    fig = pages.plot_quality(evals, [m for m in pages.QUALITY if any(m.key in r for r in evals)])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:2] == ["FID: lower is better", "KID: lower is better"] and len(titles) == 6
    assert not any("Inception" in title for title in titles)


def test_without_eval_records_the_report_says_how_to_get_them(tmp_path, capsys):
    write_baseline(tmp_path)
    write_gan(tmp_path, evals=False)
    out = tmp_path / "report"
    printed = run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path, "--out-dir", out)
    assert "missing (optional: the assignment does not ask for it): generator quality" in printed
    md = (out / "report.md").read_text()
    quality = section(md, "## Generator quality")
    assert "- _Missing (optional: the assignment does not ask for it)" in quality
    assert "train_gan.py --eval-every K" in quality and "python evaluate.py --generator" in quality
    assert "generator_quality.png" not in md and not (out / "generator_quality.png").exists()


def test_a_damaged_grid_is_listed_and_the_rest_is_complete(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(pages.matplotlib.rcParams, "pdf.compression", 0)  # for pdf_text
    write_baseline(tmp_path)
    write_gan(tmp_path)
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "progress.gif")])
    write_models(tmp_path / "visualization")
    grid = tmp_path / "output" / "004.png"  # one of the six grids shown
    Image.new("RGB", (340, 340), (10, 200, 30)).save(grid)
    grid.write_bytes(grid.read_bytes()[:300])
    (tmp_path / "visualization" / "cifar10" / "max_class.png").write_bytes(b"not a png")
    out = tmp_path / "report"
    capsys.readouterr()
    printed = run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path,
                         "--vis-dir", tmp_path / "visualization", "--out-dir", out)
    assert f"damaged: {grid} cannot be decoded" in printed
    assert "max_class.png cannot be decoded (not an image file)" in printed
    assert "missing" not in printed
    md = (out / "report.md").read_text()
    progress = section(md, "## Generator progress")
    assert f"- _Damaged: {grid} cannot be decoded" in progress
    assert f"_damaged: `{grid}` cannot be decoded_" in progress  # in its place in the table of grids
    assert len(re.findall(r"!\[epoch (\d+)\]", md)) == 5 and not (out / "progress" / "004.png").exists()
    assert "cannot be decoded" in section(md, "## Synthetic images maximizing each class")
    # Every other part is there, on as many pages as a report without damage.
    for link in linked_images(md):
        assert (out / link).is_file(), link
    assert "cifar10/max_features_layer8.png" in linked_images(md)
    assert pdf_pages(out / "report.pdf") == FULL_PAGES
    # The grid's place on its PDF page says so, and the title page lists both.
    text = pdf_text(out / "report.pdf")
    assert f"damaged: cannot be decoded\n{grid}" in text
    assert f"damaged: {grid} cannot be decoded" in text and "max_class.png cannot be decoded" in text


def test_a_cut_metrics_line_is_skipped_and_counted(tmp_path, capsys):
    """A line cut short by a kill, then the resumed run's records on fresh lines: every epoch is shown once,
    the last record of a repeated epoch wins, and the report says one line was skipped."""
    records = baseline_records()
    lines = [json.dumps(r) for r in records]
    redone = json.dumps(dict(records[1], test_acc=0.55))  # epoch 2 again, resumed from epoch 1's checkpoint
    lines = lines[:2] + [lines[2][:25], redone] + lines[2:]
    (tmp_path / "baseline_metrics.jsonl").write_text("\n".join(lines) + "\n")
    gan = [json.dumps(r) for r in gan_records()]
    gan.insert(5, gan[5][:40])  # a monitor line of epoch 2 cut short, then written again in full
    (tmp_path / "gan_metrics.jsonl").write_text("\n".join(gan) + "\n")
    args = report.parse_args(["--baseline-dir", str(tmp_path), "--gan-dir", str(tmp_path)])
    found = inputs.gather(args)
    assert [r["epoch"] for r in found.baseline] == [1, 2, 3, 4]
    assert found.baseline[1]["test_acc"] == 0.55
    assert [r["epoch"] for r in found.gan_epochs] == [1, 2, 3]
    assert [(r["epoch"], r["batch"]) for r in found.monitors] == [(e, b) for e in (1, 2, 3) for b in (50, 100, 150)]
    assert [r["epoch"] for r in found.evals] == [2, 3]
    out = tmp_path / "report"
    printed = run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path, "--out-dir", out)
    assert "damaged: 1 line(s) of" in printed and printed.count("line(s) of") == 2
    md = (out / "report.md").read_text()
    curves = section(md, "## Training curves")
    for name, records in (("baseline_metrics.jsonl", 5), ("gan_metrics.jsonl", 14)):
        assert f"1 line(s) of {tmp_path / name} cut short or garbled: skipped, the other {records} records are " \
               f"shown" in curves
    assert "| 4 | 90.00% |" in md and "| 3 | 72.34% |" in md
    assert "![GAN training curves](gan_curves.png)" in curves


def previous_report(tmp_path, capsys):
    """A finished report of a small run (two grids), then more inputs so that a new report would differ."""
    write_baseline(tmp_path)
    write_gan(tmp_path)
    write_models(tmp_path / "visualization")
    out = tmp_path / "report"
    run_report(capsys, "--baseline-dir", tmp_path, "--gan-dir", tmp_path, "--vis-dir", tmp_path / "visualization",
               "--out-dir", out, "--grids", 2)
    for epoch in range(8, 40):
        png(tmp_path / "output" / f"{epoch:03d}.png", (0, epoch * 5, 0))
    return out


# Run report.py, holding it at one moment: "render" after its third PDF page is drawn (nothing written yet),
# "write" while report.pdf's temporary file is on disk (everything else already written). It then touches
# the marker file and waits there for the test's signal.
HOLD = """
import glob, os, sys, time
sys.path.insert(0, {repo!r})
import report
from reporting import pages
moment, marker, out = sys.argv[1:4]

def hold():
    open(marker, "w").close()
    time.sleep(600)

if moment == "render":
    draw = pages.PdfPages.savefig
    def savefig(self, *args, **kwargs):
        draw(self, *args, **kwargs)
        if self.get_pagecount() == 3:
            hold()
    pages.PdfPages.savefig = savefig
else:
    fsync = os.fsync
    def fsync_then_hold(fd):
        fsync(fd)
        if glob.glob(os.path.join(out, "report.pdf.*.tmp")):
            hold()
    os.fsync = fsync_then_hold
report.main(sys.argv[4:])
"""


@pytest.mark.parametrize("moment", ["render", "write"])
def test_sigterm_mid_report_keeps_the_previous_pdf(tmp_path, capsys, moment):
    out = previous_report(tmp_path, capsys)
    before = (out / "report.pdf").read_bytes()
    marker = tmp_path / "holding"
    flags = ["--baseline-dir", tmp_path, "--gan-dir", tmp_path, "--vis-dir", tmp_path / "visualization",
             "--out-dir", out, "--grids", 30]
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO), moment, *map(str, [marker, out, *flags])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=60)
        assert bool(glob.glob(str(out / "report.pdf.*.tmp"))) == (moment == "write")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert "Traceback" not in stderr
    assert (out / "report.pdf").read_bytes() == before
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)


def run_script(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO, "report.py"), *map(str, flags)],
                          capture_output=True, text=True, timeout=300)


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out_dir in (blocker / "report", blocker):
        result = run_script("--gan-dir", tmp_path, "--out-dir", out_dir)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: --out-dir {out_dir}") and "a_file is a file" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert blocker.read_text() == "not a folder"


def test_a_failed_write_is_one_line_and_keeps_the_previous_report(tmp_path, capsys):
    out = previous_report(tmp_path, capsys)
    before = (out / "report.pdf").read_bytes()
    # A file where the report puts its grids: that write fails as a full disk or a lost permission would.
    for grid in (out / "progress").iterdir():
        grid.unlink()
    (out / "progress").rmdir()
    (out / "progress").write_text("in the way")
    result = run_script("--baseline-dir", tmp_path, "--gan-dir", tmp_path, "--vis-dir", tmp_path / "visualization",
                        "--out-dir", out)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot write {out / 'progress'}/")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert (out / "report.pdf").read_bytes() == before
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)


def test_too_few_grids_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        report.main(["--grids", "1", "--out-dir", str(tmp_path / "report")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --grids must be at least 2, got 1\n"
