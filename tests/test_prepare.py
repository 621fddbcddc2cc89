"""prepare.py against mirrors served by a real HTTP server on 127.0.0.1: a small CIFAR-10 archive in torchvision's
layout and an InceptionV3 weights file that loads into torch-fidelity's network. It fetches and verifies both,
puts them where training/data.py and evaluate.py look, refuses damaged downloads in one line each without keeping any of
them, and sends no request the second time; the prepared data then loads with the network switched off."""
import functools
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from unittest import mock

import numpy as np
import pytest
import torch
from torch_fidelity import feature_extractor_inceptionv3 as inception
from torchvision.datasets import CIFAR10

from conftest import REPO
from metrics import inception as weights
import prepare
from training import data

PER_BATCH = 4  # images in each fake batch file


def cifar_archive():
    """(tar.gz bytes of a tiny cifar-10-batches-py, {file: images uint8 (N, 3, 32, 32)}, {file: labels})."""
    rng = np.random.default_rng(0)
    buffer, images, labels = io.BytesIO(), {}, {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [name for name in prepare.CIFAR_MD5 if name != "batches.meta"]
        entries = {"batches.meta": {"label_names": list(data.CLASSES)}}
        for i, name in enumerate(names):
            images[name] = rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8)
            labels[name] = [(i + k) % 10 for k in range(PER_BATCH)]
            entries[name] = {"data": images[name].reshape(PER_BATCH, -1), "labels": labels[name]}
        for name, entry in entries.items():
            content = pickle.dumps(entry)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue(), images, labels


def inception_weights_bytes():
    """A state_dict with every key and shape of torch-fidelity's InceptionV3 (each tensor one zero, expanded), so
    that it loads into the network as the real weights do, in 170 KB instead of 90 MB."""
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3(weights.INCEPTION, ["2048"])
    buffer = io.BytesIO()
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in net.state_dict().items()}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A served folder with good and damaged copies of both files, and the list of paths requested."""
    root = tmp_path_factory.mktemp("mirror")
    archive, images, labels = cifar_archive()
    weights = inception_weights_bytes()
    files = {"cifar.tar.gz": archive, "cifar-cut.tar.gz": archive[:len(archive) // 2],
             "weights.pth": weights, "weights-cut.pth": weights[:-100], "foreign.pth": archive}
    for name, content in files.items():
        (root / name).write_bytes(content)
    requests, release = [], threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            requests.append(self.path)

        def do_GET(self):
            if self.path != "/stall.tar.gz":
                return super().do_GET()
            # The archive's first 64 KB, then nothing until released: a download under way
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            try:
                self.wfile.write(archive[:65536])
                self.wfile.flush()
            except OSError:
                return
            release.wait(60)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield dict(url=f"http://127.0.0.1:{server.server_address[1]}", root=root, requests=requests, images=images,
               labels=labels, md5=hashlib.md5(archive).hexdigest(), sha256=hashlib.sha256(weights).hexdigest())
    release.set()
    server.shutdown()


def run_prepare_args(tmp_path, mirror, cifar="cifar.tar.gz", weights="weights.pth"):
    return ["--data-dir", tmp_path / "data", "--cifar-url", f"{mirror['url']}/{cifar}", "--cifar-md5", mirror["md5"],
            "--inception-url", f"{mirror['url']}/{weights}", "--inception-sha256", mirror["sha256"]]


def run_prepare(tmp_path, mirror, cifar="cifar.tar.gz", weights="weights.pth"):
    """prepare.py in a subprocess, torch's hub folder under tmp_path; (completed process, stdout lines)."""
    args = run_prepare_args(tmp_path, mirror, cifar, weights)
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=120)
    return result, result.stdout.splitlines()


def weights_path(tmp_path):
    return tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(inception.URL_INCEPTION_V3)


def test_fetches_verifies_and_second_run_sends_no_request(tmp_path, mirror, monkeypatch, capsys):
    mirror["requests"].clear()
    result, lines = run_prepare(tmp_path, mirror)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/cifar.tar.gz" in mirror["requests"] and "/weights.pth" in mirror["requests"]
    assert not [line for line in lines if line.startswith("missing")]
    assert lines[-1] == f"ready, with these flags: --data-dir {tmp_path / 'data'} for every script " \
                        f"(DATA_DIR={tmp_path / 'data'} for jobs/)"
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py"]  # no temporary folder left
    assert weights_path(tmp_path).read_bytes() == (mirror["root"] / "weights.pth").read_bytes()

    mirror["requests"].clear()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    prepare.main([str(a) for a in run_prepare_args(tmp_path, mirror)])  # in this process: a second start costs 5 s
    assert mirror["requests"] == []
    again_lines = capsys.readouterr().out.splitlines()
    assert [line[:8].strip() for line in again_lines[:-1]] == ["ok"] * 4 and "CIFAR-10 in" in again_lines[2]

    # What the scripts do on a compute node: read both without the network, from where they look by default.
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    images, labels = data.load_split(tmp_path / "data", "train")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    assert torch.equal(images, torch.from_numpy(np.concatenate([mirror["images"][n] for n in names])))
    assert labels.tolist() == sum((mirror["labels"][n] for n in names), [])
    assert data.load_split(tmp_path / "data", "test")[1].tolist() == mirror["labels"]["test_batch"]
    assert weights.find_weights() == (str(weights_path(tmp_path)), False, None)


