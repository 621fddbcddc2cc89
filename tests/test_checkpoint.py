"""training/checkpoint.py: model files and training checkpoints, what they hold, and what they refuse."""
import pytest
import torch

import models
from torch_utils.cli import UserError
from training import checkpoint


def test_model_file_holds_only_plain_values_and_rebuilds_the_net(tmp_path):
    path = tmp_path / "discriminator.model"
    disc = models.Discriminator(8)
    checkpoint.save_model(disc, str(path))
    record = torch.load(path, weights_only=True)
    assert record["kind"] == "discriminator" and record["config"] == disc.config
    loaded = checkpoint.load_model(str(path), "discriminator")
    assert not loaded.training
    for name, value in disc.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("config", [{"width": 4, "arch": "deep"}, {"width": 8, "minibatch_kernels": 6}])
def test_model_files_rebuild_every_architecture_from_the_file_alone(tmp_path, config):
    path = str(tmp_path / "d.model")
    checkpoint.save_model(models.Discriminator(**config), path)
    loaded = checkpoint.load_model(path, "discriminator")
    assert {k: loaded.config[k] for k in config} == config


def test_restoring_into_a_net_of_another_architecture_is_refused(tmp_path):
    record = checkpoint.model_record(models.Discriminator(8, arch="deep"))
    with pytest.raises(UserError, match="arch deep.*arch hw"):
        checkpoint.restore_model(models.Discriminator(8), record, "gan.ckpt")


def test_load_model_refuses_a_generator_file_as_discriminator(tmp_path):
    path = str(tmp_path / "generator.model")
    checkpoint.save_model(models.Generator(8), path)
    with pytest.raises(UserError, match="generator"):
        checkpoint.load_model(path, "discriminator")
    assert isinstance(checkpoint.load_model(path, "generator"), models.Generator)


def test_load_model_refuses_weights_that_do_not_fit_the_config(tmp_path):
    path = str(tmp_path / "cifar10.model")
    record = checkpoint.model_record(models.Discriminator(8))
    record["config"]["width"] = 16
    torch.save(record, path)
    with pytest.raises(UserError, match="width"):
        checkpoint.load_model(path, "discriminator")


@pytest.mark.parametrize("content", [b"", b"hello, not a model", bytes(range(256)) * 4])
def test_load_model_refuses_a_file_that_is_not_ours(tmp_path, content):
    path = tmp_path / "cifar10.model"
    path.write_bytes(content)
    with pytest.raises(UserError):
        checkpoint.load_model(str(path), "discriminator")


def test_load_model_of_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nothing.model"), "discriminator")


def test_save_model_to_a_place_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        checkpoint.save_model(models.Generator(4), str(tmp_path / "a_file" / "generator.model"))


def saved_checkpoint(tmp_path, **config):
    path = tmp_path / "gan.ckpt"
    torch.save({"job": "gan", "config": config, "epoch": 3, "batch": 0}, path)
    return str(path)


def test_load_checkpoint_is_none_without_a_file(tmp_path):
    assert checkpoint.load_checkpoint(str(tmp_path / "gan.ckpt"), "gan", {"width": 8}, resume=True) is None


def test_load_checkpoint_returns_a_matching_checkpoint(tmp_path):
    path = saved_checkpoint(tmp_path, width=8, lr=1e-4)
    assert checkpoint.load_checkpoint(path, "gan", {"width": 8, "lr": 1e-4}, resume=True)["epoch"] == 3


@pytest.mark.parametrize("config, resume, job, word", [
    ({"width": 8, "lr": 1e-4}, False, "gan", "--resume"),         # would overwrite an earlier run
    ({"width": 16, "lr": 1e-4}, True, "gan", "--width 8"),         # another net
    ({"width": 8, "lr": 1e-3}, True, "gan", "--lr 0.0001"),        # another optimization
    ({"width": 8, "lr": 1e-4}, True, "baseline", "'gan'"),         # another job
])
def test_load_checkpoint_refuses(tmp_path, config, resume, job, word):
    path = saved_checkpoint(tmp_path, width=8, lr=1e-4)
    with pytest.raises(UserError, match=word):
        checkpoint.load_checkpoint(path, job, config, resume)
