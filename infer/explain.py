"""See inside one edit: the trajectory, where the edited half attends, which expert each token takes.

    .venv/bin/python -m infer.explain --preset mini --image examples/mini/scene_01.png \
        --instruction "turn the red circle blue" --out explain/
    .venv/bin/python -m infer.explain --weights FLUX.1-Fill-dev --lora ICEdit-MoE-LoRA --device cuda \
        --image cat.png --instruction "make the cat wear a red hat" --out explain/ --blocks d0,d9,d18,s0,s18,s37

runs one edit with hooks (infer/explain_probes.py) and writes to the folder --out:
    explain.png   (a) input diptych, mask, result; (b) the predicted clean right half x0 = x_t - t v
                  across the schedule; (c) for the right half's tokens, the share of attention to the
                  left half / the text / the right half per block at the steps read, where the
                  instruction is attended from, attention per instruction word; (d) per LoRA-MoE
                  layer, the expert each image token takes, inside the edited region and out of it
    explain.json  the same numbers (the figure is drawn from them; docs/how_an_edit_happens.md)
    edit.png      the edit, pixel for pixel the one `python -m infer.edit` makes with the same options

The edited region is where the result differs from the source (a token whose pixels differ by more
than 10% on average), or --region x0,y0,x1,y1 in the input image's pixels.
"""

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.files import check_folder, write_text
from flux_minimal.icedit import IC_PROMPT, ic_prompt, make_diptych
from flux_minimal.images import MIN_SIDE, load_image, save_png
from infer.edit import edit_args
from infer.explain_probes import GROUPS, Layout, Recorder
from infer.options import DTYPES, EDIT, OFFLOAD_MODES, PRESETS

REGION_THRESHOLD = 0.1  # mean |result - source| of a token's pixels (0..1, max over RGB) that counts as edited


@dataclass
class Explanation:
    """What `explain_edit` returns: the edit, the figure and its numbers."""

    result: Image.Image  # the edit (the right half), equal to pipe.edit's
    figure: Image.Image  # explain.png
    data: dict  # explain.json


def default_steps_shown(steps: int) -> list[int]:
    """An early, a middle and a late step (0-based) of an n-step schedule."""
    return sorted({steps // 10, steps // 2, steps - 1 - steps // 10})


def trajectory_steps(steps: int, frames: int) -> list[int]:
    """`frames` steps spread evenly from the first to the last (0-based; the last one's x0 is the edit)."""
    if frames <= 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (frames - 1)) for i in range(frames)})


def parse_blocks(spec: str, depth: int, single: int) -> list[str]:
    """'all', 'double', 'single', or a comma list of d<i> / s<j> -> block names, in model order."""
    names = [f"double_blocks.{i}" for i in range(depth)] + [f"single_blocks.{j}" for j in range(single)]
    chosen = set()
    for item in (s.strip() for s in spec.split(",")):
        if item in ("all", "double", "single"):
            chosen |= {n for n in names if item == "all" or n.startswith(item)}
        elif item[:1] in ("d", "s") and item[1:].isdigit():
            name = f"{'double' if item[0] == 'd' else 'single'}_blocks.{int(item[1:])}"
            if name not in names:
                raise FluxMinimalError(f"--blocks {item}: this model has double blocks d0..d{depth - 1} and single "
                                       f"blocks s0..s{single - 1}")
            chosen.add(name)
        else:
            raise FluxMinimalError(f"--blocks: {item!r} is not 'all', 'double', 'single' or d<i> / s<j> (e.g. d0,s3)")
    return [n for n in names if n in chosen]


def parse_steps(spec: str | None, steps: int) -> list[int]:
    if not spec:
        return default_steps_shown(steps)
    try:
        chosen = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise FluxMinimalError(f"--steps-shown {spec!r}: give 0-based step numbers, e.g. 2,14,25") from None
    if chosen[0] < 0 or chosen[-1] >= steps:
        raise FluxMinimalError(f"--steps-shown {spec!r}: steps are numbered 0..{steps - 1} for {steps} steps")
    return chosen


