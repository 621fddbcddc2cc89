"""Under torchrun (gloo, two processes on the CPU): rank 0's long phases outside the collectives' timeout, and the
logged means and the generator's batch norm over the global batch, as one process on it would have them."""
import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from models import Discriminator, Generator, class_noise
from test_distributed import free_port
from torch_utils.ops.global_batch_norm import GlobalBatchNorm
from torch_utils.runtime import Runtime
import train_gan
from training import baseline_step
from training import gan_steps
from training import running_means



def join(rank, world_size, port):
    """This process as rank of world_size under gloo (world_size 1: no process group)."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    return Runtime("cpu")


def slow_rank0(rank, port, out_dir):
    """Worker: rank 0 alone takes twice the collectives' timeout (shortened to 2 s), then all agree."""
    init = dist.init_process_group
    dist.init_process_group = lambda backend: init(backend, timeout=datetime.timedelta(seconds=2))
    rt = join(rank, 2, port)
    result = rt.rank0_first(lambda: time.sleep(4) or "measured", others_too=False)
    agreed = rt.agree(rank == 1)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump([result, agreed], f)


def test_rank0_alone_may_take_longer_than_the_collectives_timeout(tmp_path):
    """The lock wait, a first download, the evaluator's statistics: the others wait outside a collective."""
    mp.spawn(slow_rank0, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [["measured", [True]], [None, [True]]]


def train_both(rank, world_size, port, out_dir):
    """Worker (world_size 1: in this process)."""
    rt = join(rank, world_size, port)
    logged_means(rt, rank, world_size, out_dir)
    train_generator(rt, rank, world_size, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of what train_both wrote in one process, and in two on the same global batches."""
    out = tmp_path_factory.mktemp("torchrun")
    train_both(0, 1, None, str(out))
    mp.spawn(train_both, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


def global_batch(b, n=8):
    g = torch.Generator().manual_seed(b)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def logged_means(rt, rank, world_size, out_dir):
    """The baseline's and the GAN's Meter on this process's share of the same global batches."""
    share = slice(rank, None, world_size)
    torch.manual_seed(0)
    model = Discriminator(8)
    baseline_step.freeze_critic_head(model)
    net = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD((p for p in model.parameters() if p.requires_grad), lr=0.1)
    baseline_meter, gan_meter = running_means.Meter(rt.device), running_means.Meter(rt.device)
    for b in range(3):
        x, y = global_batch(b)
        loss, acc = baseline_step.train_step(net, optimizer, x[share], y[share])
        baseline_meter.add(len(y[share]), loss=loss, acc=acc)
        fake, fake_labels = global_batch(10 + b)
        alpha = torch.rand(8, generator=torch.Generator().manual_seed(20 + b))
        _, monitored = gan_steps.discriminator_loss(model, model, x[share], y[share], fake[share],
                                              fake_labels[share], alpha[share])
        gan_meter.add(g_loss=loss)
        gan_meter.add(**monitored)
        if b == 0:
            first_window = gan_meter.take_window()
    result = {"baseline": baseline_meter.means(), "gan": gan_meter.means(), "first_window": first_window,
              "window": gan_meter.take_window(), "state": baseline_meter.state()}
    with open(os.path.join(out_dir, f"means{world_size}_{rank}.json"), "w") as f:
        json.dump(result, f)


def test_logged_means_under_torchrun_are_those_of_one_process_on_the_global_batch(runs):
    one, rank0, rank1 = (json.loads((runs / name).read_text())
                         for name in ("means1_0.json", "means2_0.json", "means2_1.json"))
    assert rank0 == rank1
    assert rank0["state"]["total"]["loss"][1] == 24  # images of three global batches
    for part in ("baseline", "gan", "first_window", "window"):
        assert rank0[part].keys() == one[part].keys()
        for name, value in one[part].items():
            assert rank0[part][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (part, name)


def train_generator(rt, rank, world_size, out_dir):
    """Two generator updates on this process's share of a global batch, as train_gan distributes it."""
    share = slice(rank, None, world_size)
    torch.manual_seed(0)
    gen, disc = Generator(8), Discriminator(8)
    optimizer = torch.optim.SGD(gen.parameters(), lr=0.1)  # made before distribute(), as the trainer does
    gen_ddp, _ = train_gan.distribute(gen, disc, rt)
    if world_size > 1:
        assert isinstance(gen.bn0, GlobalBatchNorm) and gen_ddp.forward_sync_buffers is False
    labels = torch.arange(8) % 10
    for step in range(2):
        z = class_noise(labels, torch.Generator().manual_seed(step))
        with torch.no_grad():
            gen_ddp(z[share])  # the discriminator step's fake batch: statistics, no gradient
        loss, _ = gan_steps.generator_loss(disc, gen_ddp(z[share]), labels[share])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(gen.state_dict(), os.path.join(out_dir, f"gen{world_size}_{rank}.pt"))


def test_generator_batch_norm_under_torchrun_covers_the_global_batch(runs):
    """Batch statistics and running statistics of the global batch, gradients through them, on gloo."""
    one, rank0, rank1 = (torch.load(runs / name, weights_only=True)
                         for name in ("gen1_0.pt", "gen2_0.pt", "gen2_1.pt"))
    assert one.keys() == rank0.keys()
    for key, value in one.items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert one["bn0.num_batches_tracked"] == 4


def test_meter_sums_each_add_at_once_with_the_results_of_value_by_value():
    """One stacked sum per add (three operations whatever the number of values), the same float32 sums as
    adding each value on its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.detach.default:  # a view, no kernel
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    batches = [(n, {name: torch.randn((), generator=g) * 100 for name in ("gp", "real_ce", "real_acc")})
               for n in (1, 7, 3, 1)]
    meter, expected = running_means.Meter(torch.device("cpu")), {}
    for n, values in batches:
        with Count():
            meter.add(n, **values)
        for name, value in values.items():
            total, count = expected.get(name, (torch.zeros(()), 0))
            expected[name] = (value * n + total, count + n)
    assert Count.ops <= 4 * 4  # stack, (multiply,) and the two sums, per add
    assert meter.means() == {name: total.item() / count for name, (total, count) in expected.items()}
