"""Faults that only a GPU would show, checked on the CPU: resuming on another device, the penalty's gradient
outside autocast, the bf16 gate, the noise of evaluate.py and sample.py, and the feature cache's key (the
torchrun ones are in test_torchrun_sync.py)."""
import pytest
import torch

from metrics import measures
from models import MinibatchDiscrimination, class_noise
import sample
from torch_utils.cli import UserError
from torch_utils.runtime import setup_speed
from training import gan_steps
from training import optim

META = torch.device("meta")


def adam_state(fused):
    """A CPU Adam's state_dict after one step, and its parameters."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict(), params


def test_a_cpu_checkpoint_resumes_with_every_adam_tensor_on_the_gpu(monkeypatch):
    """The meta device stands in for the GPU (fused there): `step` must follow exp_avg onto it, or the fused
    kernel refuses tensors on two devices at the first step."""
    state, _ = adam_state(fused=None)
    monkeypatch.setattr(optim, "fused_adam", lambda device: True)
    params = [torch.nn.Parameter(torch.empty(3, 2, device=META)), torch.nn.Parameter(torch.empty(4, device=META))]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    optim.load_optimizer(optimizer, state, META)
    assert all(group["fused"] is True for group in optimizer.param_groups)
    for p in params:
        assert {name: t.device for name, t in optimizer.state[p].items()} == dict.fromkeys(
            ("step", "exp_avg", "exp_avg_sq"), META)


def test_a_fused_checkpoint_resumes_plain_on_the_cpu_and_steps():
    state, _ = adam_state(fused=True)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    optim.load_optimizer(optimizer, state, torch.device("cpu"))
    assert all(group["fused"] is None for group in optimizer.param_groups)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    assert all(optimizer.state[p]["step"].item() == 2 for p in params)


def penalty_and_gradient(dtype, bf16):
    """The gradient penalty of a minibatch-discrimination layer's summed output and the layer's gradient."""
    torch.manual_seed(0)
    layer = MinibatchDiscrimination(32).to(dtype)
    x = torch.randn(16, 32).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        gp, _ = gan_steps.gradient_penalty(layer(x).sum(1), x, 10.0)
    gp.backward()
    return gp.detach().double(), layer.T.grad.double()


def test_the_penalty_gradient_is_taken_outside_autocast():
    """The layer runs in fp32 under autocast; inside autocast its gradient's matmuls would be bf16 (relative error
    1e-3 against float64, 1e-6 in fp32)."""
    reference = penalty_and_gradient(torch.float64, False)
    for value, exact in zip(penalty_and_gradient(torch.float32, True), reference):
        assert (value - exact).norm() <= 2e-5 * exact.norm()


def pretend_gpu(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts


def test_bf16_is_refused_below_compute_capability_8(monkeypatch):
    pretend_gpu(monkeypatch, (7, 5), "Tesla T4")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(UserError, match=r"capability 8.0 or newer .*Tesla T4\) is 7.5: use --precision fp32"):
        setup_speed(torch.device("cuda", 0), "bf16")
    assert setup_speed(torch.device("cuda", 0), "fp32") is False
    pretend_gpu(monkeypatch, (8, 0), "A100")
    assert setup_speed(torch.device("cuda", 0), "bf16") is True
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        setup_speed(torch.device("cpu"), "bf16")


class Recorder(torch.nn.Module):
    """A stand-in generator that keeps its input (the noise) and returns zero images."""

    def __init__(self, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros((), device=device))
        self.inputs = []

    def forward(self, z):
        self.inputs.append(z)
        return torch.zeros(len(z), 3, 32, 32, device=z.device) * self.weight


def test_sample_noise_is_drawn_on_the_cpu_whatever_the_device():
    """sample.py on the CPU uses the CPU generator's noise; on another device (meta: a device generator there
    would fail) it gets the same noise, moved."""
    labels = torch.tensor([3, 5]).repeat(4)
    expected = class_noise(labels, torch.Generator().manual_seed(7))
    cpu, meta = Recorder("cpu"), Recorder(META)
    sample.sample(cpu, [3, 5], 4, 7)
    sample.sample(meta, [3, 5], 4, 7)
    assert torch.equal(cpu.inputs[0], expected)
    assert meta.inputs[0].device == META and meta.inputs[0].shape == expected.shape


def test_evaluator_noise_is_drawn_on_the_cpu_whatever_the_device():
    expected = class_noise(torch.arange(40) % 10, torch.Generator().manual_seed(3))
    assert torch.equal(measures.Evaluator(torch.device("cpu"), n=40, seed=3).noise, expected)
    assert measures.Evaluator(META, n=40, seed=3).noise.device == META


def test_feature_cache_key_follows_the_device_and_tf32():
    cuda = torch.device("cuda", 0)
    keys = {measures.feature_numerics(torch.device("cpu")), measures.feature_numerics(cuda)}
    # Set and put back through torch's setters: the flags are no plain attributes, which monkeypatch cannot undo.
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not conv
        keys.add(measures.feature_numerics(cuda))
        torch.backends.cuda.matmul.allow_tf32 = not matmul
        keys.add(measures.feature_numerics(cuda))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    assert len(keys) == 4


def test_inception_features_cached_under_other_numerics_are_not_reused(tmp_path, monkeypatch):
    from test_evaluate import POOLED, class_images  # its feature extractor, which needs no weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images = class_images(2, seed=1)[0]
    first = measures.InceptionMetrics(images, torch.device("cpu"), extractor=POOLED)
    assert measures.InceptionMetrics(images, torch.device("cpu"), extractor=POOLED).reference.bar is None  # cached
    monkeypatch.setattr(measures, "feature_numerics", lambda device: "cuda conv-tf32=True matmul-tf32=False")
    other = measures.InceptionMetrics(images, torch.device("cpu"), extractor=POOLED)
    assert other.reference.bar is not None  # computed again
    assert other.options["input2_cache_name"] != first.options["input2_cache_name"]



def test_a_plain_checkpoint_resumes_with_moments_laid_out_as_channels_last_weights(monkeypatch):
    """--speed fast keeps conv weights channels_last; CUDA's fused Adam refuses moments in another layout (seen on an
    H200 resuming a CPU checkpoint). The meta device stands in for the GPU."""
    from models import Discriminator
    torch.manual_seed(0)
    plain = Discriminator(8)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain(torch.randn(2, 3, 32, 32))[0].sum().backward()
    optimizer.step()
    monkeypatch.setattr(optim, "fused_adam", lambda device: True)
    fast = Discriminator(8).to(META, memory_format=torch.channels_last)
    resumed = torch.optim.Adam(fast.parameters(), lr=1e-3, capturable=True)
    optim.load_optimizer(resumed, optimizer.state_dict(), META)
    conv = fast.blocks[1].conv.weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    assert conv in resumed.state
    for p in resumed.state:
        for name in ("exp_avg", "exp_avg_sq"):
            moment = resumed.state[p][name]
            assert (moment.device, moment.stride()) == (p.device, p.stride()), name
    assert all(group["capturable"] is True for group in resumed.param_groups)


def test_a_capturable_adams_learning_rate_is_one_tensor_that_set_lr_changes_in_place():
    """A CUDA graph replays the lr tensor it captured: the baseline's schedule must change that tensor, not put a
    new number in its place (which the graph would never see), also after a resume from a plain checkpoint."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = optim.adam(params, 1e-4, (0.9, 0.999), torch.device("cpu"), capturable=True)
    plain_state, _ = adam_state(fused=None)
    optim.load_optimizer(optimizer, plain_state, torch.device("cpu"))
    captured = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(captured) and captured.item() == pytest.approx(1e-4)  # this run's lr, not the saved 1e-3
    optim.set_lr(optimizer, 1e-5)
    assert optimizer.param_groups[0]["lr"] is captured and captured.item() == pytest.approx(1e-5)
    plain = optim.adam(params, 1e-4, (0.9, 0.999), torch.device("cpu"))
    optim.set_lr(plain, 1e-5)
    assert plain.param_groups[0]["lr"] == 1e-5
