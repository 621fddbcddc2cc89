"""compare.py on a sweep folder: one seed from real short runs of both trainers (which also shows their ETA: the
per-epoch records' eta_s is the measured pace times the epochs left), the other seeds from metrics files written
as the trainers write them, plus unfinished, empty and damaged runs. The numbers are checked against mean and
sample std computed by hand, the table and JSON read back, and the PNG decoded."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import compare
from conftest import REPO, write_image_folder
from training.progress import duration

TINY = ["--width", "8", "--batch-size", "32", "--limit-train", "128", "--limit-test", "50", "--device", "cpu"]


def train(script, data, out, epochs):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), "--data-dir", str(data), "--out-dir",
                             str(out), "--epochs", str(epochs), *TINY], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def write_jsonl(path, records, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def baseline_records(final_acc, epochs=3):
    return [{"epoch": e, "lr": 1e-3, "train_loss": 1.0, "train_acc": 0.5, "test_acc": final_acc - 0.1 * (epochs - e),
             "seconds": 1.0, "images_per_s": 100.0, "eta_s": epochs - e} for e in range(1, epochs + 1)]


def gan_records(final_acc, epochs=2, evals=None):
    records = []
    for e in range(1, epochs + 1):
        records.append({"type": "monitor", "epoch": e, "batch": 50, "gp": 0.1})
        records.append({"type": "epoch", "epoch": e, "test_acc": final_acc - 0.05 * (epochs - e), "seconds": 2.0,
                        "images_per_s": 50.0, "eta_s": 2.0 * (epochs - e)})
    if evals is not None:
        records.append({"type": "eval", "epoch": epochs, "n": 5000, **evals})
    return records


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/sweep/{w8,deep}/seed-K/ and the stdout of the real runs of w8/seed-0."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "data"
    write_image_folder(data, train_per_class=13, test_per_class=5)
    sweep = root / "sweep"
    w8 = sweep / "w8"
    out = {"baseline": train("train_baseline.py", data, w8 / "seed-0", 3),
           "gan": train("train_gan.py", data, w8 / "seed-0", 2)}
    for seed, (b, g) in {1: (0.5, 0.3), 2: (0.7, 0.4)}.items():
        write_jsonl(w8 / f"seed-{seed}" / "baseline_metrics.jsonl", baseline_records(b))
        write_jsonl(w8 / f"seed-{seed}" / "gan_metrics.jsonl", gan_records(g))
    for seed, fid in {0: 50.0, 1: 56.0, 2: 62.0}.items():
        (w8 / f"seed-{seed}" / "eval.json").write_text(json.dumps({"n": 10000, "fid": fid, "is_mean": 4.0 + seed}))
    write_jsonl(w8 / "seed-3" / "baseline_metrics.jsonl", baseline_records(0.9, epochs=2))  # still running
    (w8 / "seed-4").mkdir()
    deep = sweep / "deep"
    write_jsonl(deep / "seed-0" / "baseline" / "baseline_metrics.jsonl", baseline_records(0.80))
    write_jsonl(deep / "seed-0" / "gan" / "gan_metrics.jsonl",
                gan_records(0.6, evals={"class_acc": 0.30, "classifier_fd": 10.0}))
    # A line cut short by a kill mid-append: skipped, the run still counts.
    write_jsonl(deep / "seed-1" / "baseline" / "baseline_metrics.jsonl", baseline_records(0.84),
                tail='{"epoch": 4, "te')
    write_jsonl(deep / "seed-1" / "gan" / "gan_metrics.jsonl",
                gan_records(0.7, evals={"class_acc": 0.40, "classifier_fd": 14.0}))
    (deep / "seed-2").mkdir()
    (deep / "seed-2" / "gan_metrics.jsonl").write_bytes(b"\x00\x17garbage\n")
    return sweep, out


@pytest.fixture(scope="module")
def compared(sweep):
    root, _ = sweep
    result = subprocess.run([sys.executable, os.path.join(REPO, "compare.py"), str(root)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((root / "compare.json").read_text())
    return root, result.stdout, report, {row["config"]: row for row in report["configurations"]}


def final_acc(path):
    records = [json.loads(line) for line in open(path)]
    return [r for r in records if r.get("type", "epoch") == "epoch"][-1]["test_acc"]


def assert_summary(cell, mean, std, n, values, **tolerance):
    """A cell's mean, std, n and values; pytest.approx takes no list inside a dict, so the list is compared apart."""
    numbers = {"mean": mean, "std": std, "n": n}
    assert set(cell) == {*numbers, "values"}
    assert {key: cell[key] for key in numbers} == pytest.approx(numbers, **tolerance)
    assert cell["values"] == pytest.approx(values, **tolerance)


