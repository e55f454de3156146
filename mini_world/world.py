"""The shapes world: a procedural edit dataset a miniature ICEdit trains and is judged on, on a CPU.

Like nanoGPT's Shakespeare: small enough to train on a CPU in a few hours, rich enough to show
whether the in-context editing recipe works. A scene is a background (a colour and a style) and
1-4 flat shapes; an edit turns a source scene into a target scene and says so in one instruction,
for each of the paper's edit types: remove, add, replace (swap), color, size, background (style),
move (the paper's known-hard one). The judge for a model's output is `mini_world/check.py`.

    rng = np.random.default_rng(0)
    ex = make_edit(rng, "color", size=64)        # ex.source, ex.target (PIL), ex.instruction, ex.record
    train = make_split(10_000, seed=0)           # deterministic, edit types balanced
    test = make_split(500, seed=0, split="heldout")   # another seed stream: never the same draws
    write_pairs_folder("data/shapes", train)     # pairs.jsonl + src/*.png + tgt/*.png

Geometry is in normalised units (the image side is 1), so one scene renders the same at 32, 64,
128 or 256 pixels. Every object is named by colour + shape and no two objects in a scene share
both, so "the red circle" is always unambiguous and no size word is ever needed to refer to one.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flux_minimal.files import write_text
from flux_minimal.icedit import IC_PROMPT
from flux_minimal.images import save_png

# Object colours: saturated and far apart (min pairwise RGB distance 81, yellow-orange).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (245, 220, 30),
    "purple": (140, 40, 180), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (20, 20, 20),
}
# Background colours: muted, with names of their own, and every tone a background uses (base, dark
# x0.7, light = 30% towards white) is >= 69 RGB units from every object colour, so a pixel's
# nearest colour says "object" or "background" without doubt (the checker depends on it).
BG_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "beige": (215, 200, 160), "pink": (235, 165, 195),
    "teal": (40, 140, 140), "brown": (140, 95, 60), "olive": (128, 128, 40),
}
STYLES = ("plain", "striped", "checkered", "gradient")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Circumradius as a fraction of the image side; consecutive sizes differ ~1.9x in area.
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.14, "large": 0.19}
SIZE_ORDER = ("small", "medium", "large")
MAX_OBJECTS = 4
MARGIN = 0.02  # an object's circumcircle stays this far inside the image
GAP = 0.03  # clearance between objects that must not touch (same colour, or placed "free")
OVERLAP = 0.8  # objects of different colours may overlap down to 0.8 x (r1 + r2): <= ~10% hidden
SUPERSAMPLE = 4  # draw at 4x and box-downsample: clean anti-aliased edges, crisp interiors
EDIT_TYPES = ("remove", "add", "replace", "color", "size", "background", "move")
SPLIT_STREAMS = {"train": 0, "heldout": 1}  # first word of the seed sequence: the streams never meet


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, in [0, 1] from the left
    y: float  # centre, in [0, 1] from the top

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        """How instructions refer to it: unique within a scene by construction."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Background:
    color: str
    style: str = "plain"


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...]  # in drawing order: later objects cover earlier ones

    def to_dict(self) -> dict:
        return {"background": vars(self.background).copy(), "objects": [vars(o).copy() for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(Background(**d["background"]), tuple(Obj(**o) for o in d["objects"]))


@dataclass(frozen=True)
class EditRecord:
    """What was edited, with both scenes: the ground truth the checker measures against."""

    edit_type: str
    instruction: str
    source: Scene
    target: Scene
    obj: int | None = None  # index of the edited object in source.objects (None: add, background)
    new_obj: int | None = None  # its index in target.objects (None: remove, background)
    params: dict[str, str] = field(default_factory=dict)  # color / change / location / direction / style

    def to_dict(self) -> dict:
        return {"edit_type": self.edit_type, "instruction": self.instruction, "source": self.source.to_dict(),
                "target": self.target.to_dict(), "obj": self.obj, "new_obj": self.new_obj, "params": dict(self.params)}

    @staticmethod
    def from_dict(d: dict) -> EditRecord:
        return EditRecord(d["edit_type"], d["instruction"], Scene.from_dict(d["source"]), Scene.from_dict(d["target"]),
                          d["obj"], d["new_obj"], dict(d["params"]))


@dataclass
class EditExample:
    source: Image.Image
    target: Image.Image
    instruction: str
    record: EditRecord

    @property
    def prompt(self) -> str:
        return IC_PROMPT.format(instruction=self.instruction)


# --- rendering ------------------------------------------------------------------------------------


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius 1 centred at 0 (y down). Every shape's centroid is its
    centre (all have >= 2-fold or 3-fold symmetry), which the checker's template fit relies on."""
    if shape == "square":
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.85, 0.0), (0.0, 1.0), (-0.85, 0.0)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
    if shape == "star":  # 5 points, inner radius 0.5: arms stay >= 2 px wide for small stars at 64
        return [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
                for k, r in zip(range(10), [1.0, 0.5] * 5)]
    if shape == "cross":
        a, w = 0.95, 0.33  # arm length, arm half-width
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


def unit_area(shape: str) -> float:
    """Area of the shape at circumradius 1 (shoelace formula)."""
    if shape == "circle":
        return math.pi
    p = _unit_polygon(shape)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(p, p[1:] + p[:1])))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """One shape, centre (cx, cy) and circumradius r in canvas pixels."""
    # PIL snaps vertices to the grid and fills the edge pixels too, so shapes come out half a pixel
    # too big; drawing half a pixel smaller makes areas and centroids unbiased (tests check both).
    r = max(r - 0.5, 0.5)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in _unit_polygon(shape)], fill=fill)