def parse_region(spec: str | None) -> tuple[int, int, int, int] | None:
    if not spec:
        return None
    try:
        box = tuple(int(v) for v in spec.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
        raise FluxMinimalError(f"--region {spec!r}: give x0,y0,x1,y1 in the image's pixels with x0 < x1, y0 < y1")
    return box


def instruction_words(tokenizer, prompt: str, instruction: str) -> tuple[list[dict], list[str], int]:
    """The instruction's words, each with the positions of its T5 pieces in the prompt's tokens
    (pieces joined back into words: a word starts at a piece beginning with '▁'); the words the
    tokenizer's max_length cut off; and the prompt's token count with its </s>."""
    ids = tokenizer.encode(prompt)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    starts = [i for i, p in enumerate(pieces) if i == 0 or p.startswith("▁")]
    groups = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(pieces)])]
    names = instruction.split()
    if len(groups) < len(names):  # not from a sentencepiece vocabulary: every group, named by its pieces
        names = ["".join(pieces[i] for i in g).lstrip("▁") for g in groups]
    kept = tokenizer.max_length - 1  # the tokenizer keeps this many pieces, then </s>
    words, cut = [], []
    for name, g in zip(names, groups[-len(names):]):
        g = [i for i in g if i < kept]
        (words.append({"word": name, "tokens": g}) if g else cut.append(name))
    return words, cut, min(len(ids), kept) + 1


def edited_region(source: Image.Image, result: Image.Image, rows: int, cols: int,
                  box: tuple[int, int, int, int] | None, scale: tuple[float, float]) -> np.ndarray:
    """[rows, cols] bool over the right half's tokens: where the result differs from the source,
    or the tokens whose centres lie in `box` (input pixels, times `scale` to the fitted source)."""
    tp = source.height // rows  # pixels per token side
    if box is not None:
        cy = (np.arange(rows) + 0.5) * tp / scale[1]
        cx = (np.arange(cols) + 0.5) * tp / scale[0]
        return (((cy >= box[1]) & (cy < box[3]))[:, None] & ((cx >= box[0]) & (cx < box[2]))[None, :])
    diff = np.abs(np.asarray(result, np.float32) - np.asarray(source, np.float32)).max(-1) / 255  # [h, w]
    return diff.reshape(rows, tp, cols, tp).mean((1, 3)) > REGION_THRESHOLD


def _attention_rows(rec: Recorder, words: list[dict], n_prompt: int, timesteps: list[float]) -> list[dict]:
    instr = [i for w in words for i in w["tokens"]]
    rows = []
    for r in rec.attention:
        other = r.text[:n_prompt].sum() - r.text[instr].sum()
        rows.append({"step": r.step, "t": timesteps[r.step], "block": r.block, **dict(zip(GROUPS, r.mass)),
                     "text_instruction": float(r.text[instr].sum()), "text_prompt": float(other),
                     "text_padding": float(r.text[n_prompt:].sum()),
                     "words": [float(r.text[w["tokens"]].sum()) for w in words]})
    return rows


