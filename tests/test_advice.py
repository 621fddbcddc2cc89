"""Every piece of advice the trainers print, run as printed: the NaN stop's command (a real process whose loss
turns NaN while the learning rate is too high), each health warning's flags on a --resume (and the new run it
names for the flag a resume may not change), the refusal of a resume with another configuration ("pass --betas
0.5 0.9", "leave out --limit-train"), the one-line errors that name a flag to use, and the lock of a run that is
gone. A changed setting is recorded once: a note, a "change" record in the metrics, the checkpoint's history.

Advice printed elsewhere is run by other tests: a stopped run's "run the same command with --resume"
(test_reliability, test_baseline), a full disk's "--resume once there is room" (test_reliability), the jobs'
"continue with" commands (test_slurm), a damaged CIFAR-10 batch's "delete ... to fetch it again" and prepare.py's
mirrors (test_prepare), an output path through a file (test_output_paths)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from torch_utils.files import read_metrics
import train_baseline
import train_gan
from training import health

TINY = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--limit-test", "20"]

# The loss of a run whose learning rate is above 6e-5 turns NaN: every Adam step then makes the weights infinite.
DIVERGE_ABOVE_6E_5 = """
import torch
step = torch.optim.Adam.step
def step_and_diverge(self, *args, **kwargs):
    loss = step(self, *args, **kwargs)
    if self.param_groups[0]["lr"] > 6e-5:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(float("inf"))
    return loss