def _tones(color: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = np.array(BG_COLORS[color], np.float32)
    return base, base * 0.7, base + (255 - base) * 0.3  # base, dark, light


def background_tones(bg: Background) -> np.ndarray:
    """[3, 3] the RGB tones (0-255) a background can show: base, dark, light."""
    return np.stack(_tones(bg.color))


@functools.lru_cache(maxsize=64)  # only 24 backgrounds per size: each is drawn once
def _background_canvas(bg: Background, n: int) -> Image.Image:
    """n x n RGB. Patterns have 8 bands per side, so they look alike at every size."""
    tones = np.round(np.stack(_tones(bg.color))).astype(np.uint8)  # base, dark, light
    band = np.floor((np.arange(n) + 0.5) / n * 8).astype(int) % 2  # 0, 1 per band of pixel centres
    if bg.style == "plain":
        img = np.broadcast_to(tones[0], (n, n, 3))
    elif bg.style == "striped":  # horizontal bands, base and dark
        img = np.broadcast_to(tones[band][:, None, :], (n, n, 3))
    elif bg.style == "checkered":
        img = tones[(band[:, None] + band[None, :]) % 2]
    elif bg.style == "gradient":  # dark at the top to light at the bottom
        t = ((np.arange(n) + 0.5) / n)[:, None]
        rows = np.round(tones[1] + (tones[2].astype(np.float32) - tones[1]) * t).astype(np.uint8)
        img = np.broadcast_to(rows[:, None, :], (n, n, 3))
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    return Image.fromarray(np.ascontiguousarray(img))


def render_background(bg: Background, size: int = 64) -> Image.Image:
    return _background_canvas(bg, size * SUPERSAMPLE).reduce(SUPERSAMPLE)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image, size x size; deterministic (no randomness in rendering)."""
    n = size * SUPERSAMPLE
    img = _background_canvas(scene.background, n).copy()
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.x * n, o.y * n, o.radius * n, COLORS[o.color])
    return img.reduce(SUPERSAMPLE)


def object_masks(scene: Scene, size: int = 64) -> np.ndarray:
    """[N, size, size] float32 visible coverage in [0, 1] of each object (occlusion applied)."""
    n = size * SUPERSAMPLE
    index = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(index)
    for i, o in enumerate(scene.objects):
        _draw_shape(draw, o.shape, o.x * n, o.y * n, o.radius * n, i + 1)
    # One lookup table per object picks its pixels (255) and the box downsample averages them, in C.
    masks = [index.point([255 if v == i + 1 else 0 for v in range(256)]).reduce(SUPERSAMPLE)
             for i in range(len(scene.objects))]
    return np.stack([np.asarray(m, np.float32) / 255 for m in masks]) if masks else np.zeros((0, size, size), np.float32)


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """[size, size] coverage of one shape placed in output pixels (centre cx, cy; circumradius r)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx * s, cy * s, r * s, 255)
    return np.asarray(canvas.reduce(s), np.float32) / 255.0


# --- text -----------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(o: Obj) -> str:
    """'a small red circle'; medium objects go without a size word."""
    return _a(("" if o.size == "medium" else o.size + " ") + o.name)


def describe_background(bg: Background) -> str:
    return {"plain": f"{bg.color} background", "striped": f"striped {bg.color} background",
            "checkered": f"checkered {bg.color} background", "gradient": f"{bg.color} gradient background"}[bg.style]


