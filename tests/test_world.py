"""The shapes world (mini_world/world.py) and its edit checker (mini_world/check.py).

The checker is the oracle judge of the miniature ICEdit, so it is held to both sides: the ground
truth target passes with a near-perfect score and every unchanged source fails, for every edit type,
at 64 and 128 px; mildly degraded targets still pass; targets of a different edit fail.
"""

import dataclasses
import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flux_minimal.icedit import IC_PROMPT
from mini_world.world import (EDIT_TYPES, SHAPES, Obj, Scene, _fits, caption, make_edit, make_edit_record, make_split,
                         object_masks, random_scene, read_pairs_folder, render, shape_coverage, unit_area, vocabulary,
                         world_text_corpus, write_pairs_folder)
from mini_world.check import check_edit

SEEDS = {64: 24, 128: 8}  # random edits per type and size: ~1,700 checks in all, ~20 s


def _edits(size: int, edit_type: str, stream: int = 7):
    return [make_edit(np.random.default_rng([stream, size, k]), edit_type, size) for k in range(SEEDS[size])]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(img: Image.Image, sigma: float = 4.0, seed: int = 0) -> Image.Image:
    a = np.asarray(img, np.float32) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def _verbose(ex, score) -> str:
    return f"{ex.record.edit_type} {ex.instruction!r} on {caption(ex.record.source)!r}: {score}"


# --- the world ------------------------------------------------------------------------------------


def test_determinism_and_splits():
    a, b = make_split(14, seed=3), make_split(14, seed=3)
    assert [x.record for x in a] == [x.record for x in b]
    assert all(x.source.tobytes() == y.source.tobytes() and x.target.tobytes() == y.target.tobytes() for x, y in zip(a, b))
    assert [x.record for x in make_split(7, seed=3)] == [x.record for x in a[:7]]  # a split is a prefix of a longer one
    assert [x.record.edit_type for x in a] == list(EDIT_TYPES) * 2  # types in turn
    other, held = make_split(14, seed=4), make_split(14, seed=3, split="heldout")
    assert not {x.record.instruction + caption(x.record.source) for x in a} & {
        x.record.instruction + caption(x.record.source) for x in other + held}
    s1, s2 = random_scene(np.random.default_rng(5)), random_scene(np.random.default_rng(5))
    assert s1 == s2 and render(s1).tobytes() == render(s2).tobytes()


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_render_sizes(size):
    scene = random_scene(np.random.default_rng(1), n_objects=4)
    img = render(scene, size)
    assert img.mode == "RGB" and img.size == (size, size)
    masks = object_masks(scene, size)
    assert masks.shape == (len(scene.objects), size, size)
    assert masks.min() >= 0 and masks.sum(0).max() <= 1 + 1e-6  # visible coverage: occlusion applied
    for o, m in zip(scene.objects, masks):  # each object shows at least ~80% of its area
        assert m.sum() >= 0.8 * unit_area(o.shape) * (o.radius * size) ** 2 * 0.95


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_templates_are_centred(shape):
    """The checker fits templates at a blob's centroid: every shape's centroid must be its centre,
    and its rendered area its true area (to the 1/4 px grid the renderer draws on)."""
    ys, xs = np.mgrid[:64, :64] + 0.5
    for cx, cy in [(40.0, 24.0), (30.3, 33.6), (21.8, 40.1)]:
        cov = shape_coverage(shape, cx, cy, 12.0, 64)
        assert abs((cov * xs).sum() / cov.sum() - cx) < 0.15 and abs((cov * ys).sum() / cov.sum() - cy) < 0.15
        assert cov.sum() == pytest.approx(unit_area(shape) * 144, rel=0.03)


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_instructions_valid_and_unambiguous(edit_type):
    vocab = vocabulary()
    for k in range(60):
        r = make_edit_record(np.random.default_rng([11, k]), edit_type)
        assert r.edit_type == edit_type and r.instruction == r.instruction.strip().lower()
        assert _words(r.instruction) <= vocab and _words(caption(r.source)) <= vocab, r.instruction
        for scene in (r.source, r.target):  # colour + shape names an object uniquely, and the scene is valid
            names = [o.name for o in scene.objects]
            assert len(names) == len(set(names)) and 1 <= len(r.source.objects) <= 4 and len(scene.objects) <= 4
            assert all(_fits(o, scene.objects[:i] + scene.objects[i + 1:]) for i, o in enumerate(scene.objects))
        if r.obj is not None:  # the instruction names the edited object, which is in the source exactly once
            assert r.source.objects[r.obj].name in r.instruction
        if edit_type == "add":
            assert r.target.objects[r.new_obj].name not in {o.name for o in r.source.objects}
        if edit_type in ("add", "replace", "color"):  # the asked-for colour is said
            assert r.target.objects[r.new_obj].color in r.instruction
        changed = r.source != r.target
        assert changed
        assert IC_PROMPT.format(instruction=r.instruction).endswith("but " + r.instruction)
        assert json.loads(json.dumps(r.to_dict())) == r.to_dict() and type(r).from_dict(r.to_dict()) == r


def test_corpus_covers_the_world():
    corpus = world_text_corpus(400, seed=0)
    assert len(corpus) == 400 and corpus == world_text_corpus(400, seed=0)
    words = set().union(*map(_words, corpus))
    assert vocabulary() <= words  # every word a caption or instruction can use
    assert _words(IC_PROMPT.format(instruction="")) <= words
    for ex in make_split(70, seed=9, split="heldout"):
        assert _words(ex.instruction) | _words(caption(ex.record.source)) | _words(caption(ex.record.target)) <= words


