"""The mini model's long adapter stage: a curriculum, an edit-weighted objective, and a run that
continues over as many sittings as its learning curve keeps rising.

    .venv/bin/python -m mini_world.adapters --adapter moe --run assets/mini_train/moe --hours 2
    .venv/bin/python -m mini_world.adapters --adapter lora --run assets/mini_train/lora --steps 12000
    .venv/bin/python -m mini_world.adapters --run assets/mini_train/moe --export assets/mini/lora_moe.safetensors

The same command continues a stopped run exactly (adapter, EMA, AdamW state, step; every batch,
noise and timestep is a function of (seed, step), and the data pools of (seed, pool number)): the
run folder (a few MB: the adapter and its EMA, the optimizer, `curve.jsonl`) is all it needs, so
it is committed whenever work stops and continued on any machine. `--hours` stops after that much
training time in this sitting; `--steps` is where the run ends.

What differs from the recipe's first adapter stage (train/train.py: 3500 steps of ICEdit's exact
objective over all seven edit types and 1-4 objects, cosine schedule), each chosen from the probes
in docs/mini.md:
- Curriculum (CURRICULUM): one object and two edit types first, then 1-2 and 1-3 objects and the
  four judged types (removal, addition, colour, background). Scenes keep the world's backgrounds.
- Loss weights: the left half is given (the Fill mask shows it), so its tokens weigh LEFT_WEIGHT;
  the right half's tokens weigh 1, and those the edit changes weigh 1 + CHANGED_WEIGHT more. An
  object edit changes ~5% of the right half: unweighted, most of each gradient teaches copying.
- Timesteps: t = sigmoid(randn + T_SHIFT), more weight on the high noise where the edit is decided.
- AdamW, warmup then a constant learning rate (the cosine tail stopped moving the error), an EMA
  of the adapter (what is evaluated and exported).
- Every EVAL_EVERY steps the EMA edits held-out scenes (EVAL_PER_TYPE per judged type, scenes of
  1-3 objects, the held-out seed stream) and the README's first example on seeds 0..7, scored by
  mini_world/check.py; each point goes to RUN/curve.jsonl with the step, the wall hours and the
  CPU-hours of training (`--plot PNG` draws it against CPU-hours).
"""

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.files import check_output, save_safetensors, write_text
from flux_minimal.flux_loading import load_flux
from flux_minimal.lora import add_lora
from flux_minimal.lora_files import lora_state_dict
from flux_minimal.text import PromptEncoder
from flux_minimal.vae import load_vae
from mini_world import world
from mini_world.check import check_edit
from mini_world.judged import JUDGED_TYPES, draw, heldout_examples
from mini_world.loop import Loop, LoopConfig, log
from mini_world.quick import SIZE, encode, velocity_error


@dataclass(frozen=True)
class Phase:
    start: int  # first step of the phase
    max_objects: int  # scenes hold 1..max_objects objects (uniformly)
    types: tuple[str, ...]  # pair i of a pool is of types[i % len(types)]: a type named twice is twice as common
    tint: float = 0.0  # the share of pairs recoloured by tint()
    label: str = ""  # its mark on the curve's plot (default: the object count)


CURRICULUM = (
    Phase(0, 1, ("color", "remove")),
    Phase(1000, 2, JUDGED_TYPES),
    Phase(3000, 3, JUDGED_TYPES),
    # From 14000 (the curve level since 10500; additions 10-25%, backgrounds 50-60%): the weak types
    # twice as often, and a third of the pairs recoloured, for scenes drawn by other renderers.
    Phase(14000, 3, ("remove", "add", "color", "background", "add", "background"), tint=1 / 3,
          label="adds, backgrounds x2; tints"),
)
POOL_PAIRS = 4096  # pairs per data pool; a fresh pool every POOL_STEPS steps
POOL_STEPS = 1000  # phases start on a pool's first step
BATCH = 32
LR, WARMUP_STEPS, EMA = 1e-3, 200, 0.999
LEFT_WEIGHT, CHANGED_WEIGHT, T_SHIFT = 0.1, 4.0, 0.5
EVAL_EVERY, EVAL_PER_TYPE, README_SEEDS = 500, 8, 8
TINT_GAIN, TINT_OFFSET = 0.15, 20.0  # per channel: x gain in 1 +- 0.15, + offset in +-20 (of 255)


