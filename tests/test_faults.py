"""Faults beyond the everyday ones: a trainer frozen past its lock's stale time, an empty or damaged lock, a full
disk at start, a terminal or pipe that is gone, repeated stop signals, a checkpoint of another version, a seed
from the clock, output formats by extension, the image cache named by other paths, hidden files in the data.
Real processes, real signals, real files."""
import json
import os
import pty
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import REPO, write_image_folder
import make_gif
from models import Generator
import sample
from torch_utils.files import read_metrics
from training import data
from training.checkpoint import save_model

GAN = os.path.join(REPO, "train_gan.py")
BASELINE = os.path.join(REPO, "train_baseline.py")
COMMON = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--limit-test", "40"]
CLOCK_SEED = 1_800_000_000_000_000_000  # date +%s%N
# A lock that goes stale within seconds, so that a test can wait it out.
SHORT_LOCK = ("from training import outdir_lock; outdir_lock.OutDirLock.HEARTBEAT = 0.2; "
              "outdir_lock.OutDirLock.STALE_AFTER = 1.5")


def command(script, *args, patch=""):
    """The script as `python -c`, running patch first."""
    code = (f"import sys; sys.path.insert(0, {REPO!r}); sys.argv[0] = {script!r}\n{patch}\n"
            f"import runpy; runpy.run_path({script!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *map(str, args)]


def run(script, *args, patch="", timeout=300, **popen):
    return subprocess.run(command(script, *args, patch=patch), capture_output=True, text=True, timeout=timeout,
                          **popen)


def one_error_line(result, code=2):
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def lock_pid(path):
    try:
        return json.loads(path.read_text()).get("pid")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# The lock

def test_a_frozen_holder_whose_lock_was_taken_stops_before_its_next_write(data_dir, tmp_path):
    """A is frozen (SIGSTOP) past the stale time; B takes the folder over and trains. When A wakes (SIGCONT) it
    stops in one line without writing: the lock stays B's and every epoch is logged once."""
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out-dir", out, *COMMON, "--limit-train", 64, "--epochs", 100_000]
    a = subprocess.Popen(command(BASELINE, *args, patch=SHORT_LOCK), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    b = None
    try:
        wait_for(lambda: (out / "baseline.ckpt").exists(), a)
        a.send_signal(signal.SIGSTOP)
        b = subprocess.Popen(command(BASELINE, *args, "--resume", "--lock-wait", 60, patch=SHORT_LOCK),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: lock_pid(out / "baseline.lock") == b.pid, b)
        time.sleep(0.5)  # B trains a few epochs
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=60)
        assert a.returncode == 2, a_err
        lines = a_err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: another run took over {out}"), a_err
        assert f"pid {b.pid}" in lines[0] and "without writing anything more" in lines[0]
        time.sleep(1)  # A's heartbeat would have rewritten the lock by now (every 0.2 s)
        assert lock_pid(out / "baseline.lock") == b.pid and b.poll() is None
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=60) == 75, b.communicate()
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
    epochs = [r["epoch"] for r in read_metrics(out / "baseline_metrics.jsonl")[0] if r["type"] == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    assert not (out / "baseline.lock").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("content", [b"", b'{"host": "node1", "pi'])
def test_an_empty_or_damaged_lock_is_stale_once_unchanged_for_the_stale_time(data_dir, tmp_path, content):
    """What a crash or a full disk right after creating a lock left (in an earlier version): the next run waits
    the stale time, then takes the folder over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "baseline.lock").write_bytes(content)
    start = time.monotonic()
    result = run(BASELINE, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--limit-train", 64, "--epochs", 1,
                 "--lock-wait", 60, patch=SHORT_LOCK)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start > 1.5  # watched unchanged for the stale time first
    assert (out / "cifar10.model").exists() and not (out / "baseline.lock").exists()


def test_a_full_disk_at_start_is_one_line_and_leaves_no_lock(data_dir, tmp_path):
    """No file may grow past 0 bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as on a full disk)."""
    def no_room():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    out = tmp_path / "run"
    result = run(GAN, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs", 1, preexec_fn=no_room)
    line = one_error_line(result)
    assert line == f"error: cannot write {out / 'gan.lock'}: File too large; free space or choose another --out-dir"
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------------
# Exit codes: a terminal that is gone, repeated signals

def test_a_hang_up_with_the_terminal_gone_saves_and_exits_75(data_dir, tmp_path):
    """The trainer's terminal is a pty, its controlling terminal; closing the other end (sshd when the connection
    drops) hangs it up: the kernel sends SIGHUP, and every later write to the terminal fails with EIO."""
    out = tmp_path / "run"
    master, terminal = pty.openpty()

    def controlling_terminal():
        import fcntl
        import termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    trainer = subprocess.Popen(command(BASELINE, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs",
                                       100_000), stdin=terminal, stdout=terminal, stderr=terminal,
                               start_new_session=True, preexec_fn=controlling_terminal)
    os.close(terminal)
    shown = []

    def read_terminal():  # what the terminal shows, until it is closed
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        wait_for(lambda: b"train acc" in b"".join(shown) and (out / "baseline.ckpt").exists(), trainer)
        os.close(master)
        assert trainer.wait(timeout=60) == 75
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    ckpt = torch.load(out / "baseline.ckpt", weights_only=True)
    assert ckpt["epoch"] >= 1 and not (out / "baseline.lock").exists() and not list(out.rglob("*.tmp"))


def test_an_error_with_stdout_and_stderr_on_a_closed_pipe_still_exits_2(data_dir, tmp_path):
    """A bad flag, with both streams on a pipe whose reader has gone (EPIPE): the exit status is still the
    error's, not 1 or 120 from the failing writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(command(BASELINE, "--data-dir", data_dir, "--out-dir", tmp_path / "run", "--epochs", 0),
                            stdout=write_end, stderr=write_end, timeout=300)
    os.close(write_end)
    assert result.returncode == 2