def caption(scene: Scene) -> str:
    """'a red circle and a small blue square on a gray background'."""
    items = [describe(o) for o in scene.objects]
    if not items:
        return "an empty " + describe_background(scene.background)
    things = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{things} on {_a(describe_background(scene.background))}"


# A few phrasings per edit type: variety for the text encoder, a vocabulary of 65 words.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}"),
    "add": ("add {new}{where}", "put {new}{where}", "place {new}{where}"),
    "replace": ("replace the {ref} with {new}", "swap the {ref} for {new}", "change the {ref} into {new}"),
    "color": ("turn the {ref} {color}", "make the {ref} {color}", "change the color of the {ref} to {color}"),
    "bigger": ("make the {ref} bigger", "make the {ref} larger", "enlarge the {ref}"),
    "smaller": ("make the {ref} smaller", "shrink the {ref}"),
    "bg_color": ("change the background to {color}", "make the background {color}", "turn the background {color}"),
    "bg_style": ("make the background {style}", "turn the background {style}"),
    "move": ("move the {ref} to the {side}", "shift the {ref} to the {side}", "move the {ref} {way}"),
}
WHERE = {"": "", "left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom"}
STYLE_WORDS = {"plain": "plain", "striped": "striped", "checkered": "checkered", "gradient": "a gradient"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}  # y down
WAY = {"left": "left", "right": "right", "top": "up", "bottom": "down"}


def _say(rng: np.random.Generator, key: str, **slots: str) -> str:
    return TEMPLATES[key][rng.integers(len(TEMPLATES[key]))].format(**slots)


def vocabulary() -> set[str]:
    """Every word a caption or an instruction can use (the in-context prompt adds its own)."""
    words = set(" ".join(TEMPLATES[k][i] for k in TEMPLATES for i in range(len(TEMPLATES[k]))).split())
    words = {w for w in words if "{" not in w}
    words |= set(COLORS) | set(BG_COLORS) | set(SHAPES) | {"small", "large", "a", "an", "and", "on", "empty", "gradient"}
    words |= set(" ".join(WHERE.values()).split()) | set(" ".join(STYLE_WORDS.values()).split())
    words |= set(DIRECTIONS) | set(WAY.values()) | {"background", "striped", "checkered"}
    return words


# --- scenes ---------------------------------------------------------------------------------------


def _fits(o: Obj, others: tuple[Obj, ...], free: bool = False) -> bool:
    """Inside the image, and not too close to the others: objects of the same colour (or any object
    when `free`) keep a gap, so a colour blob is one object; others may overlap a little."""
    r = o.radius
    if not (r + MARGIN <= o.x <= 1 - r - MARGIN and r + MARGIN <= o.y <= 1 - r - MARGIN):
        return False
    for p in others:
        d, reach = math.hypot(o.x - p.x, o.y - p.y), r + p.radius
        if d < (reach + GAP if free or p.color == o.color else OVERLAP * reach):
            return False
    return True


def _place(rng: np.random.Generator, others: tuple[Obj, ...], shape: str, color: str, size: str,
           free: bool, box: tuple[float, float, float, float] = (0, 1, 0, 1), tries: int = 50) -> Obj | None:
    """A random position (centre inside box = x0, x1, y0, y1) where the object fits, or None."""
    for _ in range(tries):
        x, y = rng.uniform(box[0], box[1]), rng.uniform(box[2], box[3])
        o = Obj(shape, color, size, round(float(x), 4), round(float(y), 4))
        if _fits(o, others, free):
            return o
    return None