def phase_at(step: int) -> Phase:
    """The phase a pool starting at `step` draws from (steps count from 0 here)."""
    return [p for p in CURRICULUM if p.start <= step][-1]


def phase_of_step(step: int) -> Phase:
    """The phase whose data step `step` (1, 2, ...) trains on: its pool's."""
    return phase_at((step - 1) // POOL_STEPS * POOL_STEPS)


def tint(rng: np.random.Generator, ex: world.EditExample) -> world.EditExample:
    """The pair under one random colour map (per channel c: v * gain_c + offset_c), the same on both
    sides: what the edit changes is unchanged, but the tones to copy are no longer the world's 14
    (objects and backgrounds drawn by another renderer are near them, not on them)."""
    gain = rng.uniform(1 - TINT_GAIN, 1 + TINT_GAIN, 3).astype(np.float32)
    offset = rng.uniform(-TINT_OFFSET, TINT_OFFSET, 3).astype(np.float32)

    def recolour(img: Image.Image) -> Image.Image:
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * gain + offset, 0, 255).round().astype(np.uint8))
    return replace(ex, source=recolour(ex.source), target=recolour(ex.target))


def pool_examples(seed: int, k: int) -> list[world.EditExample]:
    """Pool k: the pairs of steps [k * POOL_STEPS, (k + 1) * POOL_STEPS), drawn in the phase of its
    first step from the training stream; a function of (seed, k) only."""
    phase = phase_at(k * POOL_STEPS)
    stream = world.SPLIT_STREAMS["train"]
    pairs = []
    for i in range(POOL_PAIRS):
        ex = draw(np.random.default_rng([stream, seed, 7919 + k, i]), phase.types[i % len(phase.types)],
                  phase.max_objects)
        if phase.tint:  # its own generator: the pairs themselves stay what they were without tints
            rng = np.random.default_rng([stream, seed, 7919 + k, i, 1])
            if rng.random() < phase.tint:
                ex = tint(rng, ex)
        pairs.append(ex)
    return pairs


def readme_example() -> world.EditExample:
    """The README's first command: examples/mini/scene_01.png, "turn the red circle blue"."""
    from mini_world.recipe import EXAMPLES
    source, instruction = EXAMPLES[0]
    circle = source.objects[0]
    target = world.Scene(source.background, (world.Obj(circle.shape, "blue", circle.size, circle.x, circle.y),)
                         + source.objects[1:])
    record = world.EditRecord("color", instruction, source, target, obj=0, new_obj=0, params={"color": "blue"})
    return world.EditExample(world.render(source, SIZE), world.render(target, SIZE), instruction, record)