def test_damaged_downloads_are_refused_in_one_line_each_and_not_kept(tmp_path, mirror):
    result, lines = run_prepare(tmp_path, mirror, cifar="cifar-cut.tar.gz", weights="weights-cut.pth")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    missing = [line for line in lines if line.startswith("missing")]
    assert len(missing) == 2, lines
    assert "CIFAR-10: the download from" in missing[0] and f"expected {mirror['md5']}" in missing[0]
    assert "nothing was kept" in missing[0]
    assert f"expected {mirror['sha256']}" in missing[1] and "nothing was kept" in missing[1]
    assert lines[-1] == "not ready: 2 thing(s) missing (above); then pass " \
                        f"--data-dir {tmp_path / 'data'} for every script (DATA_DIR={tmp_path / 'data'} for jobs/)"
    assert os.listdir(tmp_path / "data") == []
    assert os.listdir(weights_path(tmp_path).parent) == []


def test_a_file_that_is_not_the_weights_is_refused_without_a_checksum(tmp_path, mirror):
    """Without --inception-sha256 (torch-fidelity publishes none) the weights are checked by loading them."""
    path = tmp_path / "foreign.pth"
    path.write_bytes((mirror["root"] / "foreign.pth").read_bytes())
    assert "does not load into torch-fidelity's network" in prepare.weights_problem(path, None, weights)[0]
    assert prepare.weights_problem(mirror["root"] / "weights.pth", None, weights) == (None, False)


def test_no_download_only_checks_and_names_what_is_missing(tmp_path, mirror, capsys):
    mirror["requests"].clear()
    with pytest.raises(SystemExit) as exit:
        prepare.main(["--data-dir", str(tmp_path / "data"), "--inception-weights", str(tmp_path / "w.pth"),
                      "--cifar-url", f"{mirror['url']}/cifar.tar.gz", "--no-download"])
    assert exit.value.code == 1 and mirror["requests"] == []
    missing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("missing")]
    assert missing == [f"missing  CIFAR-10: no {tmp_path / 'data' / 'cifar-10-batches-py'}; run python prepare.py "
                       "where there is internet",
                       f"missing  InceptionV3 weights: no {tmp_path / 'w.pth'}; run python prepare.py where there is "
                       "internet"]
    assert not (tmp_path / "data").exists()


def test_environment_lines_follow_requirements_and_the_build(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("-c lock.txt\ntorch==0.1  # too old\nnumpy>=1.0\nno-such-package-xyz>=1\n")
    lines = prepare.check_packages(str(requirements))
    assert lines[0] == (True, f"packages as requirements.txt asks: numpy {np.__version__}")
    assert lines[1] == (False, f"torch {prepare.metadata.version('torch')} "
                               "is installed, requirements.txt asks for ==0.1; pip install -r requirements.txt")
    assert lines[2] == (False, "no-such-package-xyz is not installed; pip install -r requirements.txt")
    gpus = prepare.check_gpus()
    if torch.version.cuda is not None:
        assert " ".join(torch.cuda.get_arch_list()) in gpus[0][1]
    if not torch.cuda.is_available():
        assert len(gpus) == 1


def test_local_files_serve_as_mirrors(tmp_path, mirror, capsys):
    """A plain path or a file:// URL (a copy on a shared disk) replaces a download; nothing reaches the server."""
    mirror["requests"].clear()
    weights = tmp_path / "w.pth"
    prepare.main(["--data-dir", str(tmp_path / "data"), "--cifar-url", str(mirror["root"] / "cifar.tar.gz"),
                  "--cifar-md5", mirror["md5"], "--inception-url", (mirror["root"] / "weights.pth").as_uri(),
                  "--inception-weights", str(weights)])
    out = capsys.readouterr().out
    assert mirror["requests"] == [] and weights.read_bytes() == (mirror["root"] / "weights.pth").read_bytes()
    assert len(data.load_split(tmp_path / "data", "test")[1]) == PER_BATCH
    assert out.splitlines()[-1].startswith("ready, with these flags: ") and f"--inception-weights {weights}" in out


def test_a_damaged_copy_is_fetched_again(tmp_path, mirror, capsys):
    args = ["--data-dir", str(tmp_path / "data"), "--cifar-url", f"{mirror['url']}/cifar.tar.gz", "--cifar-md5",
            mirror["md5"], "--inception-url", f"{mirror['url']}/weights.pth", "--inception-weights",
            str(tmp_path / "w.pth")]
    prepare.main(args)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good[:100])  # cut short, as by a full disk while unpacking by hand
    # torchvision's checksums tell the real CIFAR-10's files from these (and from a damaged real one).
    assert prepare.cifar_problem(tmp_path / "data", official=True).endswith("does not match torchvision's checksum")
    mirror["requests"].clear()
    prepare.main(args)
    assert set(mirror["requests"]) == {"/cifar.tar.gz"}  # the good weights are not fetched again
    assert batch.read_bytes() == good and sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py"]
    assert "CIFAR-10 downloaded from" in capsys.readouterr().out


