"""Edits outside the generator: scenes the world never draws, judged without the world's checker.

    .venv/bin/python -m mini_world.outside --lora assets/mini/lora_moe.safetensors --per-type 12
    .venv/bin/python -m mini_world.outside --lora /tmp/ema.safetensors --grid assets/mini_outside.png

The mini model learned from `mini_world/world.py`'s renderer (its palette, its anti-aliasing, its
sizes and placements). To see whether it learned to edit rather than to reproduce that renderer,
these scenes are drawn another way: PIL's own named colours (red is 255,0,0 here, 220,30,30 in the
world), flat fills with no supersampling (jagged edges), plain backgrounds in PIL's colours, one or
two circles and squares of any radius between 7 and 13 pixels at 64 x 64, placed anywhere they fit.
The instructions name an object by colour and shape, as a user would: "turn the red circle blue",
"remove the green square".

Judged here, from the masks the drawing knows (not by mini_world/check.py):
- colour change: at least half of the object's interior (its mask shrunk by one pixel) is nearer
  the new colour than any other colour named here, the background, or the old colour;
- removal: at least 80% of the object's interior is nearer the background colour than any object
  colour;
- and in both, the rest kept: every other object's interior at least 80% its colour, and the
  background away from the object (two pixels clear of it) within a mean absolute error of 0.06
  (pixels in [0, 1]) of the source.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter

SIZE = 64
OBJECT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")  # the words the model knows
BACKGROUNDS = ("gray", "beige", "pink", "teal")  # plain, in PIL's RGB for these names
SHAPES = ("circle", "square")
TYPES = ("color", "remove")
COLOR_FRAC, REMOVE_FRAC, KEPT_FRAC, BG_MAE = 0.5, 0.8, 0.8, 0.06


def rgb(name: str) -> np.ndarray:
    return np.array(ImageColor.getrgb(name), np.float32)


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square
    color: str
    x: int  # centre, pixels
    y: int
    r: int  # radius (circle) or half side (square), pixels


@dataclass(frozen=True)
class OutsideEdit:
    background: str
    shapes: tuple[Shape, ...]
    edit_type: str  # color | remove
    target: int  # index into shapes
    new_color: str  # color edits
    instruction: str


def draw(background: str, shapes: tuple[Shape, ...]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), ImageColor.getrgb(background))
    d = ImageDraw.Draw(img)
    for s in shapes:
        box = [s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r]
        (d.ellipse if s.kind == "circle" else d.rectangle)(box, fill=ImageColor.getrgb(s.color))
    return img


def mask(s: Shape, shrink: int = 0, grow: int = 0) -> np.ndarray:
    """[SIZE, SIZE] bool: the shape's pixels, eroded by `shrink` or dilated by `grow` pixels."""
    m = draw("black", (Shape(s.kind, "white", s.x, s.y, s.r),)).convert("L")
    for _ in range(shrink):
        m = m.filter(ImageFilter.MinFilter(3))
    for _ in range(grow):
        m = m.filter(ImageFilter.MaxFilter(3))
    return np.asarray(m) > 127


def make_edits(n_per_type: int, seed: int = 0) -> list[OutsideEdit]:
    """n_per_type colour changes and removals on scenes of one or two shapes (no two alike)."""
    rng = np.random.default_rng([seed, 7])
    edits = []
    for edit_type in TYPES:
        while sum(e.edit_type == edit_type for e in edits) < n_per_type:
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            shapes: list[Shape] = []
            for _ in range(rng.integers(1, 3)):
                for _ in range(50):  # rejection sampling: inside the image, 3 pixels clear of the others
                    r = int(rng.integers(7, 14))
                    s = Shape(SHAPES[rng.integers(2)], OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))],
                              int(rng.integers(r + 2, SIZE - r - 2)), int(rng.integers(r + 2, SIZE - r - 2)), r)
                    if all(abs(s.x - o.x) > s.r + o.r + 3 or abs(s.y - o.y) > s.r + o.r + 3 for o in shapes) \
                            and all((o.kind, o.color) != (s.kind, s.color) for o in shapes):
                        shapes.append(s)
                        break
            i = int(rng.integers(len(shapes)))
            s = shapes[i]
            if edit_type == "color":
                new = [c for c in OBJECT_COLORS if c != s.color and (s.kind, c) not in {(o.kind, o.color) for o in shapes}]
                color = new[rng.integers(len(new))]
                instruction = f"turn the {s.color} {s.kind} {color}"
            else:
                color, instruction = "", f"remove the {s.color} {s.kind}"
            edits.append(OutsideEdit(background, tuple(shapes), edit_type, i, color, instruction))
    return edits


