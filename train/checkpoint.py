"""Training checkpoints: atomic, resumable, and free of pickle.

    out/step_0001000/adapter.safetensors     the adapter, our format (flux_minimal.lora_files), or the weights of
                                             whatever is trained (`name`: model.safetensors for the mini stages)
                     optimizer.safetensors   every tensor of the optimizer state
                     state.json              step, samples seen, the optimizer's scalars, the args
    out/latest                               the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from flux_minimal.errors import FluxMinimalError
from flux_minimal.files import save_safetensors, write_text


def _split_optimizer(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's full form)
    -> its tensors (safetensors keys `<param>|<entry>`) and everything else (JSON)."""
    tensors, scalars = {}, {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            (tensors if isinstance(v, Tensor) else scalars)[f"{name}|{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in [*tensors.items(), *rest["scalars"].items()]:
        name, k = key.rsplit("|", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name: the same with or without FSDP, and
    independent of the order the parameters were given in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The inverse of `optimizer_state` (after any sharding of `model`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    for group, old in zip(optimizer.param_groups, saved["param_groups"]):
        for k, v in old.items():  # entries some optimizers add only in their first step (Prodigy's d_*)
            group.setdefault(k, v)
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(out: Path, step: int, weights: dict[str, Tensor], optimizer: dict, state: dict,
                    name: str = "adapter") -> Path:
    """out/step_N/{name}.safetensors, optimizer.safetensors and state.json, made in a temporary folder
    and renamed into place; `optimizer` is its full state keyed by parameter name (`optimizer_state`)."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step_{step:07d}"
    tmp = out / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(weights, tmp / f"{name}.safetensors")
    opt_tensors, opt_rest = _split_optimizer(optimizer)
    save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_rest}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(out / "latest", final.name)
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "state.json").is_file():
        raise FluxMinimalError(f"{path} is not a training checkpoint (no state.json; pass a run folder with "
                               f"a `latest` file or a step_* folder)")
    return path


def load_checkpoint(path: Path, name: str = "adapter") -> tuple[dict[str, Tensor], dict, dict]:
    """(weights, optimizer state_dict, state) of a checkpoint."""
    path = find_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    optimizer = _join_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer"))
    return load_file(path / f"{name}.safetensors"), optimizer, state