def token_weights(data: dict, idx: torch.Tensor) -> torch.Tensor:
    """[B, L]: LEFT_WEIGHT on the given left half, 1 on the right, 1 + CHANGED_WEIGHT where the edit changes it."""
    L = data["x0"].shape[1]
    cols = 2 * SIZE // (2 * data["down"])  # tokens per row of the diptych
    right = (torch.arange(L) % cols >= cols // 2).float()  # [L]
    changed = data["changed"][idx].float() * right
    return LEFT_WEIGHT + (1 - LEFT_WEIGHT) * right + CHANGED_WEIGHT * changed


class Pools:
    """The encoded pool of the current step, kept until the step moves past it."""

    def __init__(self, vae, text, seed: int):
        self.vae, self.text, self.seed, self.k, self.data = vae, text, seed, None, None

    def at(self, step: int) -> dict:
        k = (step - 1) // POOL_STEPS
        if k != self.k:
            t0 = time.perf_counter()
            self.data, self.k = encode(self.vae, self.text, pool_examples(self.seed, k)), k
            p = phase_of_step(step)
            log(f"pool {k}: {POOL_PAIRS} pairs, 1-{p.max_objects} objects, {'/'.join(p.types)}"
                + (f", {100 * p.tint:.0f}% tinted" if p.tint else "")
                + f" ({time.perf_counter() - t0:.0f} s to draw and encode)")
        return self.data


@torch.no_grad()
def evaluate(pipe, examples: list[world.EditExample], readme: world.EditExample) -> dict:
    """Held-out success per type, and how many README seeds turn the red circle blue."""
    per_type: dict[str, list[bool]] = {}
    for i, ex in enumerate(examples):
        out = pipe.edit(ex.source, ex.instruction, width=SIZE, seed=1000 + 97 * i, progress=False)
        per_type.setdefault(ex.record.edit_type, []).append(check_edit(ex.record, ex.source, out).success)
    readme_ok = [check_edit(readme.record, readme.source,
                            pipe.edit(readme.source, readme.instruction, width=SIZE, seed=s, progress=False)).success
                 for s in range(README_SEEDS)]
    success = {t: float(np.mean(v)) for t, v in per_type.items()}
    return {"success": success, "mean": float(np.mean(list(success.values()))), "readme": int(sum(readme_ok))}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mini_world.adapters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run folder (created, or continued)")
    ap.add_argument("--adapter", choices=["moe", "lora"], default="moe", help="LoRA-MoE (4 experts) or plain LoRA")
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"), help="the base, VAE and text encoders")
    ap.add_argument("--steps", type=int, default=60000, help="where the run ends (a rerun continues to it)")
    ap.add_argument("--hours", type=float, default=None, help="stop after this much training in this sitting")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 leaves a core for other work)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the DiT (1.5x slower steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", type=Path, default=None, help="write the run's EMA adapter to this file and stop")
    ap.add_argument("--plot", type=Path, default=None, help="draw the run's learning curve into this PNG and stop")
    return ap.parse_args(argv)


def read_curve(run: Path) -> list[dict]:
    """The run's evaluations in step order (one per step: a repeated step keeps its last entry)."""
    points = {}
    if (run / "curve.jsonl").is_file():
        for line in (run / "curve.jsonl").read_text().splitlines():
            point = json.loads(line)
            points[point["step"]] = point
    return [points[s] for s in sorted(points)]


def cpu_hours(point: dict) -> float:
    """A curve point's CPU-hours of training (every thread; points from before the run kept CPU
    time count their wall hours, which one thread on a quiet machine matches)."""
    return point.get("cpu_hours", point["hours"])


def plot_curve(run: Path, png: Path) -> None:
    """Held-out success per judged type, their mean and the README example against CPU-hours of training."""
    from mini_world.curve import plot
    points = read_curve(run)
    if not points:
        raise FluxMinimalError(f"{run} has no curve.jsonl yet: its first evaluation comes at step {EVAL_EVERY}")
    series = {t: [(cpu_hours(p), p["success"][t]) for p in points] for t in JUDGED_TYPES}
    series["mean"] = [(cpu_hours(p), p["mean"]) for p in points]
    series[f"README, {README_SEEDS} seeds"] = [(cpu_hours(p), p["readme"] / README_SEEDS) for p in points]
    marks = {}
    for k, phase in enumerate(CURRICULUM[1:], 1):
        first = next((p for p in points if p["step"] > phase.start), None)
        if first is not None:
            marks[phase.label or f"1-{phase.max_objects} objects"] = cpu_hours(first)
    plot(series, marks, png, xlabel="CPU-hours of adapter training (the training steps, every thread)")
    print("| step | CPU-hours | objects | " + " | ".join(JUDGED_TYPES) + " | mean | README seeds |")
    print("| ---: | ---: | --- | " + " | ".join("---:" for _ in JUDGED_TYPES) + " | ---: | ---: |")
    for q in points:
        print(f"| {q['step']} | {cpu_hours(q):.2f} | 1-{phase_of_step(q['step']).max_objects} | "
              + " | ".join(f"{100 * q['success'][t]:.0f}%" for t in JUDGED_TYPES)
              + f" | {100 * q['mean']:.0f}% | {q['readme']}/{README_SEEDS} |")


class _Stop(Exception):
    """--hours is spent: leave the loop after its checkpoint."""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        check_output(args.plot, "--plot PNG")
        plot_curve(args.run, args.plot)
        print(f"wrote {args.plot}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"adapter": args.adapter, "seed": args.seed, "rank": 32, "experts": 4 if args.adapter == "moe" else 0}
    if (args.run / "run.json").is_file():
        saved = json.loads((args.run / "run.json").read_text())
        if saved != meta:
            raise FluxMinimalError(f"{args.run} is a run of {saved}, not {meta}: pass its own --adapter/--seed, "
                                   f"or a new --run folder")
    vae, text = load_vae(args.weights / "ae.safetensors"), PromptEncoder.from_pretrained(args.weights)
    flux = load_flux(args.weights).requires_grad_(False)
    add_lora(flux, rank=32, experts=meta["experts"], seed=args.seed)
    cfg = LoopConfig(steps=args.steps, lr=LR, warmup_steps=WARMUP_STEPS, clip=0.5, ema=EMA,
                     save_every_s=600, log_every=100, seed=args.seed, schedule="constant", trainable_only=True)
    loop = Loop(args.run, flux, cfg, compile=not args.no_compile)
    if args.export:
        if loop.step == 0:
            raise FluxMinimalError(f"{args.run} has no checkpoint to export")
        save_safetensors(lora_state_dict(loop.ema), args.export, {"step": str(loop.step)})
        print(f"wrote {args.export}: the EMA adapter at step {loop.step}")
        return 0
    args.run.mkdir(parents=True, exist_ok=True)
    write_text(args.run / "run.json", json.dumps(meta) + "\n")

    from infer.pipeline import ICEditPipeline
    pipe = ICEditPipeline(loop.ema, vae, text)
    heldout, readme = heldout_examples(EVAL_PER_TYPE), readme_example()
    pools = Pools(vae, text, args.seed)
    stop_at = loop.seconds + 3600 * args.hours if args.hours else float("inf")

    def loss_fn(model, g: torch.Generator, step: int) -> torch.Tensor:
        data = pools.at(step)
        idx = torch.randint(0, len(data["x0"]), (BATCH,), generator=g)
        eps = torch.randn(BATCH, *data["x0"].shape[1:], generator=g)
        t = torch.sigmoid(torch.randn(BATCH, generator=g) + T_SHIFT)
        w = token_weights(data, idx)
        return ((velocity_error(model, data, idx, eps, t) * w).sum(1) / w.sum(1)).mean()

    def after_step(step: int) -> None:
        if step % EVAL_EVERY == 0:
            loop.save()
            t0 = time.perf_counter()
            point = {"step": step, "hours": loop.seconds / 3600, "cpu_hours": loop.cpu_seconds / 3600, "phase": CURRICULUM.index(phase_of_step(step)),
                     "loss": float(np.mean(loop.losses[-EVAL_EVERY:])), **evaluate(pipe, heldout, readme)}
            with open(args.run / "curve.jsonl", "a") as f:
                f.write(json.dumps(point) + "\n")
            log(f"eval at step {step}: held-out {100 * point['mean']:.0f}% "
                f"({', '.join(f'{k} {100 * v:.0f}%' for k, v in point['success'].items())}), "
                f"README example {point['readme']}/{README_SEEDS} seeds ({time.perf_counter() - t0:.0f} s)")
        if loop.seconds >= stop_at:
            loop.save()
            raise _Stop

    if loop.step and loop.step % EVAL_EVERY == 0 and loop.step not in {p["step"] for p in read_curve(args.run)}:
        # stopped during the evaluation of its last checkpoint
        after_step(loop.step)
    try:
        loop.run(loss_fn, after_step)
    except _Stop:
        log(f"stopped after --hours {args.hours} at step {loop.step} ({loop.seconds / 3600:.2f} h trained in all)")
    return 0


if __name__ == "__main__":
    run_cli(main)
