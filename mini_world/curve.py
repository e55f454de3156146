"""The miniature world's learning curve: what each hour of training bought, from the recipe's own
checkpoints.

    .venv/bin/python -m mini_world.curve --weights assets/mini --work assets/mini_work \
        --png assets/mini_curve.png                                # ~15 min on 2 cores

x: hours of training on the recipe's machine (progress.json and the checkpoints' clocks), the stages
laid end to end (t5, VAE, base, LoRA, LoRA-MoE). y, measured on fresh scenes:
  copy      the base's EMA snapshots asked for "the same scene": object pixels kept (probe.py)
  caption   the base's EMA snapshots drawing a described scene: object pixels in the caption's colours
  LoRA-MoE  the adapter's checkpoints: held-out edit success (all types but move), the checker's
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from flux_minimal.errors import run_cli
from flux_minimal.files import check_output
from flux_minimal.images import save_png
from flux_minimal.lora_files import load_lora
from infer.pipeline import ICEditPipeline
from mini_world import world
from mini_world.ablation import run_row, summarize
from mini_world.probe import caption_reading, copy_fidelity

COLORS = {"copy": (40, 110, 200), "caption": (230, 140, 20), "LoRA-MoE": (200, 30, 30), "LoRA": (120, 60, 160),
          "remove": (40, 110, 200), "add": (30, 160, 60), "color": (230, 140, 20), "background": (120, 90, 60),
          "README, 8 seeds": (20, 20, 20), "mean": (200, 30, 30)}


def base_points(pipe, work: Path, offset_h: float, n: int, steps: int) -> list[tuple[float, float, float]]:
    """(hours, copy kept, caption named) for each EMA snapshot of the base stage."""
    points, base = [], pipe.flux.state_dict()
    for f in sorted((work / "base" / "snapshots").glob("step_*.safetensors")):
        with safe_open(f, "pt") as sf:
            seconds = float(sf.metadata()["seconds"])
        pipe.flux.load_state_dict(load_file(f))
        kept, _ = copy_fidelity(pipe, n, steps)
        named, _ = caption_reading(pipe, n, steps)
        points.append((offset_h + seconds / 3600, kept, named))
        print(f"base {f.stem}: {seconds / 60:.0f} min, copy {100 * kept:.0f}%, caption {100 * named:.0f}%", flush=True)
    pipe.flux.load_state_dict(base)
    return points


def adapter_points(weights: Path, work: Path, offset_h: float, per_type: int, steps: int) -> list[tuple[float, float]]:
    """(hours, held-out success) for each checkpoint of the LoRA-MoE stage."""
    examples = world.make_split(per_type * len(world.EDIT_TYPES), 0, 64, split="heldout")
    points = []
    for ckpt in sorted((work / "moe").glob("step_*")):
        seconds = json.loads((ckpt / "state.json").read_text())["seconds"]
        pipe = ICEditPipeline.from_pretrained(weights)
        load_lora(pipe.flux, ckpt / "adapter.safetensors")
        _, scores, nfe = run_row(pipe, examples, steps=steps)
        success = summarize("", examples, scores, nfe)["success"]
        points.append((offset_h + seconds / 3600, success))
        print(f"LoRA-MoE {ckpt.name}: {seconds / 60:.0f} min, success {100 * success:.0f}%", flush=True)
    return points


def plot(series: dict[str, list[tuple[float, float]]], marks: dict[str, float], path: Path,
         xlabel: str = "hours of training, 2 CPU cores") -> None:
    """A line chart with PIL (no plotting dependency): y in percent, x in hours, stage boundaries dashed."""
    W, H, left, right, top, bottom = 720, 400, 56, 150, 20, 44
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x_max = max(x for pts in series.values() for x, _ in pts) * 1.05 or 1.0
    X = lambda x: left + (W - left - right) * x / x_max  # noqa: E731
    Y = lambda y: H - bottom - (H - top - bottom) * y  # noqa: E731
    for k in range(0, 101, 20):
        d.line([(left, Y(k / 100)), (W - right, Y(k / 100))], fill=(225, 225, 225))
        d.text((left - 30, Y(k / 100) - 6), f"{k}%", fill="black")
    step = next(s for s in (0.1, 0.25, 0.5, 1.0, 2.0) if x_max / s <= 12)
    for h in np.arange(0, x_max, step):
        d.text((X(h) - 8, H - bottom + 6), f"{h:g}", fill="black")
    d.text(((W - right) // 2 - 40, H - 18), xlabel, fill="black")
    for i, (name, x) in enumerate(marks.items()):
        for y in range(top, H - bottom, 8):
            d.line([(X(x), y), (X(x), y + 4)], fill=(150, 150, 150))
        d.text((X(x) + 3, top + 12 * (i % 2)), name, fill=(110, 110, 110))  # staggered: close marks stay legible
    for i, (name, pts) in enumerate(series.items()):
        xy = [(X(x), Y(y)) for x, y in pts if np.isfinite(y)]  # a probe with nothing to measure is left out
        if len(xy) > 1:
            d.line(xy, fill=COLORS[name], width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
        d.line([(W - right + 12, top + 20 + 18 * i), (W - right + 32, top + 20 + 18 * i)], fill=COLORS[name], width=3)
        d.text((W - right + 38, top + 14 + 18 * i), name, fill="black")
    d.line([(left, Y(0)), (W - right, Y(0))], fill="black")
    d.line([(left, Y(0)), (left, Y(1))], fill="black")
    save_png(img, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"))
    ap.add_argument("--work", type=Path, required=True, help="the recipe's WORK folder (checkpoints, progress.json)")
    ap.add_argument("--png", type=Path, default=Path("assets/mini_curve.png"))
    ap.add_argument("--n", type=int, default=24, help="scenes per probe")
    ap.add_argument("--per-type", type=int, default=10, help="held-out edits per type per adapter checkpoint")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    check_output(args.png)
    progress = json.loads((args.work / "progress.json").read_text())
    hours = {k: v["seconds"] / 3600 for k, v in progress.items()}
    start = {"base": hours.get("t5", 0) + hours.get("vae", 0)}
    start["lora"] = start["base"] + hours.get("base", 0)
    start["moe"] = start["lora"] + hours.get("lora", 0)
    base = base_points(ICEditPipeline.from_pretrained(args.weights), args.work, start["base"], args.n, args.steps)
    series = {"copy": [(x, c) for x, c, _ in base], "caption": [(x, n) for x, _, n in base],
              "LoRA-MoE": adapter_points(args.weights, args.work, start["moe"], args.per_type, args.steps)}
    plot(series, {"base": start["base"], "LoRA": start["lora"], "LoRA-MoE": start["moe"]}, args.png)
    print(f"curve: {args.png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
