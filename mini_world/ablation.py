"""The paper's ablations in miniature (tables 3a and 3b) on held-out edits of the shapes world.

    .venv/bin/python -m mini_world.ablation --weights assets/mini --per-type 20 --grid assets/mini_results.png

Every held-out edit is done by each method and measured by the world's programmatic checker
(mini_world/check.py): edit success (done as asked AND everything else preserved) and the
preservation error. Rows:
  target through the VAE  the ground-truth target encoded and decoded: every method's output leaves
                          through the VAE's decoder, so this row bounds them all (a perfect DiT)
  base, no IC prompt      the base Fill model prompted with the bare instruction
  base + IC prompt        training-free ICEdit: the diptych and the in-context prompt
  LoRA, LoRA-MoE          the fine-tuned adapters
  LoRA-MoE + early filter M candidates, m preview steps, the checker as an oracle judge
  LoRA-MoE, best of M     every candidate run to completion, the oracle picks (the costly baseline)
Success is pooled over all edit types but "move" (the paper's known-hard type), reported apart.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from flux_minimal.errors import run_cli
from flux_minimal.files import check_output, write_text
from flux_minimal.icedit import IC_PROMPT
from flux_minimal.images import save_png, to_pil, to_tensor
from infer.judge import ScoreJudge
from infer.pipeline import ICEditPipeline
from mini_world import world
from mini_world.check import check_edit, oracle_score_fn

SEED_OFFSET = 1000  # sampler seeds, apart from the data seeds


def run_row(pipe, examples, *, steps, template=IC_PROMPT, candidates=1, early=0, preview="short", best_of=1):
    """Edit every example; returns (outputs, scores, NFE per edit)."""
    outs, scores, nfe = [], [], 0
    for i, ex in enumerate(examples):
        seed = SEED_OFFSET + 97 * i
        if best_of > 1:  # every candidate to completion; the oracle keeps the best
            cands = [pipe.edit(ex.source, ex.instruction, width=scene_width(ex), steps=steps, seed=seed + k,
                               template=template, progress=False) for k in range(best_of)]
            s = [check_edit(ex.record, ex.source, c) for c in cands]
            k = int(np.argmax([x.score for x in s]))
            out, n = cands[k], best_of * steps
        elif candidates > 1:
            out = pipe.edit(ex.source, ex.instruction, width=scene_width(ex), steps=steps, seed=seed,
                            template=template, candidates=candidates, early_steps=early, preview=preview,
                            judge=ScoreJudge(oracle_score_fn(ex.record)), progress=False)
            n = pipe.last_report["nfe"]
        else:
            out = pipe.edit(ex.source, ex.instruction, width=scene_width(ex), steps=steps, seed=seed,
                            template=template, progress=False)
            n = steps
        outs.append(out)
        scores.append(check_edit(ex.record, ex.source, out))
        nfe += n
    return outs, scores, nfe / len(examples)


@torch.no_grad()
def vae_ceiling(vae, examples):
    """The targets after a VAE round trip, scored: what a DiT that predicts the exact target latent gives."""
    outs = [to_pil(vae.decode(vae.encode(to_tensor(ex.target)))) for ex in examples]
    return outs, [check_edit(ex.record, ex.source, out) for ex, out in zip(examples, outs)], 0.0


def scene_width(ex) -> int:
    return ex.source.width


def summarize(name, examples, scores, nfe) -> dict:
    types = [ex.record.edit_type for ex in examples]
    main = [s for s, t in zip(scores, types) if t != "move"]
    move = [s for s, t in zip(scores, types) if t == "move"]
    per_type = {t: np.mean([s.success for s, u in zip(scores, types) if u == t]) for t in world.EDIT_TYPES if t in types}
    return {"row": name, "success": np.mean([s.success for s in main]), "move": np.mean([s.success for s in move]) if move else None,
            "done": np.mean([s.done for s in main]), "preserve_mae": np.mean([s.preserve_mae for s in scores]),
            "nfe": nfe, "per_type": per_type}


def table(rows: list[dict]) -> str:
    types = list(rows[0]["per_type"])
    pooled = "edit success (all but move)" if "move" in types else f"edit success ({', '.join(types)})"
    head = f"| method | {pooled} | " + ("move | " if "move" in types else "") + "edit done | preservation MAE | NFE | " \
        + " | ".join(types) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        move = f" {100 * r['move']:.0f}% |" if r["move"] is not None else ""
        lines.append(f"| {r['row']} | **{100 * r['success']:.0f}%** |{move} {100 * r['done']:.0f}% | "
                     f"{r['preserve_mae']:.3f} | {r['nfe']:.0f} | "
                     + " | ".join(f"{100 * r['per_type'][t]:.0f}%" for t in types) + " |")
    return "\n".join(lines)


def grid(examples, columns: list[tuple[str, list[Image.Image]]], path: Path) -> None:
    """One example per edit type: source | each method | target, with the instruction."""
    types = [t for t in world.EDIT_TYPES if any(ex.record.edit_type == t for ex in examples)]
    picks = [next(i for i, ex in enumerate(examples) if ex.record.edit_type == t) for t in types]
    cols = [("source", [ex.source for ex in examples]), *columns, ("target", [ex.target for ex in examples])]
    S, pad, top = examples[0].source.width * 2, 4, 18
    W = len(cols) * (S + pad) + pad
    H = top + len(picks) * (S + pad + 12) + pad
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for c, (name, _) in enumerate(cols):
        d.text((pad + c * (S + pad), 4), name, fill=(0, 0, 0))
    for r, i in enumerate(picks):
        y = top + r * (S + pad + 12)
        d.text((pad, y), examples[i].instruction[:60], fill=(0, 0, 0))
        for c, (_, ims) in enumerate(cols):
            img.paste(ims[i].resize((S, S), Image.Resampling.NEAREST), (pad + c * (S + pad), y + 12))
    save_png(img, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"))
    ap.add_argument("--per-type", type=int, default=15, help="held-out edits per edit type")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaling", default="4x4,4x8,8x4", help="early-filter settings MxM_early")
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--grid", type=Path, help="write a picture grid of one example per edit type")
    ap.add_argument("--md", type=Path, help="also write the table as markdown")
    ap.add_argument("--world", choices=["full", "judged"], default="full",
                    help="full: every edit type, 1-4 objects; judged: removal, addition, colour and background "
                         "on 1-3 objects, what the long adapter stage is judged on")
    args = ap.parse_args(argv)

    for path in (args.md, args.grid):
        if path is not None:
            check_output(path)
    if args.world == "judged":  # the long adapter stage's judged edits: 4 types, 1-3 objects (mini_world/adapters.py)
        from mini_world.judged import heldout_examples
        examples = heldout_examples(args.per_type, args.seed)
    else:
        examples = world.make_split(args.per_type * len(world.EDIT_TYPES), args.seed, 64, split="heldout")
    w = args.weights
    pipes = {"base": ICEditPipeline.from_pretrained(w), "lora": ICEditPipeline.from_pretrained(w, lora=w / "lora.safetensors"),
             "moe": ICEditPipeline.from_pretrained(w, lora=w / "lora_moe.safetensors")}
    rows, cols, t0 = [], [], time.perf_counter()
    plan = [("target through the VAE (ceiling)", None, {}),
            ("base, no IC prompt", "base", dict(template="{instruction}")), ("base + IC prompt", "base", {}),
            ("LoRA", "lora", {}), ("LoRA-MoE", "moe", {})]
    for spec in args.scaling.split(","):
        M, m = map(int, spec.split("x"))
        plan.append((f"LoRA-MoE + early filter M={M}, m={m}", "moe", dict(candidates=M, early=m)))
    plan.append((f"LoRA-MoE, best of {args.best_of} full runs", "moe", dict(best_of=args.best_of)))
    for name, which, kw in plan:
        if which is None:
            outs, scores, nfe = vae_ceiling(pipes["base"].vae, examples)
        else:
            outs, scores, nfe = run_row(pipes[which], examples, steps=args.steps, **kw)
        rows.append(summarize(name, examples, scores, nfe))
        if which and (not kw or kw.get("candidates") == 4 and kw.get("early") == 4):  # the grid's columns
            cols.append((name.replace("LoRA-MoE + early filter", "MoE+filter"), outs))
        print(f"{name}: success {100 * rows[-1]['success']:.0f}%, NFE {nfe:.0f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    md = table(rows)
    print("\n" + md)
    if args.md:
        write_text(args.md, md + "\n")
    if args.grid:
        grid(examples, cols, args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    run_cli(main)
