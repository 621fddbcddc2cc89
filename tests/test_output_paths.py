"""Every script's output path, checked before any work: a file where a folder is asked for, or a path under a
file, is one line (`error: ...`, exit 2) naming the file in the way, never a traceback; check_gpu.py as a real
process, the others through their main() (an interpreter start per case would cost seconds)."""
import os
import subprocess
import sys

import pytest

import compare
from conftest import REPO
import evaluate
import make_gif
import report
import sample
import train_baseline
import train_gan
import visualize

# (script's main, its arguments with OUT for the output path, the flag). Inputs that do not exist: the output
# path is checked first.
SCRIPTS = [
    (train_baseline.main, ["--data-dir", "nowhere", "--out-dir", "OUT", "--device", "cpu"], "--out-dir"),
    (train_gan.main, ["--data-dir", "nowhere", "--out-dir", "OUT", "--device", "cpu"], "--out-dir"),
    (visualize.main, ["all", "--model", "missing.model", "--out-dir", "OUT", "--device", "cpu"], "--out-dir"),
    (report.main, ["--out-dir", "OUT"], "--out-dir"),
    (compare.main, [".", "--output-dir", "OUT"], "--output-dir"),
    (evaluate.main, ["--generator", "missing.model", "--output", "OUT/eval.json", "--device", "cpu"], "--output"),
    (sample.main, ["--model", "missing.model", "--classes", "cat", "--output", "OUT/cats.png"], "--output"),
    (make_gif.main, ["--input", "missing", "--output", "OUT/progress.gif"], "--output"),
]
FOLDER_FLAGS = {"--out-dir", "--output-dir"}


@pytest.mark.parametrize("main, args, flag", SCRIPTS, ids=[m.__module__ for m, _, _ in SCRIPTS])
@pytest.mark.parametrize("where", ["the file itself", "under the file"])
def test_an_output_path_through_a_file_is_one_line(main, args, flag, where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    out = "a_file" if where == "the file itself" and flag in FOLDER_FLAGS else "a_file/sub"
    with pytest.raises(SystemExit) as exit_:
        main([a.replace("OUT", out) for a in args])
    err = capsys.readouterr().err
    path = next(a for a in args if "OUT" in a).replace("OUT", out)
    if out == "a_file":
        assert err == f"error: {flag} {path} is a file, not a folder; choose another {flag}\n"
    else:
        assert err == f"error: {flag} {path}: a_file is a file, not a folder; choose another {flag}\n"
    assert exit_.value.code == 2
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_an_output_file_named_as_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "grids.gif").mkdir()
    with pytest.raises(SystemExit) as exit_:
        make_gif.main(["--input", str(tmp_path), "--output", str(tmp_path / "grids.gif")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'grids.gif'} is a folder; name a file\n"


@pytest.mark.parametrize("out", ["check.json", "check.json/sub"])
def test_check_gpu_out_dir_through_a_file_is_one_line_exit_2(tmp_path, out):
    (tmp_path / "check.json").write_text("{}")
    result = subprocess.run([sys.executable, os.path.join(REPO, "check_gpu.py"), "--device", "cpu", "--out-dir", out,
                             "--data-dir", "nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    path = str(tmp_path / out)  # check_gpu.py takes its paths as absolute ones
    where = "" if out == "check.json" else f": {tmp_path / 'check.json'}"
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: --out-dir {path}{where} is a file, not a folder; choose another --out-dir\n"
    assert (tmp_path / "check.json").read_text() == "{}"


def dangling_symlink(path):
    os.symlink(path.parent / "gone", path)
    return f"a dangling symlink (to {path.parent / 'gone'}), not a folder"


def a_file(path):
    path.write_text("in the way")
    return "a file, not a folder"


def a_folder(path):
    path.mkdir()
    return "a folder, not a file"


@pytest.mark.parametrize("main, name, make", [
    (train_gan.main, "output", dangling_symlink), (train_gan.main, "tb", a_file),
    (train_baseline.main, "tb", a_file), (train_gan.main, "generator.model", a_folder),
    (train_baseline.main, "cifar10.model", a_folder), (train_baseline.main, "baseline_metrics.jsonl", a_folder)],
    ids=["gan-output-symlink", "gan-tb-file", "baseline-tb-file", "gan-model-folder", "baseline-model-folder",
         "baseline-metrics-folder"])
def test_a_part_of_the_out_dir_in_the_way_is_one_line_before_any_work(data_dir, tmp_path, capsys, main, name, make):
    """What stands where a trainer writes a file or makes a folder in --out-dir is named before the first epoch,
    which its first write would otherwise cost."""
    out = tmp_path / "run"
    out.mkdir()
    what = make(out / name)
    with pytest.raises(SystemExit) as exit_:
        main(["--data-dir", str(data_dir), "--out-dir", str(out), "--width", "8", "--batch-size", "32", "--device",
              "cpu", "--limit-train", "64", "--limit-test", "20", "--epochs", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --out-dir {out}: {out / name} is {what}; choose another --out-dir\n"
    assert os.listdir(out) == [name]
