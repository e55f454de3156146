"""A resumable training loop for the mini world: the recipe's stages (text encoder, VAE, base), the
long adapter stage (adapters.py) and the quick experiments (quick.py).

AdamW with a linear warmup and a cosine decay to zero (or a constant rate), an exponential moving average of the
weights (what ships), gradient clipping, and atomic checkpoints every few minutes:

    folder/step_0001200/model.safetensors      the weights ("model." and "ema." prefixes)
                        optimizer.safetensors  AdamW's state, by parameter name
                        state.json             step, seconds trained (wall and CPU), recent losses
    folder/latest                              the newest complete checkpoint
    folder/snapshots/step_0001200.safetensors  the EMA every `snapshot_every` steps (learning curves)

Exact resume: the learning rate is a function of the step, and every step draws its randomness from
a generator seeded with (seed, step), so a stage killed at any moment and started again gives the
same weights, bit for bit, as one that ran through (tests/test_shapes_recipe.py kills one).
"""

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from flux_minimal.files import save_safetensors
from train.checkpoint import find_checkpoint, load_checkpoint, optimizer_state, restore_optimizer, save_checkpoint
from train.train import warmup_cosine


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step: its batch, noise and timesteps depend on (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: float = 0.05  # fraction of the steps with a linear warmup
    warmup_steps: int = 0  # or this many steps (when > 0), whatever `steps` is: a run may be extended
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    clip: float = 1.0
    ema: float = 0.999  # the EMA's decay (ramped up from 0 over the first steps, as (1 + n) / (10 + n))
    save_every_s: float = 300.0  # a checkpoint this often (and at the end)
    snapshot_every: int = 0  # keep the EMA every this many steps, for learning curves (0: never)
    log_every: int = 100
    seed: int = 0
    schedule: str = "cosine"  # "cosine": warmup, then cosine to zero; "constant": warmup, then flat
    trainable_only: bool = False  # checkpoint only the trainable parameters (adapters on a frozen base)


class Loop:
    """Train `model` with `loss_fn(model, generator, step) -> loss` for cfg.steps steps in `folder`,
    continuing from the folder's latest checkpoint if there is one. `run()` returns the EMA."""

    def __init__(self, folder: Path, model: nn.Module, cfg: LoopConfig, compile: bool = False):
        self.folder, self.model, self.cfg = Path(folder), model, cfg
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step, self.seconds, self.losses = 0, 0.0, []
        self.cpu_seconds = 0.0  # the process's CPU time in the steps, every thread: CPU-hours beside other work
        # compiled once; the EMA and the checkpoints use the plain module
        self.forward = torch.compile(model) if compile else model
        if (self.folder / "latest").is_file():
            self._resume()

    def _resume(self) -> None:
        weights, opt, state = load_checkpoint(self.folder, name="model")
        for prefix, module in (("model.", self.model), ("ema.", self.ema)):
            part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if self.cfg.trainable_only and sorted(part) != sorted(self.trainable):
                raise ValueError(f"{self.folder}: the checkpoint holds {len(part)} {prefix[:-1]} tensors, the model trains "
                                 f"{len(self.trainable)} (another adapter kind or rank?): start a new folder")
            module.load_state_dict(part, strict=not self.cfg.trainable_only)
        restore_optimizer(self.model, self.opt, opt)
        self.step, self.seconds, self.losses = state["step"], state["seconds"], state["losses"]
        self.cpu_seconds = state.get("cpu_seconds", self.seconds)  # older checkpoints: their wall seconds
        log(f"{self.folder.name}: resumed at step {self.step}/{self.cfg.steps} ({self.seconds / 60:.1f} min trained)")

    def _weights(self, module: nn.Module) -> dict[str, Tensor]:
        state = module.state_dict()
        return {k: state[k] for k in self.trainable} if self.cfg.trainable_only else state

    def save(self) -> None:
        weights = {**{f"model.{k}": v for k, v in self._weights(self.model).items()},
                   **{f"ema.{k}": v for k, v in self._weights(self.ema).items()}}
        state = {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "losses": self.losses[-self.cfg.log_every:]}
        final = save_checkpoint(self.folder, self.step, weights, optimizer_state(self.model, self.opt), state,
                                name="model")
        for old in self.folder.glob("step_*"):  # only the newest is needed to resume
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        warmup = cfg.warmup_steps / cfg.steps if cfg.warmup_steps else cfg.warmup
        if cfg.schedule == "constant":
            return cfg.lr * min(1.0, step / max(1.0, warmup * cfg.steps))
        return warmup_cosine(cfg.lr, step, cfg.steps, warmup)

    def run(self, loss_fn: Callable[[nn.Module, torch.Generator, int], Tensor],
            after_step: Callable[[int], None] | None = None) -> nn.Module:
        """Train to cfg.steps. after_step(step), if given, runs after each step and its checkpoint, if
        one was due (e.g. an evaluation of the EMA; `save()` checkpoints on demand)."""
        cfg, t_save = self.cfg, time.perf_counter()
        self.model.train()
        while self.step < cfg.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            step = self.step + 1
            for group in self.opt.param_groups:
                group["lr"] = self.lr(step)
            loss = loss_fn(self.forward, step_generator(cfg.seed, step), step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            self.opt.step()
            self.step = step
            self._update_ema()
            self.losses.append(loss.item())
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            if step % cfg.log_every == 0 or step == cfg.steps:
                log(f"{self.folder.name} step {step}/{cfg.steps}: loss {np.mean(self.losses[-cfg.log_every:]):.4f} "
                    f"({self.seconds / 60:.1f} min, {1000 * self.seconds / step:.0f} ms/step)")
            if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                (self.folder / "snapshots").mkdir(parents=True, exist_ok=True)
                save_safetensors(self._weights(self.ema), self.folder / "snapshots" / f"step_{step:07d}.safetensors",
                                 {"seconds": f"{self.seconds:.1f}"})
            if step == cfg.steps or time.perf_counter() - t_save >= cfg.save_every_s:
                self.save()
                t_save = time.perf_counter()
            if after_step is not None:
                after_step(step)
        return self.ema


def trained_seconds(folder: Path) -> float:
    """Seconds a finished (or interrupted) loop in `folder` has trained, from its latest checkpoint."""
    import json
    return json.loads((find_checkpoint(folder) / "state.json").read_text())["seconds"]


def load_ema(folder: Path) -> dict[str, Tensor]:
    """The EMA weights of the latest checkpoint in `folder`."""
    weights = load_file(find_checkpoint(folder) / "model.safetensors")
    return {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
