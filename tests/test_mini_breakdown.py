"""mini_world/breakdown.py: the judged edits counted by what their scenes hold, scored by the checker."""

from mini_world import breakdown as B
from mini_world.check import check_edit
from mini_world.judged import JUDGED_TYPES, heldout_examples


def test_breakdown_counts_each_edit_under_its_own_features():
    """Targets pass and unchanged sources fail (the checker's own guarantee), so with every other
    edit left undone each type reads 1/2, the undone ones count as "edit not made", and each factor
    table files every edit under the features of the object it names."""
    examples = heldout_examples(2)
    records = [ex.record for ex in examples]
    scores = [check_edit(ex.record, ex.source, ex.target if k < len(JUDGED_TYPES) else ex.source)
              for k, ex in enumerate(examples)]
    table = B.breakdown(records, scores)
    for t in JUDGED_TYPES:
        assert f"| {t} | 1/2 | 1 | 0 |" in table
    for ex in examples:
        f, r = B.factors(ex.record), ex.record
        assert f["objects"] == str(len(r.source.objects)) and f["style"] == r.source.background.style
        if r.edit_type == "add":
            assert f["shape"] == r.target.objects[r.new_obj].shape and f["location"] == (r.params["location"] or "-")
        elif r.edit_type == "background":
            assert f["shape"] == f["size"] == f["location"] == "-"
        else:
            assert (f["shape"], f["size"]) == (r.source.objects[r.obj].shape, r.source.objects[r.obj].size)
    shape_rows = table.split("| shape |")[1].split("\n\n")[0]
    assert sum(int(c.split("/")[1]) for line in shape_rows.splitlines()[2:] for c in line.split("|")[2:-1] if c.strip()) == 8
