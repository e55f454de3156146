"""explain.png, drawn with PIL from explain.json's numbers (infer/explain.py makes both).

    (a) the edit        input diptych [source | masked], the mask, the result [source | edit]
    (b) trajectory      the predicted clean right half x0 = x_t - t v at a few steps
    (c) attention       per block and step read: the right half's attention to left / text / right;
                        maps over the right half: where the instruction is read, how much goes left;
                        per instruction word
    (d) routing         per LoRA-MoE layer: the expert of each image token, the edited region
                        outlined, and each expert's share inside the region against outside it
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infer.explain_probes import GROUPS

INK, MUTED, LIGHT = (20, 20, 20), (105, 105, 105), (232, 232, 232)
GROUP_COLORS = {"left": (52, 101, 164), "text": (237, 145, 33), "right": (78, 154, 6)}
GROUP_NAMES = {"left": "left half (the source)", "text": "text", "right": "right half (itself)"}
EXPERT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127)]
RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)  # inferno
WIDTH = 1100  # the figure's width, about
PICTURE = 128  # the height pictures are shown at


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_box(s: str, f: ImageFont.ImageFont) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), s, font=f)
    return box[2], box[3]


def label(s: str, size: int = 12, fill=INK) -> Image.Image:
    f = font(size)
    w, h = text_box(s, f)
    img = Image.new("RGB", (w + 2, h + 3), "white")
    ImageDraw.Draw(img).multiline_text((0, 0), s, font=f, fill=fill)
    return img


def boxed(img: Image.Image, width: int, height: int) -> Image.Image:
    """`img` in a white box of a fixed size (cut if larger), for table columns."""
    out = Image.new("RGB", (width, height), "white")
    out.paste(img.crop((0, 0, min(width, img.width), min(height, img.height))), (0, 0))
    return out


def framed(img: Image.Image) -> Image.Image:
    out = img.copy()
    ImageDraw.Draw(out).rectangle([0, 0, out.width - 1, out.height - 1], outline=(160, 160, 160))
    return out


def hstack(imgs: list[Image.Image], gap: int = 12) -> Image.Image:
    out = Image.new("RGB", (sum(i.width for i in imgs) + gap * (len(imgs) - 1), max(i.height for i in imgs)), "white")
    x = 0
    for i in imgs:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def vstack(imgs: list[Image.Image], gap: int = 6) -> Image.Image:
    out = Image.new("RGB", (max(i.width for i in imgs), sum(i.height for i in imgs) + gap * (len(imgs) - 1)), "white")
    y = 0
    for i in imgs:
        out.paste(i, (0, y))
        y += i.height + gap
    return out


def grid(tiles: list[Image.Image], width: int = WIDTH, gap: int = 14) -> Image.Image:
    """Tiles left to right, wrapped into rows no wider than `width`."""
    rows, row = [], []
    for t in tiles:
        if row and sum(r.width + gap for r in row) + t.width > width:
            rows.append(hstack(row, gap))
            row = []
        row.append(t)
    return vstack(rows + [hstack(row, gap)], gap)


def captioned(img: Image.Image, caption: str) -> Image.Image:
    return vstack([img, label(caption, 11, MUTED)], 2)


def titled(title: str, body: Image.Image, note: str = "") -> Image.Image:
    head = [label(title, 15)] + ([label(note, 11, MUTED)] if note else [])
    return vstack(head + [body], 4)


def scaled(img: Image.Image, height: int = PICTURE) -> Image.Image:
    """Small images (the mini model's 64 px) blown up by whole pixels, large ones shrunk."""
    k = height / img.height
    if k >= 1:
        k = max(1, int(k))
        return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    return img.resize((max(1, round(img.width * k)), height), Image.Resampling.LANCZOS)


def heat(values: np.ndarray, vmax: float) -> Image.Image:
    """[rows, cols] in [0, vmax] -> an RGB image (one pixel per token) on the inferno ramp."""
    v = np.clip(np.asarray(values, np.float32) / max(vmax, 1e-12), 0, 1) * (len(RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(RAMP) - 2)
    rgb = RAMP[lo] + (v - lo)[..., None] * (RAMP[lo + 1] - RAMP[lo])
    return Image.fromarray(rgb.round().astype(np.uint8))


def overlay(picture: Image.Image, values: np.ndarray, vmax: float) -> Image.Image:
    """A token heat map laid over a (grayed) picture of the same extent, at PICTURE height."""
    base = scaled(picture).convert("L").convert("RGB")
    return Image.blend(base, heat(values, vmax).resize(base.size, Image.Resampling.NEAREST), 0.7)


def _short(block: str) -> str:
    kind, i = block.split(".")
    return ("d" if kind == "double_blocks" else "s") + i


# ---- the panels ------------------------------------------------------------------------------------

def edit_panel(images: dict) -> Image.Image:
    result = hstack([images["source"], images["result"]], 0)
    return titled("(a) the edit", hstack([
        captioned(framed(scaled(images["input"])), "input diptych: [source | masked right half]"),
        captioned(framed(scaled(images["mask"])), "mask: white = generated"),
        captioned(framed(scaled(result)), "result: [source | edit]")]))


def trajectory_panel(data: dict, frames: list[Image.Image]) -> Image.Image:
    tiles = [captioned(framed(scaled(f)), f"step {s['step']}, t = {s['t']:.2f}")
             for s, f in zip(data["trajectory"], frames)]
    return titled("(b) the trajectory", grid(tiles, gap=10),
                  f"the clean right half the model predicts at step i of 0..{data['steps'] - 1}: x0 = x_t - t * v "
                  "(flux_minimal/sampling.py, denoise)")


BAR = 190  # pixels of a 100% bar


def _bar(shares: list[float]) -> Image.Image:
    """A stacked bar of the shares to GROUPS, the left half's percentage printed on it."""
    img = Image.new("RGB", (BAR, 12), LIGHT)
    d, x = ImageDraw.Draw(img), 0.0
    for g, s in zip(GROUPS, shares):
        d.rectangle([round(x), 0, round(x + s * BAR), 11], fill=GROUP_COLORS[g])
        x += s * BAR
    d.text((3, -1), f"{100 * shares[0]:.0f}%", font=font(10), fill="white")
    return img


def _legend() -> Image.Image:
    items = []
    for g in GROUPS:
        sw = Image.new("RGB", (12, 12), GROUP_COLORS[g])
        items.append(hstack([sw, label(GROUP_NAMES[g], 11)], 4))
    return hstack(items, 16)


def mass_panel(data: dict) -> Image.Image:
    """Rows = blocks, columns = steps read: stacked bars left / text / right (the left % printed)."""
    att = data["attention"]
    shares = {(r["step"], r["block"]): [r[g] for g in GROUPS] for r in att["rows"]}
    steps = att["steps"]
    t = {r["step"]: r["t"] for r in att["rows"]}
    head = [boxed(label("block", 11, MUTED), 40, 16)] + [boxed(label(f"step {s}, t = {t.get(s, float('nan')):.2f}", 11),
                                                              BAR, 16) for s in steps]
    lines = [hstack(head, 10)]
    for b in att["blocks"]:
        lines.append(hstack([boxed(label(_short(b), 11), 40, 14)] +
                            [_bar(shares[(s, b)]) if (s, b) in shares else Image.new("RGB", (BAR, 12), "white")
                             for s in steps], 10))
    mean = [np.mean([shares[(s, b)] for b in att["blocks"] if (s, b) in shares], 0) for s in steps]
    lines.append(hstack([boxed(label("mean", 11), 40, 14)] + [_bar(list(m)) for m in mean], 10))
    return vstack([_legend()] + lines, 3)


def maps_panel(data: dict, result: Image.Image) -> Image.Image:
    tiles = []
    for m in data["attention"]["maps"]:
        instr, left = np.array(m["instruction"]), np.array(m["left"])
        tiles.append(captioned(overlay(result, instr, instr.max()),
                               f"step {m['step']}: reads the instruction\n(bright = {100 * instr.max():.1f}%)"))
        tiles.append(captioned(overlay(result, left, left.max()),
                               f"step {m['step']}: attends to the left\n(bright = {100 * left.max():.0f}%)"))
    return grid(tiles, gap=10)


def words_panel(data: dict) -> Image.Image:
    """Rows = instruction words, columns = steps read: the right half's attention to the word."""
    att, words = data["attention"], [w["word"] for w in data["words"]]
    if not words:
        return label("(the instruction's words were cut off by T5's length)", 11, MUTED)
    parts = {"(all its words)": "text_instruction", "(rest of prompt)": "text_prompt", "(T5 padding)": "text_padding"}
    share = {}
    for s in att["steps"]:
        rows = [r for r in att["rows"] if r["step"] == s]
        if rows:
            share[s] = np.concatenate([np.mean([r["words"] for r in rows], 0),
                                       [np.mean([r[k] for r in rows]) for k in parts.values()]])
    top = max((float(v[:len(words)].max()) for v in share.values()), default=0.0) or 1.0
    lines = [hstack([boxed(label("word", 11, MUTED), 96, 16)] +
                    [boxed(label(f"step {s}", 11), 150, 16) for s in share], 10)]
    for j, w in enumerate(words + list(parts)):
        cells = [boxed(label(w, 12, INK if j < len(words) else MUTED), 96, 14)]
        for v in share.values():
            img = Image.new("RGB", (150, 14), "white")
            d = ImageDraw.Draw(img)
            if j < len(words):  # the parts can be far larger than a word: their number only
                d.rectangle([0, 2, round(100 * v[j] / top), 11], fill=GROUP_COLORS["text"])
            d.text((104, 0), f"{100 * v[j]:.2f}%", font=font(10), fill=INK)
            cells.append(img)
        lines.append(hstack(cells, 10))
    return vstack(lines, 2)


def attention_panel(data: dict, result: Image.Image) -> Image.Image:
    n_blocks = len(data["attention"]["blocks"])
    return titled("(c) attention of the right half's tokens", vstack([
        label(f"share of attention to the left half, the text and itself, per block ({n_blocks} read; "
              "flux_minimal/mmdit.py, DoubleStreamBlock / SingleStreamBlock)", 11, MUTED),
        mass_panel(data),
        label("where in the right half the instruction's tokens are read, and how much each token takes from "
              "the left half (mean over blocks):", 11, MUTED),
        maps_panel(data, result),
        label("attention to each word of the instruction (T5 pieces joined; mean over blocks and tokens):", 11, MUTED),
        words_panel(data)], 6))


def _expert_map(rows: list[str], region: list[str], cell: int) -> Image.Image:
    e = np.array([[int(c, 32) for c in r] for r in rows])
    palette = np.array([EXPERT_COLORS[i % len(EXPERT_COLORS)] for i in range(e.max() + 1)], np.uint8)
    img = Image.fromarray(palette[e]).resize((e.shape[1] * cell, e.shape[0] * cell), Image.Resampling.NEAREST)
    d, half = ImageDraw.Draw(img), e.shape[1] // 2
    inside = np.array([[c == "1" for c in r] for r in region], bool)
    for y, x in zip(*np.nonzero(inside)):  # the region's outline: edges to a cell outside it
        X, Y = (x + half) * cell, y * cell
        for dy, dx, line in ((-1, 0, [X, Y, X + cell, Y]), (1, 0, [X, Y + cell, X + cell, Y + cell]),
                             (0, -1, [X, Y, X, Y + cell]), (0, 1, [X + cell, Y, X + cell, Y + cell])):
            yy, xx = y + dy, x + dx
            if not (0 <= yy < inside.shape[0] and 0 <= xx < inside.shape[1] and inside[yy, xx]):
                d.line(line, fill="white", width=2 if cell >= 4 else 1)
    d.line([half * cell, 0, half * cell, img.height], fill="black")
    return img


def _expert_bars(layer: dict) -> Image.Image:
    E, rows = layer["experts"], []
    n_in, n_out = sum(layer["in_region"]), sum(layer["outside"])
    for e in range(E):
        img = Image.new("RGB", (118, 18), "white")
        d, c = ImageDraw.Draw(img), EXPERT_COLORS[e % len(EXPERT_COLORS)]
        a = layer["in_region"][e] / n_in if n_in else 0.0
        b = layer["outside"][e] / n_out
        d.rectangle([0, 1, max(1, round(80 * a)), 7], fill=c)
        d.rectangle([0, 9, max(1, round(80 * b)), 15], fill=tuple(int(v * 0.35 + 255 * 0.65) for v in c))
        d.text((86, 3), f"{100 * a:.0f}/{100 * b:.0f}", font=font(9), fill=INK)
        rows.append(img)
    return vstack(rows, 0)


def routing_panel(data: dict) -> Image.Image | None:
    layers = data["routing"]
    if not layers:
        return titled("(d) routing", label("this model has no LoRA-MoE layers (an MoE LoRA comes with --lora)", 11,
                                           MUTED))
    steps = sorted({r["step"] for r in layers})
    step = steps[len(steps) // 2]
    cols = len(layers[0]["map"][0])
    cell = max(2, min(8, 128 // cols))  # 8 px a token for the mini model, 2 for FLUX at 512
    tiles = [captioned(hstack([_expert_map(r["map"], data["region"]["mask"], cell), _expert_bars(r)], 6), r["layer"])
             for r in layers if r["step"] == step]
    E = layers[0]["experts"]
    legend = hstack([hstack([Image.new("RGB", (12, 12), EXPERT_COLORS[e % len(EXPERT_COLORS)]),
                             label(f"expert {e}", 11)], 4) for e in range(E)], 14)
    reg = data["region"]
    how = f"the box {reg['box']}" if reg["from"] == "box" else "where the result differs from the source"
    note = (f"step {step}: the expert each image token takes (flux_minimal/moe.py, top-1 router); region "
            f"outlined = {how} ({reg['tokens']} tokens); bars: share of the region's tokens (solid) / of the rest "
            "(pale), in % as in/rest")
    return titled("(d) routing of the LoRA experts", vstack([legend, grid(tiles)], 6), note)


def draw(data: dict, images: dict) -> Image.Image:
    """The whole figure: data = explain.json's dict; images: source, result, input, mask, trajectory."""
    panels = [label(f"\"{data['instruction']}\"  ({data['files']}, {data['steps']} steps, "
                    f"guidance {data['guidance']:g}, seed {data['seed']})", 13),
              edit_panel(images), trajectory_panel(data, images["trajectory"]),
              attention_panel(data, images["result"]), routing_panel(data)]
    body = vstack(panels, 18)
    out = Image.new("RGB", (body.width + 24, body.height + 24), "white")
    out.paste(body, (12, 12))
    return out