def _attention_maps(rec: Recorder, layout: Layout, timesteps: list[float], region: np.ndarray) -> list[dict]:
    """Per step read: each right-half token's attention on the left half and on the instruction,
    averaged over the blocks read, as [rows][cols/2] lists; and their means inside the edited
    region and over the rest of the right half."""
    maps = []
    for step in sorted({r.step for r in rec.attention}):
        m = torch.stack([r.per_query for r in rec.attention if r.step == step]).mean(0)  # [Q, 2]
        m = m.reshape(layout.rows, layout.cols // 2, 2).numpy()
        split = {where: {"left": float(m[sel, 0].mean()), "instruction": float(m[sel, 1].mean())} if sel.any() else None
                 for where, sel in (("region", region), ("rest", ~region))}
        maps.append({"step": step, "t": timesteps[step], "left": m[..., 0].tolist(), "instruction": m[..., 1].tolist(),
                     **split})
    return maps


def _routing(rec: Recorder, layout: Layout, region: np.ndarray) -> list[dict]:
    """Per (step, layer): token counts per expert inside the region and outside it, and the map."""
    inside = np.zeros((layout.rows, layout.cols), bool)
    inside[:, layout.cols // 2:] = region
    out = []
    for (step, name) in sorted(rec.routing, key=lambda sn: (sn[0], rec.moe_layers.index(sn[1]))):  # model order
        E = rec.model.get_submodule(name).lora_route.shape[0]
        e = rec.routing[(step, name)].numpy().reshape(layout.rows, layout.cols)
        out.append({"step": step, "layer": name, "experts": E,
                    "in_region": np.bincount(e[inside], minlength=E).tolist(),
                    "outside": np.bincount(e[~inside], minlength=E).tolist(),
                    "map": ["".join("0123456789abcdefghijklmnopqrstuv"[v] for v in row) for row in e]})
    return out


@torch.no_grad()
def explain_edit(pipe, image, instruction: str, *, width: int = EDIT.width, steps: int = EDIT.steps,
                 guidance: float = EDIT.guidance, seed: int = EDIT.seed, steps_shown: list[int] | None = None,
                 blocks: str = "all", frames: int = 6, region: tuple[int, int, int, int] | None = None,
                 chunk: int = 256, template: str = IC_PROMPT, progress: bool = False) -> Explanation:
    """One edit of `pipe` (an ICEditPipeline) with hooks: the same result as
    pipe.edit(image, instruction, width=, steps=, guidance=, seed=), and what happened inside it."""
    t0 = time.perf_counter()
    if steps < 1:
        raise FluxMinimalError(f"steps must be >= 1, not {steps}")
    shown = steps_shown if steps_shown is not None else default_steps_shown(steps)
    if shown and (min(shown) < 0 or max(shown) >= steps):
        raise FluxMinimalError(f"steps shown {shown}: steps are numbered 0..{steps - 1} for {steps} steps")
    read = parse_blocks(blocks, pipe.flux.params.depth, pipe.flux.params.depth_single_blocks)
    original = load_image(image, MIN_SIDE)
    job = pipe.prepare(original, instruction, width, template=template)
    instruction = " ".join(instruction.split())
    prompt = ic_prompt(instruction, template)
    layout = Layout(job.cond.txt.shape[1], job.height // (2 * job.down), job.width // (2 * job.down))
    words, cut, n_prompt = instruction_words(pipe.text.t5_tokenizer, prompt, instruction)
    rec = Recorder(pipe.flux, layout, set(shown), set(read), [i for w in words for i in w["tokens"]], chunk)
    at = trajectory_steps(steps, frames)
    state, x0s = _denoise(pipe, job, rec, seed, steps, guidance, at, progress)
    result = pipe.decode(state.x, job)[0]
    trajectory = pipe.decode(torch.cat(x0s), job)  # the right half of each frame's x0

    scale = (job.source.width / original.width, job.source.height / original.height)
    mask = edited_region(job.source, result, layout.rows, layout.cols // 2, region, scale)
    data = {
        "instruction": instruction, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
        "size": f"{result.width}x{result.height}", "files": pipe.files,
        "tokens": {"text": layout.text_len, "prompt": n_prompt, "rows": layout.rows, "cols": layout.cols,
                   "pixels": 2 * job.down},
        "timesteps": state.timesteps,
        "trajectory": [{"step": i, "t": state.timesteps[i]} for i in at],
        "words": words, "words_cut": cut,
        "attention": {"steps": shown, "blocks": read, "rows": _attention_rows(rec, words, n_prompt, state.timesteps),
                      "maps": _attention_maps(rec, layout, state.timesteps, mask)},
        "region": {"from": "box" if region else "difference", "box": list(region) if region else None,
                   "threshold": REGION_THRESHOLD, "tokens": int(mask.sum()),
                   "mask": ["".join("1" if v else "0" for v in row) for row in mask]},
        "routing": _routing(rec, layout, mask),
        "seconds": time.perf_counter() - t0,
    }
    from infer.explain_figure import draw
    images = {"source": job.source, "result": result, "input": make_diptych(job.source, _gray(job.source)),
              "mask": _mask_image(job.source), "trajectory": trajectory}
    return Explanation(result, draw(data, images), data)


def _denoise(pipe, job, rec: Recorder, seed: int, steps: int, guidance: float, at: list[int], progress: bool):
    """The edit's sampling under the recorder's hooks, stopping after each frame's step to keep its
    x0 (the sampler resumes exactly: DenoiseState). Returns the final state and the frames' x0."""
    state, x0s = pipe.initial_state(job, [seed], steps), []
    with rec:
        for stop in sorted({i + 1 for i in at} | {steps}):
            state = pipe.sample(job, state, guidance, stop=stop, desc=f"explain (to step {stop})", progress=progress)
            if stop - 1 in at:
                x0s.append(state.x0)
    return state, x0s


def _gray(img: Image.Image) -> Image.Image:
    """The masked right half as the VAE sees it: 0 in [-1, 1], mid-gray."""
    return Image.new("RGB", img.size, (128, 128, 128))


def _mask_image(img: Image.Image) -> Image.Image:
    mask = Image.new("L", (2 * img.width, img.height), 0)
    mask.paste(255, (img.width, 0, 2 * img.width, img.height))
    return mask.convert("RGB")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m infer.explain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    edit_args(ap, "the edit instruction", "output folder (explain.png, explain.json, edit.png)", repeat=False)
    ap.add_argument("--steps-shown", help="0-based steps whose attention and routing are read, e.g. 2,14,25 "
                                          "(default: an early, a middle and a late one)")
    ap.add_argument("--blocks", default="all", help="blocks whose attention is read: all, double, single, or "
                                                    "d<i>/s<j> items, e.g. d0,d18,s0,s37 (default: all)")
    ap.add_argument("--frames", type=int, default=6, help="trajectory frames (default: 6)")
    ap.add_argument("--region", help="the edited region x0,y0,x1,y1 in the image's pixels (default: where the "
                                     "result differs from the source)")
    ap.add_argument("--chunk", type=int, default=256,
                    help="query rows per attention chunk (memory: heads x chunk x tokens floats)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--offload", choices=OFFLOAD_MODES, default=OFFLOAD_MODES[0], help="as in python -m infer.edit")
    ap.add_argument("--fp8", action="store_true", help="DiT and T5 linear weights in FP8, as in python -m infer.edit")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS.get(args.preset)
    defaults = preset.edit if preset else EDIT
    width, steps = args.width or defaults.width, args.steps or defaults.steps
    guidance = args.guidance if args.guidance is not None else defaults.guidance
    region = parse_region(args.region)
    parse_steps(args.steps_shown, steps)
    if args.frames < 1 or args.chunk < 1:
        raise FluxMinimalError("--frames and --chunk must be at least 1")
    check_folder(args.out, "--out folder")  # before the minutes of loading
    load_image(args.image)
    from infer.pipeline import ICEditPipeline

    t0 = time.perf_counter()
    lora = args.lora or (preset.lora if preset else None)
    pipe = ICEditPipeline.from_pretrained(args.weights or preset.weights, device=args.device, dtype=DTYPES.get(args.dtype),
                                          lora=lora, lora_scale=args.lora_scale, offload=args.offload, fp8=args.fp8)
    loaded = time.perf_counter() - t0
    parse_blocks(args.blocks, pipe.flux.params.depth, pipe.flux.params.depth_single_blocks)
    ex = explain_edit(pipe, args.image, args.instruction, width=width, steps=steps, guidance=guidance, seed=args.seed,
                      steps_shown=parse_steps(args.steps_shown, steps), blocks=args.blocks, frames=args.frames,
                      region=region, chunk=args.chunk, progress=not args.no_progress)
    meta = {k: ex.data[k] for k in ("instruction", "seed", "steps", "guidance", "size", "files")}
    save_png(ex.result, args.out / "edit.png", {**meta, "software": "flux-minimal ICEdit"}, keep=True)
    save_png(ex.figure, args.out / "explain.png", keep=True)
    write_text(args.out / "explain.json", json.dumps(ex.data, indent=1))
    print_summary(ex.data)
    print(f"wrote {args.out / 'explain.png'}, explain.json, edit.png: load {loaded:.1f}s, "
          f"explain {ex.data['seconds']:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return 0


def print_summary(data: dict) -> None:
    """Per step read: the right half's attention to left / text / right, averaged over the blocks."""
    rows = data["attention"]["rows"]
    for step in data["attention"]["steps"]:
        r = [x for x in rows if x["step"] == step]
        if r:
            mean = {g: sum(x[g] for x in r) / len(r) for g in GROUPS}
            m = next(m for m in data["attention"]["maps"] if m["step"] == step)
            inside = (f"; edited region / rest of the right half: {100 * m['region']['left']:.0f}% / "
                      f"{100 * m['rest']['left']:.0f}% to the left, {100 * m['region']['instruction']:.1f}% / "
                      f"{100 * m['rest']['instruction']:.1f}% to the instruction") if m["region"] and m["rest"] else ""
            print(f"step {step} (t={r[0]['t']:.2f}): right half attends " +
                  ", ".join(f"{100 * mean[g]:.0f}% {g}" for g in GROUPS) + f" (mean of {len(r)} blocks)" + inside)
    print(f"edited region: {data['region']['tokens']} tokens ({data['region']['from']}); "
          f"{len(data['routing'])} MoE routing maps" + (f"; words cut by T5's length: {data['words_cut']}"
                                                       if data["words_cut"] else ""))


if __name__ == "__main__":
    run_cli(main)