def start_stalled_download(tmp_path, mirror):
    """prepare.py as a real process whose CIFAR-10 download has begun (part of the archive on disk) and stalls;
    (the process, the partial archive)."""
    args = run_prepare_args(tmp_path, mirror, cifar="stall.tar.gz")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), *map(str, args)],
                            env=dict(os.environ, TORCH_HOME=str(tmp_path / "torch")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [path for path in (tmp_path / "data").glob(".prepare-*/*") if path.stat().st_size > 0]
        if partial:
            return proc, partial[0]
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the download did not start: {proc.communicate()}")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_hang_up_or_sigterm_mid_download_keeps_nothing_of_it(tmp_path, mirror, signum):
    """A dropped ssh session sends SIGHUP: the partial archive goes as it does on SIGTERM, exit 128 + signal."""
    proc, partial = start_stalled_download(tmp_path, mirror)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.splitlines()[-1] == f"stopped by {signal.Signals(signum).name}" and "Traceback" not in err
    assert os.listdir(tmp_path / "data") == []


def test_what_a_kill_left_the_next_run_removes(tmp_path, mirror, capsys, monkeypatch):
    """kill -9 mid-download leaves the partial archive in its temporary folder; the next run removes it, and a
    weights download of a process gone too, but not what a run on another host may still be writing."""
    proc, partial = start_stalled_download(tmp_path, mirror)
    proc.kill()
    proc.communicate(timeout=60)
    assert partial.exists()
    weights = tmp_path / "w.pth"
    dead, elsewhere = tmp_path / f"w.pth.{proc.pid}@{socket.gethostname()}.download", tmp_path / "w.pth.1@far.download"
    dead.write_bytes(b"cut short")
    elsewhere.write_bytes(b"still coming")
    args = run_prepare_args(tmp_path, mirror)[:-4] + ["--inception-url", f"{mirror['url']}/weights.pth",
                                                      "--inception-weights", weights]
    prepare.main([str(a) for a in args])
    assert "ready" in capsys.readouterr().out.splitlines()[-1]
    assert os.listdir(tmp_path / "data") == ["cifar-10-batches-py"]
    assert not dead.exists() and elsewhere.read_bytes() == b"still coming" and weights.exists()


@pytest.mark.parametrize("capability, supported", [((9, 0), True), ((6, 0), False)])
def test_a_visible_gpu_is_checked_against_the_build(monkeypatch, capability, supported):
    """No GPU here: torch.cuda says there is one (an H100, a P100) of a CUDA build for sm_75 to sm_120."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_120"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "GPU-X")
    build, gpu = prepare.check_gpus()
    assert build == (True, f"torch {torch.__version__} for CUDA 13.0, kernels for sm_75 sm_80 sm_90 sm_120")
    assert gpu[0] is supported
    if supported:
        assert gpu[1] == "GPU cuda:0: GPU-X, compute capability 9.0, supported"
    else:
        assert gpu[1].startswith("GPU cuda:0 (GPU-X, compute capability 6.0) is not supported by this PyTorch")


def test_a_damaged_batch_the_trainers_meet_is_fetched_again_once_deleted_as_they_say(tmp_path, mirror, monkeypatch):
    """The trainers' own download (torchvision's, pointed at the mirror with its checksums) after following
    their error's advice: delete the folder, run again."""
    prepare.main([str(a) for a in run_prepare_args(tmp_path, mirror)] + ["--inception-weights", str(tmp_path / "w")])
    batches = tmp_path / "data" / "cifar-10-batches-py"
    md5 = {name: hashlib.md5((batches / name).read_bytes()).hexdigest() for name in prepare.CIFAR_MD5}
    monkeypatch.setattr(CIFAR10, "url", f"{mirror['url']}/cifar.tar.gz")
    monkeypatch.setattr(CIFAR10, "tgz_md5", mirror["md5"])
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5[name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5[name]] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]})
    good = data.load_split(tmp_path / "data", "train")
    (batches / "data_batch_2").write_bytes((batches / "data_batch_2").read_bytes()[:100])
    with pytest.raises(prepare.UserError) as error:
        data.load_split(tmp_path / "data", "train")
    advice = re.fullmatch(r".*; delete (\S+) to fetch it again", str(error.value))
    assert advice, error.value
    shutil.rmtree(advice.group(1))
    mirror["requests"].clear()
    again = data.load_split(tmp_path / "data", "train")
    assert "/cifar.tar.gz" in mirror["requests"]
    assert torch.equal(again[0], good[0]) and torch.equal(again[1], good[1])
