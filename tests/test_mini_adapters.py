"""The mini model's long adapter stage (mini_world/adapters.py) at a toy scale: exact resume of an
adapter-only run, the curriculum, the token weights, the curve and the export."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux_minimal.errors import FluxMinimalError
from flux_minimal.flux_loading import load_flux
from flux_minimal.lora_files import load_lora
from mini_world import adapters as A
from mini_world import world
from mini_world.check import check_edit
from mini_world.quick import encode

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "assets" / "mini"


@pytest.fixture(autouse=True)
def toy_scale(monkeypatch):
    """Pools of 12 pairs, a new phase and pool every 2 steps, an evaluation every 2 steps on one
    edit per type; the MoE layers on the torch reference, as on a user's CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(A, "POOL_PAIRS", 12)
    monkeypatch.setattr(A, "POOL_STEPS", 2)
    monkeypatch.setattr(A, "BATCH", 4)
    monkeypatch.setattr(A, "EVAL_EVERY", 2)
    monkeypatch.setattr(A, "EVAL_PER_TYPE", 1)
    monkeypatch.setattr(A, "README_SEEDS", 1)
    monkeypatch.setattr(A, "WARMUP_STEPS", 2)
    monkeypatch.setattr(A, "CURRICULUM", (A.Phase(0, 1, ("color",)), A.Phase(2, 2, A.JUDGED_TYPES)))


def _run(folder: Path, *extra: str) -> None:
    assert A.main(["--run", str(folder), "--no-compile", "--adapter", "moe", *extra]) == 0


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = folder / (folder / "latest").read_text().strip()
    return load_file(ckpt / "model.safetensors")


@pytest.mark.slow
def test_split_run_equals_straight_run_and_exports(tmp_path):
    """4 steps at once, and 2 + 2 in two processes' worth of calls: the same adapter, EMA and AdamW
    state, bit for bit; only adapter tensors are checkpointed; one curve point per evaluation."""
    _run(tmp_path / "straight", "--steps", "4")
    _run(tmp_path / "split", "--steps", "2")
    _run(tmp_path / "split", "--steps", "4")
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".lora_" in k for k in a), "base weights were checkpointed"
    assert sum(v.numel() for v in a.values()) < 3e6
    curve = [json.loads(line) for line in (tmp_path / "split" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [2, 4] and [p["phase"] for p in curve] == [0, 1]
    assert set(curve[-1]["success"]) == set(A.JUDGED_TYPES) and 0 <= curve[-1]["readme"] <= 1
    # the exported EMA loads into a fresh base, routed layers and all
    out = tmp_path / "lora_moe.safetensors"
    _run(tmp_path / "split", "--steps", "4", "--export", str(out))
    flux = load_flux(MINI)
    layers = load_lora(flux, out)
    assert any(layer.is_moe for layer in layers.values())
    # a run folder refuses another kind of adapter
    with pytest.raises(FluxMinimalError, match="not"):
        A.main(["--run", str(tmp_path / "split"), "--no-compile", "--adapter", "lora", "--steps", "6"])


def test_curriculum_pools_and_heldout():
    """Pools follow the phase of their first step; held-out scenes come from the other seed stream
    with 1..JUDGED_MAX_OBJECTS objects; the README example's target passes the checker."""
    first, later = A.pool_examples(0, 0), A.pool_examples(0, 1)
    assert {e.record.edit_type for e in first} == {"color"} and all(len(e.record.source.objects) == 1 for e in first)
    assert {e.record.edit_type for e in later} == set(A.JUDGED_TYPES)
    assert max(len(e.record.source.objects) for e in later) == 2
    assert A.pool_examples(0, 1)[3].instruction == later[3].instruction  # a function of (seed, k)
    held = A.heldout_examples(3)
    train = {e.record.to_dict().__repr__() for e in A.pool_examples(0, 1)}
    assert not any(e.record.to_dict().__repr__() in train for e in held)
    ex = A.readme_example()
    assert check_edit(ex.record, ex.source, ex.target).success
    assert not check_edit(ex.record, ex.source, ex.source).success


def test_token_weights_put_the_edit_first():
    """The left half weighs LEFT_WEIGHT, the right 1, and the right's changed tokens 1 + CHANGED_WEIGHT."""
    from flux_minimal.text import PromptEncoder
    from flux_minimal.vae import load_vae
    ex = A.draw(np.random.default_rng(3), "color", 1)
    data = encode(load_vae(MINI / "ae.safetensors"), PromptEncoder.from_pretrained(MINI), [ex])
    w = A.token_weights(data, torch.tensor([0]))[0].view(8, 16)  # 64x128 diptych, 4x VAE, 2x2 tokens
    assert torch.all(w[:, :8] == A.LEFT_WEIGHT)
    changed = data["changed"][0].view(8, 16)
    assert changed[:, 8:].any() and not changed[:, :8].any()  # the edit is on the right only
    assert torch.all(w[:, 8:][changed[:, 8:]] == 1 + A.CHANGED_WEIGHT)
    assert torch.all(w[:, 8:][~changed[:, 8:]] == 1)


def test_tinted_phase_recolours_both_sides_alike_and_weights_its_types(monkeypatch):
    """A phase with tints and a repeated type: pair i is the pair an untinted phase draws (same
    record), a share of them recoloured by one map on both sides (so the unchanged pixels stay equal
    and the changed ones are the same), and a type named twice is drawn twice as often."""
    monkeypatch.setattr(A, "POOL_PAIRS", 60)
    types = ("remove", "add", "color", "add")
    monkeypatch.setattr(A, "CURRICULUM", (A.Phase(0, 2, types), A.Phase(2, 2, types, tint=0.5)))
    plain, tinted = A.pool_examples(0, 0), A.pool_examples(0, 1)
    counts = {t: sum(e.record.edit_type == t for e in tinted) for t in set(types)}
    assert counts == {"remove": 15, "add": 30, "color": 15}
    same_draw = A.pool_examples(0, 1)
    assert [e.record for e in same_draw] == [e.record for e in tinted]  # a function of (seed, k)
    recoloured = 0
    for ex in tinted:
        src, tgt = (np.asarray(im, np.int16) for im in (ex.source, ex.target))
        clean = [np.asarray(world.render(scene, A.SIZE), np.int16) for scene in (ex.record.source, ex.record.target)]
        if np.array_equal(src, clean[0]):
            assert np.array_equal(tgt, clean[1])
            continue
        recoloured += 1
        moved, moved_clean = (src != tgt).any(-1), (clean[0] != clean[1]).any(-1)
        assert not (moved & ~moved_clean).any()  # nothing the edit leaves alone changes
        assert moved.sum() >= 0.95 * moved_clean.sum()  # what it changes still changes (clipping may merge a few)
        assert 0 < np.abs(src - clean[0]).max() <= 255
    assert 15 <= recoloured <= 45  # tint=0.5 of 60 pairs, by their own generators
    assert [e.instruction for e in plain] != [e.instruction for e in tinted]  # another pool, other pairs
