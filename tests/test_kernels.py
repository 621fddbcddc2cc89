"""The speed paths' kernels against PyTorch's own, on the CPU (small sizes; Triton's interpreter) and on a GPU
(the GAN's sizes; marker gpu): the convolution whose backward is ordinary convolutions (conv2d_gradfix.Conv2d with
gradfix), LayerNorm in Triton kernels (triton_layer_norm; also with the LeakyReLU after it fused in), LayerNorm on
channels_last activations, the whole discriminator loss with every switch on, and on a GPU a few GAN iterations
replayed from CUDA graphs against the same iterations run eagerly, and a replayed baseline step following the
learning rate set after its capture.

Tolerances: float64 to 1e-10; float32 on the CPU to 1e-5 of each tensor's largest value; on CUDA, TF32 is off in
these tests (the paths use different convolution algorithms and layouts, whose TF32 roundings differ), and a
LayerNorm's values agree to 1e-4 (forward) and 1e-3 (gradients, summed over 128 samples in another order). A whole
discriminator's gradients sum over hundreds of thousands of terms that largely cancel, so each path is compared
with float64 instead: in float64 to 1e-10, in fp32 no further from it than the default path is (see the test).
"""
import importlib.util
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import models
from models import Discriminator, Generator
from torch_utils.cli import UserError
from torch_utils.ops import conv2d_gradfix, layer_norm, set_kernels
from torch_utils.ops.layer_norm import LayerNorm
from torch_utils.runtime import Speed
from training import gan_steps

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def small_chunks(monkeypatch):
    """Rows cut into several chunks (one of them partial) and row groups of 3, as large rows are on a GPU."""
    from torch_utils.ops import triton_layer_norm
    monkeypatch.setattr(triton_layer_norm, "CHUNK", 16)
    monkeypatch.setattr(triton_layer_norm, "ROW_GROUP", 3)
    return triton_layer_norm


def assert_close(actual, expected, rtol, name=""):
    scale = expected.abs().max().item() or 1.0
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{name}: largest difference {error:.3g}, {error / scale:.3g} of the largest value"


# ---------------------------------------------------------------------------------------------------------
# The convolution whose backward is ordinary convolutions

@pytest.mark.parametrize("stride", [1, 2])
def test_conv_gradfix_passes_gradcheck_and_gradgradcheck(stride):
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    conv = lambda x, w, b: conv2d_gradfix._Conv2d.apply(x, w, b, stride, 1)
    assert gradcheck(conv, (x, w, b))
    assert gradgradcheck(conv, (x, w, b))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_gradfix_penalty_gradients_equal_autograds(stride):
    """A penalty on the input gradient, differentiated: the same numbers as autograd's own conv2d, and the
    first-order pass computes no weight gradient."""
    g = torch.Generator().manual_seed(10 + stride)
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=g)
    w0 = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=g)
    b0 = torch.randn(5, dtype=torch.float64, generator=g)
    results = []
    gradfix = conv2d_gradfix._Conv2d.apply
    for conv in (lambda x, w, b: F.conv2d(x, w, b, stride, 1), lambda x, w, b: gradfix(x, w, b, stride, 1)):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = torch.tanh(conv(x, w, b))
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert w.grad is None
        (gx.square().sum() + y.sum()).backward()
        results.append((gx.detach(), x.grad, w.grad, b.grad))
    for name, ours, theirs in zip(("gx", "x.grad", "w.grad", "b.grad"), results[1], results[0]):
        assert_close(ours, theirs, 1e-10, name)


def test_conv_gradfix_computes_no_weight_gradient_in_the_first_order_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(conv2d_gradfix._ConvWeightGrad, "forward", staticmethod(lambda *a: calls.append(1)))
    conv = conv2d_gradfix.Conv2d(3, 4, 3, padding=1)
    conv.gradfix = True
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------
# LayerNorm in Triton kernels, and on channels_last activations