def test_mean_and_sample_std_over_seeds(sweep, compared):
    root, _, _, rows = compared
    real = final_acc(root / "w8" / "seed-0" / "baseline_metrics.jsonl")
    values = [real, 0.5, 0.7]
    mean = (real + 0.5 + 0.7) / 3
    std = math.sqrt(((real - mean) ** 2 + (0.5 - mean) ** 2 + (0.7 - mean) ** 2) / 2)
    w8 = rows["w8"]
    assert_summary(w8["baseline"]["test_acc"], mean, std, 3, values)
    assert w8["baseline"]["epochs"] == 3 and w8["baseline"]["seeds"] == [0, 1, 2]
    real_gan = final_acc(root / "w8" / "seed-0" / "gan_metrics.jsonl")
    assert w8["gan"]["test_acc"]["values"] == pytest.approx([real_gan, 0.3, 0.4]) and w8["gan"]["epochs"] == 2
    assert_summary(w8["generator"]["fid"], 56.0, 6.0, 3, [50.0, 56.0, 62.0])
    assert w8["generator"]["is_mean"]["mean"] == pytest.approx(5.0) and w8["generator"]["class_acc"] is None

    deep = rows["deep"]
    assert_summary(deep["baseline"]["test_acc"], 0.82, 0.0282843, 2, [0.80, 0.84], abs=1e-6)
    assert deep["gan"]["test_acc"]["mean"] == pytest.approx(0.65)
    assert deep["generator"]["class_acc"]["mean"] == pytest.approx(0.35)
    assert_summary(deep["generator"]["classifier_fd"], 12.0, 2.8284271, 2, [10.0, 14.0])


def test_table_lists_what_was_left_out(compared):
    root, stdout, report, _ = compared
    table = (root / "compare.md").read_text()
    assert stdout.startswith(table)
    assert "| deep | 3 / 2 | 0.8200 ± 0.0283 (n=2) | 0.6500 ± 0.0707 (n=2) | - | - | 35.0% ± 7.1% (n=2) | " \
           "12.000 ± 2.828 (n=2) |" in table
    assert "| configuration | epochs (baseline / GAN) | baseline test acc | GAN discriminator test acc | " \
           "Inception Score | FID | class accuracy | classifier FD |" in table
    assert "| w8 | 3 / 2 |" in table and "56.000 ± 6.000 (n=3)" in table
    left_out = report["left_out"]
    assert left_out == ["deep/seed-1/baseline/baseline_metrics.jsonl: 1 damaged line(s) skipped, the rest compared",
                        "deep/seed-2/gan_metrics.jsonl: no epoch with a test accuracy (1 damaged line(s)), left out",
                        "w8/seed-4: no baseline_metrics.jsonl or gan_metrics.jsonl",
                        "w8/seed-3: baseline unfinished at epoch 2 of 3, left out"]
    assert all(f"- {p}" in table for p in left_out)


def test_plot_has_one_colour_per_configuration(compared):
    root = compared[0]
    with Image.open(root / "compare.png") as image:
        assert image.size == (1100, 420)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    # Matplotlib's first two cycle colours, C0 and C1: configurations in the table's order (deep, w8).
    assert (31, 119, 180) in colours and (255, 127, 14) in colours


def test_no_finished_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "seed-0").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit:
        compare.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err == f"error: no finished run under {tmp_path}: expected {tmp_path}/<config>/seed-K/ holding " \
                  "baseline_metrics.jsonl or gan_metrics.jsonl; 1 problem(s), the first: empty/seed-0: no " \
                  "baseline_metrics.jsonl or gan_metrics.jsonl\n"
    assert not (tmp_path / "compare.md").exists()


@pytest.mark.parametrize("job", ["baseline", "gan"])
def test_trainers_print_and_log_the_eta_of_the_measured_pace(sweep, job):
    root, stdout = sweep
    records = [json.loads(line) for line in open(root / "w8" / "seed-0" / f"{job}_metrics.jsonl")]
    epochs = [r for r in records if r.get("type", "epoch") == "epoch"]
    total = len(epochs)
    for k, r in enumerate(epochs, 1):
        pace = sum(e["seconds"] for e in epochs[:k]) / k  # the epochs have equal batches: seconds per epoch
        assert r["eta_s"] == pytest.approx(pace * (total - k), abs=0.051)
        line = next(line for line in stdout[job].splitlines() if line.split()[:1] == [str(r["epoch"])])
        assert line.split()[-1] == duration(r["eta_s"])
    assert epochs[-1]["eta_s"] == 0
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3600 * 25 + 7 * 60)] == \
           ["0s", "1m00s", "1m01s", "59m59s", "25h07m"]


