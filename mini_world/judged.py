"""What the long adapter stage is judged on: removal, addition, colour and background edits on
scenes of 1-3 objects, drawn from the world's held-out stream (the curve's 8 per type, the
ablation's `--world judged` 20 per type: the first ones are the same scenes)."""

import numpy as np

from mini_world import world
from mini_world.quick import SIZE

JUDGED_TYPES = ("remove", "add", "color", "background")
JUDGED_MAX_OBJECTS = 3  # the held-out scenes the curve and the table judge


def draw(rng: np.random.Generator, edit_type: str, max_objects: int) -> world.EditExample:
    """One edit pair of `edit_type` on a scene of 1..max_objects objects, rendered at SIZE."""
    record = world.make_edit_record(rng, edit_type, int(rng.integers(1, max_objects + 1)))
    return world.EditExample(world.render(record.source, SIZE), world.render(record.target, SIZE),
                             record.instruction, record)


def heldout_examples(per_type: int, seed: int = 0) -> list[world.EditExample]:
    stream = world.SPLIT_STREAMS["heldout"]
    return [draw(np.random.default_rng([stream, seed, 7919, i]), t, JUDGED_MAX_OBJECTS)
            for i in range(per_type) for t in JUDGED_TYPES]