def layer_norm_inputs(device, n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A large mean next to a small spread: the statistics' combination must not cancel
    x = (torch.randn(n, *shape, dtype=dtype, generator=g) * 0.5 + 3).to(device)
    w = torch.randn(shape, dtype=dtype, generator=g).to(device)
    b = torch.randn(shape, dtype=dtype, generator=g).to(device)
    return x, w, b


@pytest.mark.parametrize("row_kernels", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_layer_norm_forward_and_backward_equal_native(device, row_kernels, small_chunks):
    """Values, statistics and the three gradients, against native_layer_norm and its backward (each row's numbers
    from torch operations, and from the row kernels)."""
    n, shape = (5, [3, 5, 4]) if device == "cpu" else (128, [196, 32, 32])
    x, w, b = layer_norm_inputs(device, n, shape, torch.float32)
    if device == "cuda":
        small_chunks.CHUNK, small_chunks.ROW_GROUP = 4096, 16  # the sizes the GPU runs
    ours = small_chunks.forward(x, shape, w, b, 1e-5, row_kernels=row_kernels)
    theirs = torch.native_layer_norm(x, shape, w, b, 1e-5)
    for name, a, e in zip(("y", "mean", "rstd"), ours, theirs):
        assert a.shape == e.shape
        assert_close(a, e, 1e-5, name)
    g = torch.randn_like(x)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        ours_grads = small_chunks.backward(g, x, shape, theirs[1], theirs[2], w, b, mask, row_kernels=row_kernels)
        their_grads = torch.ops.aten.native_layer_norm_backward(g, x, shape, theirs[1], theirs[2], w, b, mask)
        for name, a, e, wanted in zip(("gx", "gw", "gb"), ours_grads, their_grads, mask):
            assert (a is None) == (not wanted), name
            if wanted:
                assert_close(a, e, 1e-4 if device == "cuda" else 1e-5, name)


@pytest.mark.parametrize("slope", [None, models.LEAKY_SLOPE])
def test_triton_layer_norm_passes_gradcheck_and_gradgradcheck(slope, small_chunks):
    """LayerNorm, and with a slope leaky_relu(LayerNorm) in the same kernels (with the row kernels)."""
    x, w, b = (t.requires_grad_() for t in layer_norm_inputs("cpu", 2, [2, 3, 3], torch.float64, seed=1))
    options = {} if slope is None else {"slope": slope, "row_kernels": True}
    norm = lambda x, w, b: layer_norm._LayerNorm.apply(x, w, b, [2, 3, 3], 1e-5, small_chunks, options)
    if slope is not None:
        normalized = F.layer_norm(x, [2, 3, 3], w, b, 1e-5)
        assert (normalized < 0).any() and (normalized > 0).any()  # both sides of the LeakyReLU's kink
        assert_close(norm(x, w, b), F.leaky_relu(normalized, slope), 1e-12, "y")
    assert gradcheck(norm, (x, w, b))
    assert gradgradcheck(norm, (x, w, b))


@pytest.mark.parametrize("row_kernels", [False, True])
@pytest.mark.parametrize("arriving", ["a", "a_w", "a_b", "a a_w a_b"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_triton_double_backward_equals_the_formulas_in_torch(arriving, with_weight, row_kernels, small_chunks):
    """The derivative of the backward (dg, dx, dw) for each set of arriving gradients, against _LayerNormGrad's
    torch formulas over the native kernels (the Triton kernels' row scalars from torch operations, and from the row
    kernel)."""
    shape = [3, 5, 4]
    x, w, b = layer_norm_inputs("cpu", 5, shape, torch.float64, seed=3)
    w, b = (w, b) if with_weight else (None, None)
    _, mean, rstd = torch.native_layer_norm(x, shape, w, b, 1e-5)
    g = torch.randn_like(x)
    draws = {"a": torch.randn_like(x), "a_w": None if w is None else torch.randn_like(w),
             "a_b": None if b is None else torch.randn_like(b)}
    a, a_w, a_b = (draws[name] if name in arriving.split() else None for name in ("a", "a_w", "a_b"))
    if a is None and a_w is None and a_b is None:
        pytest.skip("nothing arrives without a weight and bias")
    results = []
    for kernels, options in ((layer_norm.NativeKernels, {}), (small_chunks, {"row_kernels": row_kernels})):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in (g, x, w)]
        outs = layer_norm._LayerNormGrad.apply(inputs[0], inputs[1], inputs[2], b, mean, rstd, shape,
                                           [True, w is not None, b is not None], kernels, options)
        grads = [(o, t) for o, t in zip(outs, (a, a_w, a_b)) if o is not None and t is not None]
        wrt = [t for t in inputs if t is not None]
        results.append(torch.autograd.grad([o for o, _ in grads], wrt, [t for _, t in grads], allow_unused=True))
    for name, ours, theirs in zip(("dg", "dx", "dw"), results[1], results[0]):
        assert (ours is None) == (theirs is None) or (ours is not None and theirs is None and not ours.any()), name
        if theirs is not None:
            assert_close(ours, theirs, 1e-10, name)


def layer_norm_twins(device, shape):
    """An nn.LayerNorm with random weight and bias, and a layer_norm.LayerNorm with the same parameters."""
    reference = nn.LayerNorm(shape).to(device)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    ours = LayerNorm(shape).to(device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("kernels", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_on_channels_last_equals_nn_layer_norm(device, kernels, small_chunks):
    """layer_norm.LayerNorm on a channels_last activation: nn.LayerNorm's value, input gradient and double backward,
    its output channels_last too (the NHWC view normalized, no transposing copy)."""
    n, shape = (4, [3, 4, 4]) if device == "cpu" else (128, [196, 16, 16])
    x0, _, _ = layer_norm_inputs(device, n, shape, torch.float32)
    reference, ours = layer_norm_twins(device, shape)
    ours.kernels = kernels
    results = []
    for norm, layout in ((reference, torch.contiguous_format), (ours, torch.channels_last)):
        x = x0.clone(memory_format=layout).requires_grad_()
        y = norm(x)
        gx, = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        (gx.square().sum() + y.square().sum()).backward()
        results.append((y, gx, x.grad, norm.weight.grad, norm.bias.grad))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-3 if device == "cuda" else 1e-4
    for name, a, e in zip(("y", "gx", "x.grad", "weight.grad", "bias.grad"), results[1], results[0]):
        assert_close(a, e, tolerance, name)
    with torch.no_grad():
        assert_close(ours(x0.contiguous(memory_format=torch.channels_last)), reference(x0), tolerance, "no-grad")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_leaky_relu_equals_layer_norm_then_leaky_relu(device, small_chunks):
    """LayerNorm(x, slope=LEAKY_SLOPE) with the LeakyReLU in the Triton kernels, in both layouts: the value,
    the input gradient and the double backward (every gradient arriving) of nn.LayerNorm then F.leaky_relu, and
    the value without autograd."""
    n, shape = (4, [3, 4, 4]) if device == "cpu" else (128, [196, 16, 16])
    x0, _, _ = layer_norm_inputs(device, n, shape, torch.float32, seed=4)
    reference, fused = layer_norm_twins(device, shape)
    set_kernels(fused, layer_norm="triton", fuse_leaky_relu=True, row_kernels=True)
    tolerance = 1e-3 if device == "cuda" else 1e-4
    c = torch.randn_like(x0)
    for layout in (torch.contiguous_format, torch.channels_last):
        results = []
        for run in (lambda x: F.leaky_relu(reference(x)), lambda x: fused(x, slope=models.LEAKY_SLOPE)):
            x = x0.clone(memory_format=layout).requires_grad_()
            y = run(x)
            # g: as large where y < 0 as elsewhere (the activation's factor shows), and a function of y
            gx, = torch.autograd.grad((y * c + y.square()).sum(), x, create_graph=True)
            (gx.square().sum() + y.square().sum()).backward()
            results.append((y, gx, x.grad, *(p.grad for p in (reference, fused)[len(results)].parameters())))
        assert (results[0][0] < 0).any() and (results[0][0] > 0).any()
        for name, a, e in zip(("y", "gx", "x.grad", "weight.grad", "bias.grad"), results[1], results[0]):
            assert_close(a, e, tolerance, f"{layout}: {name}")
        reference.zero_grad(), fused.zero_grad()
        with torch.no_grad():
            x = x0.clone(memory_format=layout)
            fused_no_grad = fused(x, slope=models.LEAKY_SLOPE)
            assert_close(fused_no_grad, F.leaky_relu(reference(x)), tolerance, f"{layout}: no-grad")


@pytest.mark.parametrize("switch", ["fuse_leaky_relu", "row_kernels"])
def test_the_triton_switches_need_the_triton_kernels(switch):
    with pytest.raises(ValueError, match="need the Triton LayerNorm kernels"):
        set_kernels(Discriminator(8), layer_norm="native", **{switch: True})


# ---------------------------------------------------------------------------------------------------------
# The whole discriminator loss with every switch on

def fast_twin(disc, speed):
    twin = Discriminator(disc.width).to(next(disc.parameters()).device)
    twin.load_state_dict(disc.state_dict())
    speed.prepare(twin)
    return twin


SWITCHES = {"all": dict(channels_last=True, conv_gradfix=True, triton_layer_norm=True),
            "channels_last": dict(channels_last=True), "conv_gradfix": dict(conv_gradfix=True),
            "triton_layer_norm": dict(triton_layer_norm=True),
            "fused_leaky_relu": dict(triton_layer_norm=True, fused_leaky_relu=True),
            "row_kernels": dict(triton_layer_norm=True, row_kernels=True),
            "all_and_both": dict(channels_last=True, conv_gradfix=True, triton_layer_norm=True, fused_leaky_relu=True,
                                 row_kernels=True)}


def gradients_and_loss(model, dtype, device, n, tf32=False):
    """The discriminator loss of fixed images, its monitored values and every parameter's gradient, in float64."""
    g = torch.Generator().manual_seed(1)
    real, fake = (torch.rand(n, 3, 32, 32, generator=g).to(device, dtype) * 2 - 1 for _ in range(2))
    real_labels, fake_labels = (torch.randint(0, 10, (n,), generator=g).to(device) for _ in range(2))
    alpha = torch.rand(n, generator=g).to(device, dtype)
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        loss, monitored = gan_steps.discriminator_loss(model, model, real, real_labels, fake, fake_labels, alpha)
        loss.backward()
    finally:
        torch.backends.cudnn.allow_tf32 = False
    values = {"loss": loss.detach(), **monitored, **{name: p.grad for name, p in model.named_parameters()}}
    return {name: value.double() for name, value in values.items()}


def errors(results, exact):
    """Each value's largest difference from the exact one, over the exact one's largest magnitude."""
    return {name: (results[name] - value).abs().max().item() / (value.abs().max().item() or 1.0)
            for name, value in exact.items()}


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("device", DEVICES)
def test_discriminator_loss_and_gradients_with_the_switches_are_as_accurate_as_the_plain_ones(device, switches,
                                                                                           small_chunks):
    """The loss, its monitored values and every parameter's gradient with the switches on (all of them, and each
    alone), against the plain net's in float64. In float64 the switched net computes the same numbers (the same
    math). In fp32, with TF32 off, it lies no further from float64 than the default fp32 path does, which lets
    cuDNN round to TF32, nor than twice the plain path with TF32 off (the CPU has no TF32): the worst and the
    median over the values. At the GAN's width on a GPU some gradients are ill-conditioned (on an H200, plain
    fp32's error on a norm bias's gradient went from 0.025 of its largest value to 0.0023 with the input
    images changed by 1e-7 of themselves), so a single value's error depends on the summation order and only
    these aggregates compare."""
    width, n = (8, 4) if device == "cpu" else (196, 32)
    # Still several chunks to conv1's rows of 8,192 on the CPU, few enough programs for the interpreter
    small_chunks.CHUNK, small_chunks.ROW_GROUP = (2048, 3) if device == "cpu" else (4096, 16)
    torch.manual_seed(0)
    disc = Discriminator(width).to(device)
    exact = gradients_and_loss(fast_twin(disc, Speed()).double(), torch.float64, device, n)
    same_math = errors(gradients_and_loss(fast_twin(disc, Speed(**SWITCHES[switches])).double(), torch.float64,
                                          device, n), exact)
    assert max(same_math.values()) < 1e-10, max(same_math.items(), key=lambda item: item[1])
    plain = errors(gradients_and_loss(disc, torch.float32, device, n), exact)
    default = errors(gradients_and_loss(fast_twin(disc, Speed()), torch.float32, device, n, tf32=True), exact)
    ours = errors(gradients_and_loss(fast_twin(disc, Speed(**SWITCHES[switches])), torch.float32, device, n), exact)
    for aggregate in (max, statistics.median):
        bound = max(2 * aggregate(plain.values()), aggregate(default.values())) + 1e-5
        assert aggregate(ours.values()) <= bound, (
            f"{aggregate.__name__} error {aggregate(ours.values()):.2g}, above {bound:.2g}; worst: "
            + ", ".join(f"{name} {error:.2g}" for name, error in sorted(ours.items(), key=lambda item: -item[1])[:5]))


def test_speed_auto_is_fast_on_one_gpu_and_plain_on_the_cpu_and_under_torchrun(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    fast = Speed(channels_last=True, conv_gradfix=True, triton_layer_norm=True, cuda_graphs=True)
    assert Speed.choose("fast", cuda) == Speed.choose("auto", cuda) == fast
    assert Speed.choose("auto", cpu) == Speed.choose("plain", cuda) == Speed.choose("auto", cuda, world_size=2) == Speed()
    # Under torchrun DDP's hooks run between the kernels: no graphs, and without them no Triton kernels
    assert Speed.choose("fast", cuda, world_size=2) == Speed(channels_last=True, conv_gradfix=True)
    with pytest.raises(UserError, match="--speed fast needs a CUDA GPU"):
        Speed.choose("fast", cpu)
    # Without Triton the graphs still pay (bench.py's fast-native-ln path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert Speed.choose("auto", cuda) == Speed(channels_last=True, conv_gradfix=True, cuda_graphs=True)


def test_gradfix_under_bf16_autocast_computes_what_autocast_conv2d_does():
    """bf16 autocast casts conv2d's input, weight and bias; the gradfix convolution sees the cast tensors too, so the
    loss and the weights' (fp32) gradients are those of the plain module under autocast."""
    torch.manual_seed(0)
    plain = Discriminator(8)
    fast = fast_twin(plain, Speed(conv_gradfix=True))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    results = []
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            score, logits = model(x)
        (score.float().sum() + logits.float().square().sum()).backward()
        results.append(logits.float())
    assert_close(results[1], results[0], 1e-6, "logits")
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert q.grad.dtype == torch.float32
            assert_close(q.grad, p.grad, 1e-2, name)  # bf16 products summed in another order


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs: the same kernels captured and replayed (GPU only)

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("gp_every, unmeasured", [(1, False), (2, False), (1, True)])
def test_graphed_gan_iterations_equal_the_eager_ones(gp_every, unmeasured, monkeypatch):
    """8 iterations (3 eager, the capture, 4 replays) of both updates at width 64 with the fast kernels (unmeasured:
    also the fused LeakyReLU and the row kernels), captured and not, from the same weights and the same draws: every
    monitored value and every weight and buffer after them agree. (Against the plain kernels Adam's first steps, which move each weight by about lr whatever the size of
    its gradient, turn rounding differences in near-zero gradients into visible ones: the kernels are compared on
    one step above.) cuDNN's deterministic algorithms: others sum with atomics, in another order each run, and
    Adam's first steps would turn that into visible differences too (seen on an H200: 4e-5 in fake_score)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    device = torch.device("cuda")
    runs = []
    for graphs in (False, True):
        speed = Speed(channels_last=True, conv_gradfix=True, triton_layer_norm=True, cuda_graphs=graphs,
                      fused_leaky_relu=unmeasured, row_kernels=unmeasured)
        torch.manual_seed(0)
        gen, disc = Generator(64).to(device), Discriminator(64).to(device)
        speed.prepare(gen, disc)
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.0, 0.9), fused=True, capturable=graphs)
                        for m in (gen, disc))
        nets = gan_steps.Nets(gen, disc, gen, disc, opt_g, opt_d)
        generator, discriminator = gan_steps.training_steps(nets, gan_steps.Recipe(), graphs)
        images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device) * 2 - 1
        labels = torch.arange(32, device=device) % 10
        monitored = []
        for b in range(8):
            rng = torch.Generator(device).manual_seed(b)
            values = {**generator(32, rng, None),
                      **discriminator(images, labels, rng, gan_steps.penalty_factor(b, gp_every))}
            monitored.append({k: v.item() for k, v in values.items()})
        runs.append((monitored, [t.detach().clone() for t in (*gen.parameters(), *disc.parameters(), *gen.buffers())]))
    (eager, eager_tensors), (graphed, graphed_tensors) = runs
    assert [sorted(m) for m in eager] == [sorted(m) for m in graphed]
    assert ("gp" in eager[1]) == (gp_every == 1)
    for b, (e, g) in enumerate(zip(eager, graphed)):
        for name in e:
            assert g[name] == pytest.approx(e[name], rel=1e-5, abs=1e-6), f"iteration {b}: {name}"
    for i, (e, g) in enumerate(zip(eager_tensors, graphed_tensors)):
        if e.is_floating_point():
            assert_close(g, e, 1e-5, f"tensor {i}")
        else:
            assert torch.equal(g, e)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_replayed_baseline_step_follows_the_learning_rate_set_after_its_capture():
    """The baseline keeps one CUDA graph for its whole schedule: a replay must use the lr that set_lr put in the
    optimizer since the capture (a float lr would be baked into the graph)."""
    from training import baseline_step
    from training import optim
    from torch_utils.runtime import GraphedStep
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Discriminator(16).to(device)
    baseline_step.freeze_critic_head(model)
    optimizer = optim.adam([p for p in model.parameters() if p.requires_grad], 1e-3, (0.9, 0.999), device,
                              capturable=True)
    step = GraphedStep(lambda x, labels: baseline_step.train_step(model, optimizer, x, labels))
    x, labels = torch.rand(8, 3, 32, 32, device=device) * 2 - 1, torch.arange(8, device=device)
    for _ in range(GraphedStep.EAGER_CALLS + 1):  # the eager calls, then the capture (a step too)
        step(x=x, labels=labels)
    assert step.graph is not None

    def change_by_one_replay(lr):
        optim.set_lr(optimizer, lr)
        before = [p.detach().clone() for p in model.parameters()]
        step(x=x, labels=labels)
        torch.cuda.synchronize()
        return max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))

    assert change_by_one_replay(0.0) == 0.0
    assert change_by_one_replay(1e-3) > 0.0