@pytest.mark.parametrize("closed", [(1,), (2,), (1, 2)], ids=["stdout", "stderr", "both"])
def test_scripts_started_with_their_output_closed_do_their_work_and_exit_0(data_dir, generator_file, tmp_path,
                                                                           closed):
    """`>&-`, `2>&-`: Python starts with sys.stdout or sys.stderr None. What cannot be shown is dropped: the GAN
    trains its epoch, sample.py writes its grid, and both exit 0."""
    def close():
        for fd in closed:
            os.close(fd)

    out = tmp_path / "run"
    for result in (run(GAN, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--limit-train", 64, "--epochs", 1,
                       preexec_fn=close),
                   run(os.path.join(REPO, "sample.py"), "--model", generator_file, "--n", 2, "--device", "cpu",
                       "--output", tmp_path / "s.png", preexec_fn=close)):
        assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert torch.load(out / "gan.ckpt", weights_only=True)["epoch"] == 1 and (out / "generator.model").exists()
    assert (tmp_path / "s.png").exists() and not list(tmp_path.rglob("*.tmp")) and not (out / "gan.lock").exists()


def test_repeated_stop_signals_50_ms_apart_save_and_exit_75(data_dir, tmp_path):
    """srun and the batch shell both forward the scheduler's SIGTERM, and a hang-up may follow: signals every
    50 ms until the trainer ends, through saving, releasing the lock and the interpreter's exit."""
    out = tmp_path / "run"
    trainer = subprocess.Popen(command(BASELINE, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--epochs",
                                       100_000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "train acc" in trainer.stdout.readline()  # the table's header: training has begun
        signals = [signal.SIGTERM, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]
        sent = 0
        while trainer.poll() is None:
            trainer.send_signal(signals[sent % len(signals)])
            sent += 1
            time.sleep(0.05)
        stdout, stderr = trainer.communicate()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == 75 and sent >= 2, stderr
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    assert torch.load(out / "baseline.ckpt", weights_only=True)["job"] == "baseline"


# ---------------------------------------------------------------------------------------------------------
# Seeds from the clock; checkpoints of another version

@pytest.fixture(scope="module")
def clock_seed_runs(data_dir, tmp_path_factory):
    """{trainer: (its out dir, the result)} of one epoch of two batches with --seed 1.8e18."""
    runs = {}
    for script in (BASELINE, GAN):
        out = tmp_path_factory.mktemp("clock")
        runs[script] = out, run(script, "--data-dir", data_dir, "--out-dir", out, *COMMON, "--limit-train", 64,
                                "--epochs", 1, "--seed", CLOCK_SEED)
    return runs


@pytest.mark.parametrize("script", [BASELINE, GAN])
def test_a_seed_from_the_clock_trains(clock_seed_runs, script):
    out, result = clock_seed_runs[script]
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(next(out.glob("*.ckpt")), weights_only=True)
    assert (ckpt["epoch"], ckpt["config"]["seed"]) == (1, CLOCK_SEED)


def test_the_shuffle_of_a_seed_from_the_clock_is_a_function_of_seed_and_epoch():
    images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20)
    orders = [[b[2].tolist() for b in data.Loader(images, labels, 20, "cpu", train=True, seed=seed).batches(epoch)]
              for seed, epoch in [(CLOCK_SEED, 0), (CLOCK_SEED, 0), (CLOCK_SEED, 1), (2 ** 63 - 1, 0)]]
    assert orders[0] == orders[1] and orders[0] != orders[2] and orders[0] != orders[3]


@pytest.mark.parametrize("script, entry", [(GAN, "opt_g"), (BASELINE, "config.arch")])
def test_a_checkpoint_of_another_version_is_one_line_on_resume(clock_seed_runs, tmp_path, script, entry):
    """A real checkpoint with an entry the code expects deleted, as an earlier version would have written it. (The
    baseline's, of one epoch, is finished at --epochs 1, which it must keep: only its config is read.)"""
    out = tmp_path / "run"
    shutil.copytree(clock_seed_runs[script][0], out)
    path = next(out.glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    if entry.startswith("config."):
        del ckpt["config"][entry[7:]]
        what = f"it has no --{entry[7:]} setting"
    else:
        del ckpt[entry]
        what = f"it has no '{entry}' entry"
    torch.save(ckpt, path)
    before = path.read_bytes()
    result = run(script, "--data-dir", clock_seed_runs[script][0], "--out-dir", out, *COMMON, "--limit-train", 64,
                 "--epochs", 2 if script == GAN else 1, "--seed", CLOCK_SEED, "--resume")
    line = one_error_line(result)
    assert line == (f"error: {path} comes from another version of this repo ({what}): resume it with the version "
                    "that wrote it, or start afresh with another --out-dir")
    assert path.read_bytes() == before and not (out / f"{path.stem}.lock").exists()


# ---------------------------------------------------------------------------------------------------------
# Output formats by extension

@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "generator.model"
    torch.manual_seed(0)
    save_model(Generator(8), str(path))
    return path


def test_sample_writes_a_jpeg_for_a_jpg_name(generator_file, tmp_path):
    result = run(os.path.join(REPO, "sample.py"), "--model", generator_file, "--classes", "cat", "--n", 4,
                 "--device", "cpu", "--output", tmp_path / "cats.jpg")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cats.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    with Image.open(tmp_path / "cats.jpg") as image:
        assert image.format == "JPEG" and image.width > 64


@pytest.mark.parametrize("name, magic, format", [("s.png", b"\x89PNG", "PNG"), ("s.webp", b"RIFF", "WEBP"),
                                                 ("s.TIFF", b"II*\x00", "TIFF"), ("s.pdf", b"%PDF", None)])
def test_sample_writes_the_format_its_extension_names(generator_file, tmp_path, name, magic, format):
    sample.main(["--model", str(generator_file), "--n", "2", "--device", "cpu", "--output", str(tmp_path / name)])
    assert (tmp_path / name).read_bytes()[:len(magic)] == magic
    if format is not None:
        with Image.open(tmp_path / name) as image:
            assert image.format == format


def test_sample_refuses_an_unknown_extension_before_any_work(tmp_path):
    """The model does not exist: the extension is refused first."""
    result = run(os.path.join(REPO, "sample.py"), "--model", tmp_path / "none.model", "--output", tmp_path / "c.mp4")
    line = one_error_line(result)
    assert line.startswith(f"error: --output {tmp_path / 'c.mp4'}: the extension picks the image format; use one")
    assert ".jpg" in line and not list(tmp_path.iterdir())


def write_grids(folder, count):
    folder.mkdir(parents=True)
    for epoch in range(count):
        Image.new("RGB", (68, 40), ((epoch * 80) % 256, 100, 200)).save(folder / f"{epoch:03d}.png")


def test_make_gif_refuses_a_video_name_in_one_line_before_any_work(tmp_path):
    result = run(os.path.join(REPO, "make_gif.py"), "--input", tmp_path / "missing", "--output",
                 tmp_path / "progress.mp4")
    line = one_error_line(result)
    assert line.startswith(f"error: --output {tmp_path / 'progress.mp4'}: the extension picks the format")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, magic, format", [("p.gif", b"GIF89a", "GIF"), ("p.webp", b"RIFF", "WEBP"),
                                                 ("p.png", b"\x89PNG", "PNG"), ("p.apng", b"\x89PNG", "PNG")])
