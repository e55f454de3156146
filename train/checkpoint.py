"""Training checkpoints: atomic, resumable, and free of pickle.

    out/step_0001000/adapter.safetensors     the adapter, our format (flux_minimal.lora)
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
from safetensors.torch import load_file, save_file
from torch import Tensor

from flux_minimal.errors import FluxMinimalError


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors.save_file to a temporary name, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


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


def save_checkpoint(out: Path, step: int, adapter: dict[str, Tensor], optimizer: dict, state: dict) -> Path:
    """`optimizer`: its full state dict keyed by parameter name (see train.train.optimizer_state)."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step_{step:07d}"
    tmp = out / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(adapter, tmp / "adapter.safetensors")
    opt_tensors, opt_rest = _split_optimizer(optimizer)
    save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_rest}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = out / f".latest.{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, out / "latest")
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


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict, dict]:
    """(adapter tensors, optimizer state_dict, state) of a checkpoint."""
    path = find_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    optimizer = _join_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer"))
    return load_file(path / "adapter.safetensors"), optimizer, state
