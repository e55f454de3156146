"""Probe the mini world's bottlenecks: what caps edit success before any adapter is trained.

    .venv/bin/python -m mini_world.probe --weights assets/mini       # ~1 min on 2 cores

Four figures, each a precondition of an instruction edit, measured on fresh scenes:
  VAE ceiling      the edit checker (mini_world/check.py) on held-out *targets* after a VAE round
                   trip: every output leaves through the decoder, so no DiT can do better
  in-context copy  the base model asked for "the same scene" with the right half masked: the
                   fraction of each object's visible pixels that come back in its colour, and the MAE
  caption reading  two-scene diptychs, the right half generated from its caption: the share of
                   object-coloured output pixels whose colour the caption names, against the same
                   share for the colours of an unrelated scene (what ignoring the caption gives)
  shape drawing    the held-out additions' target scenes asked of the base by their full captions,
                   as a second scene, as "the same scene" (the left lacks the new object), and in
                   place: the target on both sides with the new object's box hidden on the left too
                   (the base's own hidden-object task, where and how large are given by the hole):
                   the share whose new object comes out in its colour and shape (the add rule of
                   mini_world/check.py without its location), the skill an addition needs
"""

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infer.pipeline import ICEditPipeline
from flux_minimal.errors import run_cli

from mini_world import world
from mini_world.recipe import SAME_SCENE_PROMPT, TWO_SCENES_PROMPT, object_box
from mini_world.ablation import summarize, vae_ceiling

PALETTE = np.array(list(world.COLORS.values()), dtype=np.float64)  # [8, 3]
NAMES = list(world.COLORS)


def palette_labels(img) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index of the nearest object colour, and whether it is within 30 RGB units of it."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    d = ((a[:, :, None, :] - PALETTE) ** 2).sum(-1)  # [H, W, 8]
    return d.argmin(-1), d.min(-1) < 30**2


def copy_fidelity(pipe, n: int, steps: int, size: int = 64) -> tuple[float, float]:
    """(mean fraction of each object's visible pixels kept in its colour, mean absolute error in [0, 1])."""
    rng = np.random.default_rng(777)
    kept, mae = [], []
    for i in range(n):
        scene = world.random_scene(rng)
        src = world.render(scene, size)
        prompt = SAME_SCENE_PROMPT.format(caption=world.caption(scene))
        out = pipe.edit(src, "-", width=size, steps=steps, seed=i, template=prompt, progress=False)
        o, s = np.asarray(out, dtype=np.float64), np.asarray(src, dtype=np.float64)
        mae.append(np.abs(o - s).mean() / 255)
        labels, _ = palette_labels(out)
        src_labels, src_close = palette_labels(src)
        for obj, m in zip(scene.objects, world.object_masks(scene, size)):
            visible = (m > 0.5) & src_close & (src_labels == NAMES.index(obj.color))  # not hidden by another
            if visible.any():
                kept.append((labels[visible] == NAMES.index(obj.color)).mean())
    return float(np.mean(kept)), float(np.mean(mae))


def caption_reading(pipe, n: int, steps: int, size: int = 64) -> tuple[float, float]:
    """(share of object-coloured pixels in the caption's colours, the same share for an unrelated scene)."""
    rng = np.random.default_rng(778)
    named, unrelated = [], []
    for i in range(n):
        a, b, c = world.random_scene(rng), world.random_scene(rng), world.random_scene(rng)
        prompt = TWO_SCENES_PROMPT.format(right=world.caption(b))
        with warnings.catch_warnings():  # long two-scene captions are cut to T5's length, as in training
            warnings.simplefilter("ignore")
            out = pipe.edit(world.render(a, size), "-", width=size, steps=steps, seed=i, template=prompt, progress=False)
        labels, close = palette_labels(out)
        if close.sum() < 20:  # nothing object-coloured at all
            continue
        for scene, acc in ((b, named), (c, unrelated)):
            colours = [NAMES.index(o.color) for o in scene.objects]
            acc.append(np.isin(labels[close], colours).mean())
    return float(np.mean(named)), float(np.mean(unrelated))