def _new_kind(rng: np.random.Generator, scene: Scene, not_shape: str = "", not_color: str = "") -> tuple[str, str]:
    """A (shape, colour) not yet in the scene (so its name stays unique), avoiding the given ones."""
    taken = {(o.shape, o.color) for o in scene.objects}
    free = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken and s != not_shape and c != not_color]
    return free[rng.integers(len(free))]


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A background (plain half the time) and 1-4 objects (fewer if they do not fit)."""
    style = STYLES[0] if rng.random() < 0.5 else STYLES[1 + rng.integers(len(STYLES) - 1)]
    scene = Scene(Background(list(BG_COLORS)[rng.integers(len(BG_COLORS))], style), ())
    for _ in range(n_objects or int(rng.integers(1, MAX_OBJECTS + 1))):
        shape, color = _new_kind(rng, scene)
        o = _place(rng, scene.objects, shape, color, SIZE_ORDER[rng.integers(3)], free=False)
        if o is not None:
            scene = replace(scene, objects=scene.objects + (o,))
    return scene if scene.objects else random_scene(rng, n_objects)


# --- edits: each returns the record, or None when this scene does not allow it -----------------------


def _with(scene: Scene, i: int, o: Obj | None) -> Scene:
    objs = scene.objects[:i] + ((o,) if o is not None else ()) + scene.objects[i + 1:]
    return replace(scene, objects=objs)


def _edit_remove(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    i = int(rng.integers(len(s.objects)))
    return EditRecord("remove", _say(rng, "remove", ref=s.objects[i].name), s, _with(s, i, None), obj=i)


def _edit_add(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    if len(s.objects) >= MAX_OBJECTS:
        return None
    shape, color = _new_kind(rng, s)
    where = "" if rng.random() < 0.5 else list(DIRECTIONS)[rng.integers(4)]
    # The centre stays 0.1 clear of the midline, so "on the left" is unambiguous in the image.
    box = {"": (0, 1, 0, 1), "left": (0, 0.4, 0, 1), "right": (0.6, 1, 0, 1), "top": (0, 1, 0, 0.4), "bottom": (0, 1, 0.6, 1)}[where]
    new = _place(rng, s.objects, shape, color, SIZE_ORDER[rng.integers(3)], free=True, box=box)
    if new is None:
        return None
    text = _say(rng, "add", new=_a(new.name), where=WHERE[where])
    return EditRecord("add", text, s, replace(s, objects=s.objects + (new,)), new_obj=len(s.objects), params={"location": where})


def _edit_replace(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    # Only an object clear of the others, so the new shape shows whole (its outline is what is judged).
    free = [i for i, o in enumerate(s.objects) if _fits(o, _with(s, i, None).objects, free=True)]
    if not free:
        return None
    i = free[rng.integers(len(free))]
    o = s.objects[i]
    shape, color = _new_kind(rng, s, not_shape=o.shape, not_color=o.color)  # both differ: a real swap
    new = replace(o, shape=shape, color=color)
    text = _say(rng, "replace", ref=o.name, new=_a(new.name))
    return EditRecord("replace", text, s, _with(s, i, new), obj=i, new_obj=i, params={"color": color, "shape": shape})


def _edit_color(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    taken = {(p.shape, p.color) for p in s.objects}
    options = [c for c in COLORS if c != o.color and (o.shape, c) not in taken
               and _fits(replace(o, color=c), _with(s, i, None).objects)]
    if not options:
        return None
    color = options[rng.integers(len(options))]
    text = _say(rng, "color", ref=o.name, color=color)
    return EditRecord("color", text, s, _with(s, i, replace(o, color=color)), obj=i, new_obj=i, params={"color": color})


def _edit_size(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    k = SIZE_ORDER.index(o.size)
    change = ("bigger" if rng.random() < 0.5 else "smaller") if k == 1 else ("bigger" if k == 0 else "smaller")
    new = replace(o, size=SIZE_ORDER[k + (1 if change == "bigger" else -1)])
    if not _fits(new, _with(s, i, None).objects, free=True):  # its new outline must show whole
        return None
    return EditRecord("size", _say(rng, change, ref=o.name), s, _with(s, i, new), obj=i, new_obj=i, params={"change": change})


def _edit_background(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    bg = s.background
    if rng.random() < 0.5:
        colors = [c for c in BG_COLORS if c != bg.color]
        new = replace(bg, color=colors[rng.integers(len(colors))])
        text, params = _say(rng, "bg_color", color=new.color), {"color": new.color}
    else:
        styles = [t for t in STYLES if t != bg.style]
        new = replace(bg, style=styles[rng.integers(len(styles))])
        text, params = _say(rng, "bg_style", style=STYLE_WORDS[new.style]), {"style": new.style}
    return EditRecord("background", text, s, replace(s, background=new), params=params)


def _edit_move(rng: np.random.Generator, s: Scene) -> EditRecord | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    side = list(DIRECTIONS)[rng.integers(4)]
    dx, dy = DIRECTIONS[side]
    room = (o.x if dx < 0 else 1 - o.x) if dx else (o.y if dy < 0 else 1 - o.y)
    lo, hi = 2 * o.radius + GAP, room - o.radius - MARGIN  # lo: the new place does not touch the old
    for _ in range(20 if hi > lo else 0):
        d = rng.uniform(lo, hi)
        new = replace(o, x=round(o.x + dx * d, 4), y=round(o.y + dy * d, 4))
        if _fits(new, _with(s, i, None).objects, free=True):
            text = _say(rng, "move", ref=o.name, side=side, way=WAY[side])
            return EditRecord("move", text, s, _with(s, i, new), obj=i, new_obj=i, params={"direction": side})
    return None


_MAKERS = {"remove": _edit_remove, "add": _edit_add, "replace": _edit_replace, "color": _edit_color,
           "size": _edit_size, "background": _edit_background, "move": _edit_move}


def make_edit_record(rng: np.random.Generator, edit_type: str | None = None, n_objects: int | None = None
                     ) -> EditRecord:
    """A random edit of the given type (any type when None), on fresh random scenes (of n_objects
    objects when given, else 1-4) until one allows it."""
    if edit_type is None:
        edit_type = EDIT_TYPES[rng.integers(len(EDIT_TYPES))]
    if edit_type not in _MAKERS:
        raise ValueError(f"unknown edit type {edit_type!r}; expected one of {EDIT_TYPES}")
    while (record := _MAKERS[edit_type](rng, random_scene(rng, n_objects))) is None:
        pass
    return record


def make_edit(rng: np.random.Generator, edit_type: str | None = None, size: int = 64) -> EditExample:
    record = make_edit_record(rng, edit_type)
    return EditExample(render(record.source, size), render(record.target, size), record.instruction, record)


def make_split(n: int, seed: int = 0, size: int = 64, split: str = "train") -> list[EditExample]:
    """n examples, edit types in turn. Example i depends only on (split, seed, i), so a split is the
    same whatever n, and "heldout" draws from a seed stream that "train" never uses."""
    stream = SPLIT_STREAMS[split]
    return [make_edit(np.random.default_rng([stream, seed, i]), EDIT_TYPES[i % len(EDIT_TYPES)], size) for i in range(n)]


def world_text_corpus(n: int, seed: int = 0) -> list[str]:
    """n strings to train the tiny tokenizers on: first every template with every colour, shape,
    size, background and direction (so the vocabulary is complete whatever the draw), then random
    captions, instructions and in-context prompts, in turn."""
    sweep = [caption(Scene(Background(bc, st), (Obj(sh, c, sz, 0.5, 0.5),)))
             for sh, c, sz, bc, st in zip(SHAPES * 8, list(COLORS) * 6, SIZE_ORDER * 16, list(BG_COLORS) * 8, STYLES * 12)]
    sweep += ["an empty gray background", "a red circle and a blue square on a gray background"]
    slots = dict(ref="red circle", new="an orange star", color="blue", side="left", way="up", style="striped")
    sweep += [t.format(where=w, **slots) for k in TEMPLATES for t in TEMPLATES[k] for w in WHERE.values()]
    sweep += [f"add a blue square{w}" for w in WHERE.values()] + [f"move the red circle {w}" for w in WAY.values()]
    sweep += [f"make the background {w}" for w in STYLE_WORDS.values()] + [IC_PROMPT.format(instruction="remove the red circle")]
    sweep = list(dict.fromkeys(sweep))  # unique, order kept
    rng = np.random.default_rng([2, seed])
    out = sweep[:n]
    while len(out) < n:
        r = make_edit_record(rng)
        out += [caption(r.source), r.instruction, IC_PROMPT.format(instruction=r.instruction)][: n - len(out)]
    return out


# --- on disk --------------------------------------------------------------------------------------


def write_pairs_folder(folder: str | Path, examples: list[EditExample]) -> Path:
    """folder/pairs.jsonl (one line per pair: source, target, instruction, record) + src/ and tgt/
    PNGs. The images go first and pairs.jsonl is replaced last, so it only lists finished files."""
    folder = Path(folder)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "tgt").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        src, tgt = f"src/{i:05d}.png", f"tgt/{i:05d}.png"
        save_png(ex.source, folder / src)  # atomic: a reader never sees half a file
        save_png(ex.target, folder / tgt)
        lines.append(json.dumps({"source": src, "target": tgt, "instruction": ex.instruction, "record": ex.record.to_dict()}))
    return write_text(folder / "pairs.jsonl", "".join(line + "\n" for line in lines))


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:  # closed at once: a dataset has thousands of files
        return img.convert("RGB")


def read_pairs_folder(folder: str | Path) -> list[EditExample]:
    """The examples written by `write_pairs_folder`, images loaded."""
    folder = Path(folder)
    out = []
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append(EditExample(_load_rgb(folder / d["source"]), _load_rgb(folder / d["target"]), d["instruction"],
                               EditRecord.from_dict(d["record"])))
    return out