def test_make_gif_writes_the_animation_its_extension_names(tmp_path, name, magic, format):
    write_grids(tmp_path / "output", 3)
    if name == "p.webp":  # one real process too
        result = run(os.path.join(REPO, "make_gif.py"), "--input", tmp_path / "output", "--output", tmp_path / name)
        assert result.returncode == 0, result.stderr
    else:
        make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / name)])
    content = (tmp_path / name).read_bytes()
    assert content[:len(magic)] == magic and (format != "WEBP" or content[8:12] == b"WEBP")
    with Image.open(tmp_path / name) as animation:
        assert animation.format == format and animation.n_frames == 3


# ---------------------------------------------------------------------------------------------------------
# The image cache and hidden files

def test_the_image_cache_is_reused_through_a_symlink_and_a_relative_path(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root, train_per_class=2, test_per_class=1)
    images, labels = data.load_split(root, "train")
    cache = root / "train.uint8.pt"
    before = os.stat(cache)
    os.symlink(root, tmp_path / "link")
    (tmp_path / "x").mkdir()
    code = (f"import sys; sys.path.insert(0, {REPO!r}); from training import data\n"
            "def _decode(path):\n    raise AssertionError(path)\ndata._decode = _decode\n"
            "for typed in ('link', './link/', 'data', 'x/../data'):\n"
            "    print(len(data.load_split(typed, 'train')[1]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == [str(len(labels))] * 4, result.stderr
    after = os.stat(cache)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    written = write_image_folder(root, train_per_class=2, test_per_class=1)
    (root / "train" / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / ".ipynb_checkpoints").mkdir()
    code = (f"import sys; sys.path.insert(0, {REPO!r}); from training import data\n"
            f"images, labels = data.load_split({str(root)!r}, 'train'); print(len(labels), labels.tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(maxsplit=1)[0] == "20"
    assert json.loads(result.stdout.split(maxsplit=1)[1]) == written["train"][1]
    assert result.stderr.splitlines() == [
        f"note: skipped 3 hidden file(s) and folder(s) in {root / 'train'} (names starting with '.', such as "
        ".DS_Store, ._* or .ipynb_checkpoints, are never data)"]