@torch.no_grad()
def inpaint(pipe, image: Image.Image, mask: torch.Tensor, prompt: str, seed: int, steps: int,
            guidance: float = 50.0) -> Image.Image:
    """The base as FLUX Fill on any hole: the diptych [image | image], generated where mask
    [1, 1, H, 2W] is 1, under `prompt` as given (no template); returns the right half."""
    with warnings.catch_warnings():  # long captions are cut to T5's length, as in training
        warnings.simplefilter("ignore")
        job = pipe.prepare(image, prompt, image.width, template="{instruction}", mask=mask)
    state = pipe.sample(job, pipe.initial_state(job, [seed], steps), guidance, progress=False)
    return pipe.decode(state.x, job)[0]


def shape_drawing(pipe, n: int, steps: int) -> dict[str, float]:
    """Per prompt form, the share of n held-out additions whose new object the base draws as asked."""
    from mini_world.check import check_edit
    from mini_world.judged import heldout_examples
    adds = [ex for ex in heldout_examples(n) if ex.record.edit_type == "add"]
    drawn = {}
    for name, template in (("second scene", TWO_SCENES_PROMPT.format(right="{instruction}")),
                           ("same scene", SAME_SCENE_PROMPT.format(caption="{instruction}")),
                           ("in place", None)):
        ok = []
        for i, ex in enumerate(adds):
            caption = world.caption(ex.record.target)
            if template is None:  # the target twice, the right half and the new object's box on the left hidden
                size = ex.target.width
                mask = torch.zeros(1, 1, size, 2 * size)
                mask[..., size:] = 1
                rows, cols = object_box(ex.record.target.objects[ex.record.new_obj])
                mask[..., rows, cols] = 1
                out = inpaint(pipe, ex.target, mask, SAME_SCENE_PROMPT.format(caption=caption), seed=i, steps=steps)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = pipe.edit(ex.source, caption, width=ex.source.width, steps=steps, seed=i,
                                    template=template, progress=False)
            f = check_edit(ex.record, ex.source, out).figures
            ok.append(f["shape_ok"] == 1 and f["area_ok"] == 1)
        drawn[name] = float(np.mean(ok))
    return drawn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"))
    ap.add_argument("--size", type=int, default=64, help="scene size in pixels")
    ap.add_argument("--per-type", type=int, default=20, help="held-out edits per type for the VAE ceiling")
    ap.add_argument("--n", type=int, default=40, help="scenes for the copy and caption probes")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--probes", default="vae,copy,caption,drawing")
    args = ap.parse_args(argv)
    probes = args.probes.split(",")

    pipe = ICEditPipeline.from_pretrained(args.weights)
    if "vae" in probes:
        examples = world.make_split(args.per_type * len(world.EDIT_TYPES), 0, args.size, split="heldout")
        _, scores, _ = vae_ceiling(pipe.vae, examples)
        r = summarize("ceiling", examples, scores, 0)
        print(f"VAE ceiling at {args.size} px: success {100 * r['success']:.0f}% (all but move), move "
              f"{100 * r['move']:.0f}%, done {100 * r['done']:.0f}%, preservation MAE {r['preserve_mae']:.3f}; per type: "
              + ", ".join(f"{t} {100 * v:.0f}%" for t, v in r["per_type"].items()))
    if "copy" in probes:
        kept, mae = copy_fidelity(pipe, args.n, args.steps, args.size)
        print(f"in-context copy: object pixels kept {100 * kept:.0f}%, MAE {mae:.3f}")
    if "caption" in probes:
        named, unrelated = caption_reading(pipe, args.n, args.steps, args.size)
        print(f"caption reading: {100 * named:.0f}% of object-coloured pixels in the caption's colours "
              f"({100 * unrelated:.0f}% in an unrelated scene's: what ignoring the caption gives)")
    if "drawing" in probes:
        drawn = shape_drawing(pipe, args.n, args.steps)
        print("shape drawing: the additions' new objects drawn in their colour and shape from the full caption, "
              + ", ".join(f"as {k} {100 * v:.0f}%" for k, v in drawn.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