torch.optim.Adam.step = step_and_diverge
"""


def run_patched(script, patch, *args):
    """The script as a real process with patch run first in it."""
    path = os.path.join(REPO, script)
    code = (f"import sys; sys.path.insert(0, {REPO!r}); sys.argv[0] = {path!r}\n{patch}\n"
            f"import runpy; runpy.run_path({path!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def error_line(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    return line


def changes(out, job="gan"):
    return [(r["setting"], r["from"], r["to"]) for r in read_metrics(out / f"{job}_metrics.jsonl")[0]
            if r["type"] == "change"]


def history(out, job="gan"):
    return [(r["setting"], r["from"], r["to"]) for r in
            torch.load(out / f"{job}.ckpt", weights_only=True)["history"]]


# ---------------------------------------------------------------------------------------------------------
# A NaN loss


def test_the_nan_stop_of_a_gan_run_says_a_command_that_goes_on(data_dir, tmp_path):
    """Epoch 1 is saved; in epoch 2 the loss turns NaN. The command printed resumes the checkpoint at half the
    learning rate (refused before: "was trained with --lr 0.0001, this run asks for 5e-05") and finishes."""
    out = tmp_path / "run"
    command = ["--data-dir", data_dir, "--out-dir", out, *TINY]
    train_gan.main([str(a) for a in [*command, "--epochs", 1]])
    checkpoint = (out / "gan.ckpt").read_bytes()
    command += ["--epochs", 2, "--resume"]
    stopped = error_line(run_patched("train_gan.py", DIVERGE_ABOVE_6E_5, *command))
    assert stopped.startswith("error: a loss became NaN or infinite in epoch 2 by batch ")
    assert (out / "gan.ckpt").read_bytes() == checkpoint
    advice = re.fullmatch(r".*the last good checkpoint \S+ is kept; to go on from it at half the learning rate, run "
                          r"the same command with (--resume --lr 5e-05)", stopped)
    assert advice, stopped
    result = run_patched("train_gan.py", DIVERGE_ABOVE_6E_5, *command, *advice.group(1).split())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: --lr changes from 0.0001 to 5e-05 at epoch 2, batch 0" in result.stdout
    epochs = [r for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"]
    assert [r["lr"] for r in epochs] == [1e-4, 5e-5]
    assert changes(out) == history(out) == [("lr", 1e-4, 5e-5)]
    assert torch.load(out / "gan.ckpt", weights_only=True)["opt_d"]["param_groups"][0]["lr"] == 5e-5


def test_the_nan_stop_of_a_baseline_before_any_checkpoint_says_a_command_that_trains(data_dir, tmp_path):
    out = tmp_path / "run"
    command = ["--data-dir", data_dir, "--out-dir", out, *TINY, "--epochs", 1]
    stopped = error_line(run_patched("train_baseline.py", DIVERGE_ABOVE_6E_5, *command))
    advice = re.fullmatch(r"error: a loss became NaN or infinite in epoch 1 by batch \d+; nothing was saved; run the "
                          r"same command with (--lr 5e-05) \(half the learning rate\)", stopped)
    assert advice, stopped
    result = run_patched("train_baseline.py", DIVERGE_ABOVE_6E_5, *command, *advice.group(1).split())
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["lr"] for r in read_metrics(out / "baseline_metrics.jsonl")[0] if r["type"] == "epoch"] == [5e-5]


# ---------------------------------------------------------------------------------------------------------
# The health warnings

# A value for each flag an advice names without one: lower or higher than the run's (its defaults)
CHANGED = {"--lr": "5e-05", "--lambda-gp": "20"}


def advised(advice):
    """([(flag, value)] the advice gives a --resume, [flags] it gives a new run)."""
    resume, _, new_run = advice.partition("a new run (another --out-dir) with")
    assert resume.startswith("--resume with "), advice
    flags = re.findall(r"(--[a-z-]+)(?: (\d[\d.e+-]*))?", resume.removeprefix("--resume with "))
    return [(flag, value or CHANGED[flag]) for flag, value in flags], re.findall(r"--[a-z-]+", new_run)


def test_each_warnings_advice_runs_on_a_resume(data_dir, tmp_path, capsys):
    """Every flag the rules advise for a --resume is taken by one, and recorded; the flag a resume may not
    change (--minibatch-discrimination changes the critic) is advised as a new run, which trains."""
    to_resume, to_start = {}, set()
    for rule in health.RULES:
        resume, new_run = advised(rule.advice)
        to_resume.update(resume)
        to_start.update(new_run)
    assert set(to_resume) == {"--lr", "--lambda-gp", "--n-critic", "--feature-matching"}
    assert to_start == {"--minibatch-discrimination"}

    out = tmp_path / "run"
    command = ["--data-dir", str(data_dir), "--out-dir", str(out), *TINY, "--limit-train", "64"]
    train_gan.main([*command, "--epochs", "1"])
    before = train_gan.parse_args(command)
    for epochs, (flag, value) in enumerate(sorted(to_resume.items()), start=2):
        command += [flag, value]
        train_gan.main([*command, "--epochs", str(epochs), "--resume"])
        setting = flag[2:].replace("-", "_")
        assert changes(out)[-1] == (setting, getattr(before, setting), float(value))
        assert f"note: {flag} changes from" in capsys.readouterr().out
    assert changes(out) == history(out) and len(changes(out)) == 4
    texts = EventAccumulator(str(out / "tb" / "gan"), size_guidance={"tensors": 0})
    texts.Reload()
    shown = [e.tensor_proto.string_val[0].decode() for e in texts.Tensors("run/changes/text_summary")]
    assert [line.split(" changes")[0] for line in shown] == [flag for flag, _ in sorted(to_resume.items())]
    assert read_metrics(out / "gan_metrics.jsonl")[0][-1]["lambda_gp"] == 20.0

    for flag in to_start:
        train_gan.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "new"), *TINY, "--limit-train", "64",
                        "--epochs", "1", flag])
        assert (tmp_path / "new" / "gan.ckpt").exists()


# Kills the trainer (SIGKILL) as it writes its first checkpoint: what it appended to the metrics stays.
KILL_IN_FIRST_SAVE = """
import os, signal
from training import run as training_run
training_run.write_together = lambda files, **options: os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_change_whose_resume_was_killed_is_recorded_once(data_dir, tmp_path):
    out = tmp_path / "run"
    command = ["--data-dir", data_dir, "--out-dir", out, *TINY, "--limit-train", 64]
    train_gan.main([str(a) for a in [*command, "--epochs", 1]])
    changed = [*command, "--epochs", 2, "--resume", "--n-critic", 3]
    assert run_patched("train_gan.py", KILL_IN_FIRST_SAVE, *changed).returncode == -9
    assert changes(out) == [("n_critic", 1, 3)] and history(out) == []
    result = run_patched("train_gan.py", "", *changed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert changes(out) == history(out) == [("n_critic", 1, 3)]


# ---------------------------------------------------------------------------------------------------------
# A resume that would change the run's configuration, and flags that cannot work


def apply(advice, argv):
    """argv with an advice followed: "pass --flag values..." replaces those flags' words, "leave out --flag..." drops
    them; "pass ... and leave out ..." does both."""
    for part in advice.split(" and "):
        action, words = re.fullmatch(r"(pass|leave out) (--.*)", part).groups()
        words = words.split()
        kept, skipping = [], False
        for word in argv:
            skipping = (word.startswith("--") and word in words) or (skipping and not word.startswith("--"))
            if not skipping:
                kept.append(word)
        argv = kept + (words if action == "pass" else [])
    return argv


@pytest.mark.parametrize("asked, says", [
    (["--width", "12"], "was trained with --width 8, this run asks for --width 12; pass --width 8"),
    (["--betas", "0.0", "0.9"], "was trained with --betas 0.5 0.9, this run asks for --betas 0.0 0.9; pass "
                                "--betas 0.5 0.9"),
    (["--minibatch-discrimination"], "was trained with no --minibatch-discrimination, this run asks for "
                                     "--minibatch-discrimination; leave out --minibatch-discrimination"),
    (["--limit-train", "32"], "was trained with --limit-train 64, this run asks for --limit-train 32; pass "
                              "--limit-train 64"),
    (["--seed", "3"], "was trained with --seed 0, this run asks for --seed 3; pass --seed 0"),
    # Every flag that differs, in one line: advice naming only the first would be refused again for the next
    (["--betas", "0.0", "0.9", "--seed", "3"], "was trained with --betas 0.5 0.9 and --seed 0, this run asks for "
                                               "--betas 0.0 0.9 and --seed 3; pass --betas 0.5 0.9 --seed 0"),
    (["--width", "12", "--minibatch-discrimination", "--seed", "3"],
     "was trained with --width 8, no --minibatch-discrimination and --seed 0, this run asks for --width 12, "
     "--minibatch-discrimination and --seed 3; pass --width 8 --seed 0 and leave out --minibatch-discrimination")])
def test_a_refused_resume_says_flags_that_resume_it(data_dir, tmp_path, capsys, asked, says):
    out = tmp_path / "run"
    command = ["--data-dir", str(data_dir), "--out-dir", str(out), *TINY, "--limit-train", "64", "--betas", "0.5",
               "0.9", "--epochs", "1"]
    train_gan.main(command)
    capsys.readouterr()
    command = apply(f"pass {' '.join(asked)}", command) + ["--resume"]
    with pytest.raises(SystemExit) as exit_:
        train_gan.main(command)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    message = re.fullmatch(rf"error: \S+gan.ckpt {re.escape(says)} to resume it, or choose another --out-dir\n", err)
    assert message, err
    train_gan.main(apply(says.rpartition("; ")[2], command))
    assert "1 epochs are done (asked for 1); nothing to resume" in capsys.readouterr().out


def test_a_run_without_resume_over_a_checkpoint_says_pass_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    command = ["--data-dir", str(data_dir), "--out-dir", str(out), *TINY, "--limit-train", "64", "--epochs", "1"]
    train_gan.main(command)
    with pytest.raises(SystemExit):
        train_gan.main([*command, "--epochs", "2"])
    assert "pass --resume to continue it" in capsys.readouterr().err
    train_gan.main([*command, "--epochs", "2", "--resume"])
    assert [r["epoch"] for r in read_metrics(out / "gan_metrics.jsonl")[0] if r["type"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("trainer, flags, advice", [
    (train_gan, ["--batch-size", "1"], r"use (--batch-size 2) or more"),
    (train_baseline, ["--precision", "bf16"], r"use (--precision fp32)"),
    (train_gan, ["--speed", "fast"], r"use (--speed plain) or auto on the CPU"),
    pytest.param(train_baseline, ["--device", "cuda"], r"use (--device cpu)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="advice for a machine without CUDA"))])
def test_an_error_naming_a_flag_to_use_trains_with_it(data_dir, tmp_path, capsys, trainer, flags, advice):
    command = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path), *TINY, "--limit-train", "64", "--epochs", "1",
               *flags]
    with pytest.raises(SystemExit) as exit_:
        trainer.main(command)
    assert exit_.value.code == 2
    followed = re.search(advice + "$", capsys.readouterr().err.strip())
    assert followed
    trainer.main(command + followed.group(1).split())
    assert os.listdir(tmp_path)


def test_a_lock_of_a_run_that_is_gone_is_cleared_as_the_error_says(data_dir, tmp_path, capsys):
    """A lock left by a run on another node (a crash there), met without waiting: deleting the file, as the
    error says, frees the folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "gan.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "since": "2030-01-01 00:00:00",
                                              "id": "0" * 32, "beat": 3}))
    command = ["--data-dir", str(data_dir), "--out-dir", str(out), *TINY, "--limit-train", "64", "--epochs", "1"]
    with pytest.raises(SystemExit):
        train_gan.main([*command, "--lock-wait", "0"])
    err = capsys.readouterr().err
    lock = re.fullmatch(r"error: another train_gan.py run is using \S+ \(node-elsewhere, pid 4242, since "
                        r"2030-01-01 00:00:00\): wait for it to end, choose another --out-dir, or delete (\S+) if that "
                        r"run is gone\n", err)
    assert lock, err
    os.remove(lock.group(1))
    train_gan.main(command)
    assert (out / "gan.ckpt").exists() and not (out / "gan.lock").exists()
