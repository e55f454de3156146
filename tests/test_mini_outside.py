"""The edits drawn outside the world's generator (mini_world/outside.py) and their judge: the exact
edit passes, no edit fails, the wrong object or a damaged neighbour fails, and the scenes are not
the world's (another palette, no anti-aliasing)."""

import numpy as np
from PIL import Image

from mini_world import world
from mini_world.outside import Shape, draw, judge, make_edits, mask, perfect


def test_judge_passes_the_exact_edit_and_fails_the_rest():
    edits = make_edits(10, seed=3)
    assert [e.edit_type for e in edits].count("color") == 10 and [e.edit_type for e in edits].count("remove") == 10
    for e in edits:
        src = draw(e.background, e.shapes)
        assert judge(e, src, perfect(e))["success"], e
        assert not judge(e, src, src)["success"], e  # nothing changed
        assert not judge(e, src, Image.new("RGB", src.size, "white"))["success"]  # everything changed


def test_wrong_object_or_damaged_neighbour_fails():
    shapes = (Shape("circle", "red", 16, 16, 10), Shape("square", "green", 46, 44, 10))
    color = next(e for e in make_edits(20, seed=0) if e.edit_type == "color")
    e = type(color)("gray", shapes, "color", 0, "blue", "turn the red circle blue")
    src = draw(e.background, shapes)
    wrong = draw("gray", (shapes[0], Shape("square", "blue", 46, 44, 10)))  # the square turned blue instead
    both = draw("gray", (Shape("circle", "blue", 16, 16, 10), Shape("square", "blue", 46, 44, 10)))
    assert judge(e, src, perfect(e))["success"]
    assert not judge(e, src, wrong)["success"] and not judge(e, src, both)["success"]
    # half the circle blue is enough ("most of its pixels" is the README's bar; half is the floor here)
    half = np.asarray(perfect(e)).copy()
    half[:16] = np.asarray(src)[:16]
    assert judge(e, src, Image.fromarray(half))["frac"] < 0.7


def test_scenes_are_drawn_another_way_than_the_world():
    e = make_edits(1, seed=0)[0]
    src = np.asarray(draw(e.background, e.shapes)).reshape(-1, 3)
    colors = {tuple(c) for c in np.unique(src, axis=0)}
    assert len(colors) == len(e.shapes) + 1  # flat fills, no anti-aliased edge tones
    assert not colors & {tuple(c) for c in world.COLORS.values()}  # PIL's palette, not the world's
    s = e.shapes[0]
    assert mask(s, shrink=1).sum() < mask(s).sum() < mask(s, grow=2).sum()