def test_a_sweep_of_one_configuration_may_hold_the_seeds_directly(tmp_path, capsys):
    for seed, acc in ((0, 0.6), (1, 0.9)):
        write_jsonl(tmp_path / "w128" / f"seed-{seed}" / "baseline_metrics.jsonl", baseline_records(acc))
    compare.main([str(tmp_path / "w128"), "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    (row,) = report["configurations"]
    assert row["config"] == "w128" and row["gan"]["test_acc"] is None
    assert row["baseline"]["test_acc"]["mean"] == pytest.approx(0.75)
    assert row["baseline"]["test_acc"]["std"] == pytest.approx(math.sqrt(2 * 0.15 ** 2))
    assert "| w128 | 3 / - | 0.7500 ± 0.2121 (n=2) | - |" in capsys.readouterr().out


def test_a_measure_the_seeds_could_not_have_is_shown_unavailable_with_why(tmp_path, capsys):
    """The headless InceptionV3 gives FID and KID but no Inception Score: its column says unavailable, and the
    reason is listed once under the table."""
    why = "these InceptionV3 weights have no classifier head; FID and KID are the field's"
    for seed, fid in ((0, 40.0), (1, 44.0)):
        write_jsonl(tmp_path / "headless" / f"seed-{seed}" / "gan_metrics.jsonl", gan_records(0.5))
        (tmp_path / "headless" / f"seed-{seed}" / "eval.json").write_text(json.dumps(
            {"n": 10000, "fid": fid, "kid_mean": 0.02, "kid_std": 0.001, "is_mean_unavailable": why}))
    compare.main([str(tmp_path)])
    (row,) = json.loads((tmp_path / "compare.json").read_text())["configurations"]
    assert row["generator"]["is_mean"] is None and row["generator"]["fid"]["mean"] == pytest.approx(42.0)
    assert row["generator_unavailable"] == {"is_mean": [f"Inception Score unavailable: {why}"]}
    table = capsys.readouterr().out
    assert "| headless | - / 2 | - | 0.5000 ± 0.0000 (n=2) | unavailable | 42.000 ± 2.828 (n=2) | " \
           "0.02000 ± 0.00000 (n=2) |" in table
    assert table.count(why) == 1 and f"- headless: Inception Score unavailable: {why}" in table


def strict_json(text):
    """What a strict reader accepts: no NaN or Infinity, and every string valid Unicode (no lone surrogate)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(text, parse_constant=refuse)
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # a lone surrogate fails here
    return report


def sweep_of(root, config, evals):
    """root/<config>/seed-K/ (config: bytes, any name the file system takes) with a GAN run and eval.json per seed;
    evals: (test accuracy, FID, KID) per seed as JSON texts. compare.py's (result, strict JSON, table)."""
    for seed, (acc, fid, kid) in enumerate(evals):
        folder = os.path.join(os.fsencode(root), config, f"seed-{seed}".encode())
        os.makedirs(folder)
        write_jsonl(os.fsdecode(os.path.join(folder, b"gan_metrics.jsonl")), gan_records(acc))
        with open(os.path.join(folder, b"eval.json"), "w") as f:
            f.write(f'{{"n": 10000, "fid": {fid}, "kid_mean": {kid}, "is_mean": {4 + seed}}}')
    result = subprocess.run([sys.executable, os.path.join(REPO, "compare.py"), str(root)], capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    table = (root / "compare.md").read_text(encoding="utf-8")
    assert result.stdout.decode("utf-8").startswith(table)
    return strict_json((root / "compare.json").read_text(encoding="utf-8")), table


def test_a_folder_name_that_is_not_utf8_is_shown_escaped(tmp_path):
    """An old zip unpacks café in Latin-1."""
    report, table = sweep_of(tmp_path, b"caf\xe9", [(0.5, 50.0, 0.02), (0.7, 60.0, 0.04)])
    assert [row["config"] for row in report["configurations"]] == ["caf\\xe9"]
    assert "| caf\\xe9 | - / 2 |" in table and "55.000 ± 7.071 (n=2)" in table


def test_a_diverged_seed_is_listed_and_the_others_fill_the_cell(tmp_path):
    """One seed's FID is NaN and its KID Infinity (as Python's json writes them): the good seeds' values make the
    cells, the bad seed is listed, and compare.json stays strict JSON."""
    report, table = sweep_of(tmp_path, b"w8", [(0.5, 50.0, 0.02), (0.7, 60.0, 0.04), (0.6, "NaN", "Infinity")])
    (row,) = report["configurations"]
    assert_summary(row["generator"]["fid"], 55.0, math.sqrt(50), 2, [50.0, 60.0])
    assert row["generator"]["kid_mean"]["values"] == pytest.approx([0.02, 0.04])
    assert row["generator"]["is_mean"]["n"] == 3 and row["gan"]["test_acc"]["n"] == 3
    assert report["left_out"] == ["w8/seed-2: FID nan, KID inf (eval.json, 10000 samples), left out of those columns"]
    assert "| w8 | - / 2 |" in table and "55.000 ± 7.071 (n=2)" in table and "0.03000 ± 0.01414 (n=2)" in table
    assert "- w8/seed-2: FID nan, KID inf" in table
