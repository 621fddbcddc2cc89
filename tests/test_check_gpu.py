"""check_gpu.py, the one command for a GPU node, run whole at tiny scale on the CPU (its GPU tests skip here)."""
import json
import os
import re
import subprocess
import sys

import pytest

import check_gpu
from conftest import REPO, write_image_folder


def test_check_gpu_writes_the_json_and_the_table_it_measured(tmp_path):
    write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=2)
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, os.path.join(REPO, "check_gpu.py"), "--data-dir", tmp_path / "data",
                             "--out-dir", out, "--device", "cpu", "--width", "8", "--batch-size", "16",
                             "--limit-train", "64", "--limit-test", "20", "--epochs", "1", "--bench-steps", "1",
                             "--bench-warmup", "0", "--tests", os.path.join(REPO, "tests", "test_gpu.py")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((out / "check.json").read_text())
    table = (out / "check.md").read_text()
    assert report["device"] == "cpu" and report["width"] == 8
    assert re.fullmatch(r"\d+ (passed|skipped).*", report["tests"]["summary"])
    assert report["bench"]["results"]["gan_fp32"] > 0
    assert [(r["job"], r["precision"]) for r in report["runs"]] == [("baseline", "fp32"), ("gan", "fp32")]
    for run in report["runs"]:
        assert run["passed"] and run["images_per_s"] > 0
        assert run["epoch_seconds"] == pytest.approx(50_000 / run["images_per_s"], rel=1e-2)
        epochs = {"baseline": ["100"], "gan": ["200", "500"]}[run["job"]]
        assert list(run["schedule_hours"]) == epochs
        for e in epochs:
            assert run["schedule_hours"][e] == pytest.approx(int(e) * run["epoch_seconds"] / 3600, rel=1e-2, abs=0.01)
        assert f"| {run['job']} | fp32 | {run['images_per_s']:.0f} | {run['epoch_seconds']:.0f} |" in table
        assert os.path.exists(run["log"])
    assert "| gan_fp32 |" in table and report["tests"]["summary"] in table
    assert table in result.stdout


def test_check_gpu_refuses_bad_input_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        check_gpu.main(["--width", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --width must be at least 1, got 0"