def nearest(pixels: np.ndarray, names: list[str]) -> np.ndarray:
    """[N, 3] RGB pixels -> the index into `names` of each one's nearest colour."""
    palette = np.stack([rgb(n) for n in names])
    return np.linalg.norm(pixels[:, None, :].astype(np.float32) - palette[None], axis=-1).argmin(1)


def judge(e: OutsideEdit, source: Image.Image, output: Image.Image) -> dict:
    """{"success", "done", "kept", "bg_mae", "frac"} for the output of edit `e` on `source`."""
    src, out = np.asarray(source, np.float32), np.asarray(output.convert("RGB").resize(source.size), np.float32)
    s = e.shapes[e.target]
    inner = mask(s, shrink=1)
    names = list(dict.fromkeys([*OBJECT_COLORS, e.background]))
    near = np.array(names)[nearest(out[inner], names)]
    frac = float(np.mean(near == (e.new_color if e.edit_type == "color" else e.background)))
    done = frac >= (COLOR_FRAC if e.edit_type == "color" else REMOVE_FRAC)
    kept = 1.0
    for j, o in enumerate(e.shapes):
        if j != e.target:
            inner_o = mask(o, shrink=1)
            kept = min(kept, float(np.mean(np.array(names)[nearest(out[inner_o], names)] == o.color)))
    away = ~np.any([mask(o, grow=2) for o in e.shapes], axis=0)
    bg_mae = float(np.abs(out[away] - src[away]).mean() / 255)
    return {"success": bool(done and kept >= KEPT_FRAC and bg_mae <= BG_MAE), "done": bool(done), "frac": frac,
            "kept": kept, "bg_mae": bg_mae}


def perfect(e: OutsideEdit) -> Image.Image:
    """The edit done exactly, drawn the same way (what the judge must pass)."""
    shapes = list(e.shapes)
    if e.edit_type == "color":
        s = shapes[e.target]
        shapes[e.target] = Shape(s.kind, e.new_color, s.x, s.y, s.r)
    else:
        shapes.pop(e.target)
    return draw(e.background, tuple(shapes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_world.outside", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"))
    ap.add_argument("--lora", type=Path, default=Path("assets/mini/lora_moe.safetensors"))
    ap.add_argument("--per-type", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="which scenes (the edits' seeds are fixed per scene)")
    ap.add_argument("--grid", type=Path, default=None, help="sources, outputs and verdicts as one PNG")
    args = ap.parse_args(argv)
    from flux_minimal.files import check_output
    from infer.pipeline import ICEditPipeline
    if args.grid:
        check_output(args.grid, "--grid")
    pipe = ICEditPipeline.from_pretrained(args.weights, lora=args.lora)
    edits = make_edits(args.per_type, args.seed)
    rows = []
    for k, e in enumerate(edits):
        src = draw(e.background, e.shapes)
        out = pipe.edit(src, e.instruction, width=SIZE, seed=k, progress=False)
        rows.append((e, src, out, judge(e, src, out)))
        print(f"{'ok  ' if rows[-1][3]['success'] else 'FAIL'} {e.instruction:<32} on {e.background:<5} "
              f"({len(e.shapes)} shapes): {rows[-1][3]}", flush=True)
    print(f"\nedits outside the generator ({args.lora.name}, {args.per_type} per type, seed {args.seed}):")
    print("| type | edits | success |\n| --- | ---: | ---: |")
    for t in TYPES:
        ok = [r[3]["success"] for r in rows if r[0].edit_type == t]
        print(f"| {t} | {len(ok)} | {100 * np.mean(ok):.0f}% ({sum(ok)}/{len(ok)}) |")
    if args.grid:
        from flux_minimal.images import save_png
        cols = 8
        sheet = Image.new("RGB", (cols * (2 * SIZE + 6), ((len(rows) + cols - 1) // cols) * (SIZE + 6)), "white")
        for k, (e, src, out, v) in enumerate(rows):
            x, y = (k % cols) * (2 * SIZE + 6), (k // cols) * (SIZE + 6)
            sheet.paste(src, (x, y))
            sheet.paste(out.resize((SIZE, SIZE)), (x + SIZE, y))
            ImageDraw.Draw(sheet).rectangle([x + SIZE, y, x + 2 * SIZE - 1, y + SIZE - 1],
                                            outline=(0, 160, 0) if v["success"] else (200, 0, 0))
        save_png(sheet, args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    from flux_minimal.errors import run_cli
    run_cli(main)
