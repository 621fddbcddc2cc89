"""Training across nodes as jobs/gan_multinode.slurm starts it: on each node, what srun runs there (jobs/lib.sh's
job_node_agent, passing the walltime warning on) around the torchrun agent that job_torchrun_agent gives, the
agents meeting at a c10d rendezvous on the first node. Here the two "nodes" are two agents on 127.0.0.1
with one CPU worker each (gloo)."""
import os
import signal
import subprocess
import time

import torch

from conftest import REPO
from test_distributed import free_port


def agent_command(nodes, nproc, endpoint, rdzv_id):
    """job_torchrun_agent's words, from lib.sh itself."""
    script = f". jobs/lib.sh && job_torchrun_agent {nodes} {nproc} {endpoint} {rdzv_id}"
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def gan_args(data, out, batch_size):
    return [os.path.join(REPO, "train_gan.py"), "--data-dir", str(data), "--out-dir", str(out), "--width", "8",
            "--batch-size", str(batch_size), "--device", "cpu", "--limit-test", "20", "--epochs", "1", "--resume"]


NODE_TASK = ["bash", "-c", '. jobs/lib.sh && job_node_agent "$@"', "node-agent"]  # as the job's srun line


def start_agents(count, command, args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return [subprocess.Popen(NODE_TASK + command + args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(count)]


def finish(agents):
    return [(agent.communicate(timeout=300)[0], agent.returncode) for agent in agents]


def weights(out):
    return {f"{name}.{key}": value
            for name in ("generator", "discriminator")
            for key, value in torch.load(out / f"{name}.model", weights_only=True)["state_dict"].items()}


def test_two_nodes_train_the_same_weights_as_one_node_with_both_processes(tiny_image_folder, tmp_path):
    assert agent_command(2, 1, "head:29400", "7")[:5] == ["torchrun", "--nnodes=2", "--nproc_per_node=1",
                                                          "--rdzv_backend=c10d", "--rdzv_endpoint=head:29400"]
    two = tmp_path / "two-nodes"
    results = finish(start_agents(2, agent_command(2, 1, f"127.0.0.1:{free_port()}", "two"),
                                  gan_args(tiny_image_folder, two, 32)))
    assert [code for _, code in results] == [0, 0], "\n".join(out[-2000:] for out, _ in results)
    assert sum(out.count("saved ") for out, _ in results) == 1, "rank 0 alone writes"

    one = tmp_path / "one-node"
    (out, code), = finish(start_agents(1, agent_command(1, 2, f"127.0.0.1:{free_port()}", "one"),
                                       gan_args(tiny_image_folder, one, 32)))
    assert code == 0, out[-2000:]
    reference, trained = weights(one), weights(two)
    assert reference.keys() == trained.keys()
    for key, value in reference.items():
        assert torch.equal(value, trained[key]), f"{key} differs between two nodes and one"


def test_the_walltime_warning_reaching_one_node_stops_both_and_saves(tiny_image_folder, tmp_path):
    """The walltime warning as srun forwards it (SIGUSR1), here to one node only: its task hands the agent
    SIGTERM, the workers agree to stop after the same batch and rank 0 saves once, on its way to exit 75; the
    agents then exit non-zero, as torchrun does after its workers stopped (jobs/lib.sh counts that as stopped
    after a walltime warning)."""
    out = tmp_path / "run"
    # Batch 4 of 260 images: 65 batches, so the signal lands inside the epoch.
    agents = start_agents(2, agent_command(2, 1, f"127.0.0.1:{free_port()}", "stop"),
                          gan_args(tiny_image_folder, out, 4))
    deadline = time.monotonic() + 120
    while not (out / "gan.lock").exists():  # rank 0 holds the folder: the workers are up
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "the workers did not start"
        time.sleep(0.1)
    time.sleep(2)
    agents[1].send_signal(signal.SIGUSR1)
    results = finish(agents)
    logs = "\n".join(text for text, _ in results)
    assert all(code != 0 for _, code in results), logs[-3000:]
    assert logs.count("stopped by ") == 1 and "--resume" in logs, logs[-3000:]
    assert "received SIGUSR1" in logs and "Received 15 death signal" in logs, logs[-3000:]
    ckpt = torch.load(out / "gan.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["batch"] < 65
    assert not (out / "gan.lock").exists()
