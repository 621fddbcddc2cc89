"""One file format for everything a run saves: a dict of tensors, state_dicts and plain config, written
atomically (files.save_torch) and read with torch.load(weights_only=True).

- Model files (cifar10.model, discriminator.model, generator.model): {"kind", "config", "state_dict"}, the
  config being the net's constructor arguments (width, arch, ...). Both discriminator files load through
  load_model(path, "discriminator"), whatever their architecture.
- Training checkpoints (baseline.ckpt, gan.ckpt): {"job", "config", "epoch", "batch", ...} with the
  models' and optimizers' state_dicts; "epoch"/"batch" say how far training got.
"""
import os
import shlex

import torch

from models import Discriminator, Generator
from torch_utils.cli import UserError
from torch_utils.files import save_torch

MODEL_CLASSES = {"discriminator": Discriminator, "generator": Generator}


def _read(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: {what}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean "not one of our files"
        raise UserError(f"{path} is not a file this repo wrote ({type(e).__name__}); {what}")
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a file this repo wrote; {what}")
    return content


def model_record(model):
    """What a model file holds: the kind of net, its config and its weights."""
    kind = {cls: name for name, cls in MODEL_CLASSES.items()}[type(model)]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": kind, "config": dict(model.config), "state_dict": state}


def save_model(model, path):
    save_torch(model_record(model), path)


def load_model(path, kind, device="cpu"):
    """The model of `kind` ("discriminator" or "generator") stored at path, rebuilt from the file alone (its
    architecture is in its config), in eval mode."""
    expected = "a discriminator (cifar10.model or discriminator.model)" if kind == "discriminator" \
        else "a generator (generator.model)"
    record = _read(path, f"expected {expected} written by train_baseline.py or train_gan.py")
    if record.get("kind") != kind:
        found = f"a {record['kind']}" if "kind" in record else "no model"
        raise UserError(f"{path} holds {found}, expected {expected}")
    try:
        model = MODEL_CLASSES[kind](**record["config"])
        model.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UserError(f"{path}: its weights do not fit a {kind} of {describe(record.get('config'))}")
    return model.to(device).eval()


def describe(config):
    """A model config as the flags that make it: "width 196, arch hw"."""
    if not isinstance(config, dict):
        return "an unknown configuration"
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in config.items())


def restore_model(model, record, path):
    """Load a model record (as model_record makes it) into an existing model, checking kind and config."""
    if record.get("kind") != model_record(model)["kind"] or record.get("config") != model.config:
        raise UserError(f"{path} holds a {record.get('kind')} of {describe(record.get('config'))}, but this run "
                        f"builds one of {describe(model.config)}; pass the same flags or choose another --out-dir")
    try:
        model.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError):  # the same config, other layers: the net was changed since
        raise other_version(path, f"its {record.get('kind')} weights do not fit this version's net") from None


def other_version(path, what):
    return UserError(f"{path} comes from another version of this repo ({what}): resume it with the version that "
                     "wrote it, or start afresh with another --out-dir")


class Checkpoint(dict):
    """A training checkpoint as read from path: an entry it lacks (ckpt["opt_g"]) is a UserError saying that
    the file comes from another version of the repo, not a KeyError."""

    def __init__(self, content, path):
        super().__init__(content)
        self.path = path

    def __missing__(self, key):
        raise other_version(self.path, f"it has no {key!r} entry")


def load_checkpoint(path, job, config, resume):
    """The training checkpoint of `job` at path to resume from (a Checkpoint), or None when there is none.
    Refuses an existing checkpoint unless resume (a new run would overwrite it), one from another job or with
    a different model or data config, since resuming it would silently change the run, and one without a
    setting of config (written before that flag existed)."""
    if not os.path.exists(path):
        return None
    if not resume:
        raise UserError(f"{path} holds an earlier run; pass --resume to continue it or choose another --out-dir")
    ckpt = Checkpoint(_read(path, f"expected a {job} checkpoint; delete it or choose another --out-dir"), path)
    if ckpt.get("job") != job:
        raise UserError(f"{path} is a checkpoint of {ckpt.get('job')!r}, not of {job!r}; choose another --out-dir")
    saved_config = ckpt["config"]
    for key in config:
        if key not in saved_config:
            raise other_version(path, f"it has no --{key.replace('_', '-')} setting")
    # Every flag that differs, in one line: advice naming one of them would be refused again for the next
    differ = [("--" + key.replace("_", "-"), saved_config[key], value) for key, value in config.items()
              if saved_config[key] != value]
    if differ:
        trained = listing([as_flag(flag, saved) or "no " + flag for flag, saved, _ in differ])
        asked = listing([as_flag(flag, value) or "no " + flag for flag, _, value in differ])
        raise UserError(f"{path} was trained with {trained}, this run asks for {asked}; "
                        f"{as_advice([(flag, saved) for flag, saved, _ in differ])} to resume it, or choose another "
                        "--out-dir")
    return ckpt


def as_flag(flag, value):
    """The words that give a flag this value on a command line ("--betas 0.0 0.9", "--minibatch-discrimination"),
    shell-quoted, or "" for a value that comes from leaving the flag out (None, False)."""
    if value is None or value is False:
        return ""
    if value is True:
        return flag
    return shlex.join([flag, *map(str, value if isinstance(value, (list, tuple)) else [value])])


def as_advice(flags):
    """What to do for each (flag, value) to give them these values: "pass --seed 0 --width 8 and leave out
    --minibatch-discrimination"."""
    given = [words for flag, value in flags if (words := as_flag(flag, value))]
    left_out = [flag for flag, value in flags if not as_flag(flag, value)]
    return " and ".join([*(["pass " + " ".join(given)] if given else []),
                         *(["leave out " + " ".join(left_out)] if left_out else [])])


def listing(items):
    """The items as a sentence lists them: a; a and b; a, b and c."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