def test_pairs_folder_round_trip(tmp_path):
    examples = make_split(9, seed=1, size=32)
    path = write_pairs_folder(tmp_path / "ds", examples)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["source"] for line in lines[:2]] == ["src/00000.png", "src/00001.png"]
    assert set(lines[0]) == {"source", "target", "instruction", "record"}
    assert not list((tmp_path / "ds").rglob("*.tmp"))
    back = read_pairs_folder(tmp_path / "ds")
    for a, b in zip(examples, back, strict=True):
        assert (a.instruction, a.record) == (b.instruction, b.record)
        assert a.source.tobytes() == b.source.tobytes() and a.target.tobytes() == b.target.tobytes()


# --- the checker ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_checker_passes_targets_and_fails_sources(edit_type, size):
    for ex in _edits(size, edit_type):
        good = check_edit(ex.record, ex.source, ex.target)
        assert good.success and good.score >= 0.85 and good.preserve_mae < 1e-6, _verbose(ex, good)
        same = check_edit(ex.record, ex.source, ex.source)
        assert not same.done and not same.success and same.score <= 0.4, _verbose(ex, same)


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_checker_robust_to_mild_degradation(edit_type, size):
    for k, ex in enumerate(_edits(size, edit_type)):
        for name, out in [("blur r=1", ex.target.filter(ImageFilter.GaussianBlur(1))), ("jpeg q90", _jpeg(ex.target, 90)),
                          ("noise 4/255", _noise(ex.target, seed=k))]:
            score = check_edit(ex.record, ex.source, out)
            assert score.success and score.score >= 0.6, f"{name}: {_verbose(ex, score)}"


def _wrong_targets(r) -> list[tuple[str, Scene]]:
    """Targets of a nearby but different edit: each must fail as an answer to r."""
    s, t = r.source, r.target
    swap = lambda scene, i, **kw: dataclasses.replace(  # noqa: E731
        scene, objects=scene.objects[:i] + (dataclasses.replace(scene.objects[i], **kw),) + scene.objects[i + 1:])
    out = []
    if r.edit_type == "remove" and len(s.objects) > 1:
        j = (r.obj + 1) % len(s.objects)
        out.append(("removed another object", dataclasses.replace(s, objects=s.objects[:j] + s.objects[j + 1:])))
    if r.edit_type in ("color", "replace", "add"):
        o = t.objects[r.new_obj]
        wrong = next(c for c in ("red", "green", "blue", "yellow") if c != o.color and c != s.objects[r.obj or 0].color)
        out.append(("wrong colour", swap(t, r.new_obj, color=wrong)))
    if r.edit_type in ("replace", "add"):
        o = t.objects[r.new_obj]
        wrong = next(sh for sh in ("triangle", "circle", "star") if sh != o.shape and (r.obj is None or sh != s.objects[r.obj].shape))
        out.append(("wrong shape", swap(t, r.new_obj, shape=wrong)))
    if r.edit_type in ("move", "replace", "size", "color"):
        out.append(("edited object removed", dataclasses.replace(t, objects=t.objects[:r.new_obj] + t.objects[r.new_obj + 1:])))
    if r.edit_type == "move":  # moved the opposite way (when that fits)
        o, p = s.objects[r.obj], t.objects[r.new_obj]
        back = swap(t, r.new_obj, x=round(2 * o.x - p.x, 4), y=round(2 * o.y - p.y, 4))
        if _fits(back.objects[r.new_obj], t.objects[:r.new_obj] + t.objects[r.new_obj + 1:]):
            out.append(("moved the other way", back))
    if r.edit_type == "size" and s.objects[r.obj].size == "medium":
        out.append(("resized the other way", swap(t, r.new_obj, size="small" if r.params["change"] == "bigger" else "large")))
    if r.edit_type == "background":
        out.append(("objects lost", dataclasses.replace(t, objects=())))
        wrong = next(c for c in ("gray", "pink", "teal") if c not in (s.background.color, t.background.color))
        if "color" in r.params:
            out.append(("wrong background colour", dataclasses.replace(t, background=dataclasses.replace(t.background, color=wrong))))
    if r.edit_type != "background" and len(t.objects) > 1:  # the edit done, but another object lost
        j = next(j for j in range(len(t.objects)) if j != r.new_obj)
        out.append(("collateral removal", dataclasses.replace(t, objects=t.objects[:j] + t.objects[j + 1:])))
    return out


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_checker_fails_wrong_edits(edit_type):
    tried = 0
    for ex in _edits(64, edit_type, stream=8):
        for name, wrong in _wrong_targets(ex.record):
            score = check_edit(ex.record, ex.source, render(wrong, 64))
            assert not score.success, f"{name} passed: {_verbose(ex, score)}"
            tried += 1
    assert tried >= SEEDS[64]


def test_checker_rejects_mismatched_sizes():
    ex = make_edit(np.random.default_rng(0), "color", 64)
    with pytest.raises(ValueError):
        check_edit(ex.record, ex.source, ex.target.resize((32, 32)))


def test_scenes_round_trip_as_dicts():
    scene = random_scene(np.random.default_rng(2))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert isinstance(scene.objects[0], Obj)
