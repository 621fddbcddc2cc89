"""The trainers' Adam: fused on CUDA, capturable for CUDA graphs, restored from a checkpoint on any device."""
import torch


def adam(params, lr, betas, device, capturable=False, fused=None):
    """Adam; fused=None: on CUDA its fused kernel (one launch for all parameters, the same update); True or False
    as asked (bench.py counts the CPU's operations as CUDA runs them, and times the unfused path). capturable: its
    state on the GPU, so that a CUDA graph can replay its step (runtime.GraphedStep), and its learning rate a
    tensor there, which set_lr changes in place: one graph serves the whole schedule."""
    if capturable:
        lr = torch.tensor(lr, dtype=torch.float32, device=device)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=fused_adam(device) if fused is None else fused,
                            capturable=capturable)


def fused_adam(device):
    return True if device.type == "cuda" else None


def load_optimizer(optimizer, state, device):
    """Restore a saved optimizer; the fused kernel follows the device this run is on, not the saved state
    (a checkpoint written on the CPU resumes fused on a GPU, and the other way round), and so does the learning
    rate this run built it with (--lr may change on resume). The flags are set in the saved groups before
    loading: load_state_dict moves Adam's `step` to the parameter's device only for a fused group, and the fused
    kernel wants all its tensors on one device. capturable, too, follows this run, and the moments take their
    parameter's memory layout."""
    now = {"fused": fused_adam(device), "capturable": optimizer.defaults.get("capturable", False),
           "lr": optimizer.param_groups[0]["lr"]}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **now} for group in state["param_groups"]]})
    # The moments in their parameter's memory layout: CUDA's fused Adam refuses a channels_last weight (--speed
    # fast) with moments saved from a run without it, as a checkpoint of the CPU or of --speed plain has them
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # read by a captured graph: changed in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
