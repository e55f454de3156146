"""Where the judged edits fail: held-out success per edit type, split by what the scene holds.

    .venv/bin/python -m mini_world.breakdown --lora assets/mini/lora_moe.safetensors --per-type 30

The long adapter stage's curve gives one number per edit type; choosing what to change next needs
to know which edits inside a type fail, and how. Each held-out judged edit (mini_world/judged.py,
the curve's and the ablation's scenes, the ablation's sampler seeds) is made once and scored by
mini_world/check.py, then counted by:
  objects   how many objects the source scene holds (1-3)
  shape     the shape edited, removed or added (background edits: "-")
  size      that object's size word (small, medium, large)
  style     the source background's style (plain, striped, checkered, gradient)
  location  an addition's location word ("-" when it names none, and for the other types)
and, per type, how the failures fail: the edit not made (`done` false), or made with the rest of the
scene changed (`done`, but the preservation error or another object's loss is past the bar).
"""

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from flux_minimal.errors import run_cli
from mini_world import world
from mini_world.ablation import run_row, summarize
from mini_world.check import EditScore
from mini_world.judged import JUDGED_TYPES, heldout_examples

FACTORS = ("objects", "shape", "size", "style", "location")


def factors(record: world.EditRecord) -> dict[str, str]:
    """The features a row of the breakdown counts one edit under."""
    i = record.new_obj if record.edit_type == "add" else record.obj
    obj = (record.target if record.edit_type == "add" else record.source).objects[i] if i is not None else None
    return {"objects": str(len(record.source.objects)), "shape": obj.shape if obj else "-",
            "size": obj.size if obj else "-", "style": record.source.background.style,
            "location": record.params.get("location") or "-"}


def breakdown(records: list[world.EditRecord], scores: list[EditScore]) -> str:
    """Markdown: per type, success and how failures fail; then one table per factor (passed/edits)."""
    lines = ["| type | success | edit not made | made, rest changed |", "| --- | ---: | ---: | ---: |"]
    for t in JUDGED_TYPES:
        s = [x for r, x in zip(records, scores) if r.edit_type == t]
        lines.append(f"| {t} | {sum(x.success for x in s)}/{len(s)} | {sum(not x.done for x in s)} | "
                     f"{sum(x.done and not x.success for x in s)} |")
    for factor in FACTORS:
        cells: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for r, x in zip(records, scores):
            cells[(r.edit_type, factors(r)[factor])].append(x.success)
        values = sorted({v for _, v in cells}, key=lambda v: (v == "-", v))
        lines += ["", f"| {factor} | " + " | ".join(values) + " |", "| --- |" + " ---: |" * len(values)]
        for t in JUDGED_TYPES:
            row = [f"{sum(cells[(t, v)])}/{len(cells[(t, v)])}" if cells[(t, v)] else "" for v in values]
            lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_world.breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"), help="the base, VAE and text encoders")
    ap.add_argument("--lora", type=Path, default=Path("assets/mini/lora_moe.safetensors"), help="the adapter judged")
    ap.add_argument("--per-type", type=int, default=30, help="held-out edits per judged type")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args(argv)
    from infer.pipeline import ICEditPipeline
    pipe = ICEditPipeline.from_pretrained(args.weights, lora=args.lora)
    examples = heldout_examples(args.per_type)
    _, scores, _ = run_row(pipe, examples, steps=args.steps)  # the ablation's sampler seeds
    per_type = summarize(str(args.lora), examples, scores, args.steps)["per_type"]
    print(f"{args.lora}: {args.per_type} held-out edits per judged type, success "
          f"{100 * np.mean(list(per_type.values())):.0f}% (mean over types)\n")
    print(breakdown([ex.record for ex in examples], scores))
    return 0


if __name__ == "__main__":
    run_cli(main)
