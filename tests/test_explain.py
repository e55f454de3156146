"""`python -m infer.explain` on the tiny random snapshot with a random LoRA-MoE: the command writes
its figure and JSON; the edit with hooks is the plain edit pixel for pixel; the attention masses
equal a plain softmax(q k^T / sqrt(D)) over the very q, k the backend got (float64, all at once);
the recorded experts equal an argmax of the router over the layer's own input; bad input is an
error that says what to pass."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from flux_minimal import ops
from flux_minimal.errors import FluxMinimalError
from flux_minimal.files import save_safetensors
from flux_minimal.flux_loading import load_flux
from flux_minimal.lora import MOE_TARGETS, add_lora, lora_parameters
from flux_minimal.lora_files import lora_state_dict
from flux_minimal.moe import LoRAMoELinear
from flux_minimal.tokenizers import T5Tokenizer
from infer.explain import explain_edit, instruction_words, main
from infer.explain_probes import attention_rows
from infer.options import REPO
from infer.pipeline import ICEditPipeline

INSTRUCTION = "make the sky purple"


@pytest.fixture(autouse=True)
def _reference_moe(monkeypatch):
    # the MoE layers take their torch reference (the kernel under the interpreter is ~20x slower and
    # has its own tests in test_lora_moe_kernel.py); the routing decision is the same `route` call
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def moe_file(snapshot, tmp_path_factory):
    """A random LoRA-MoE (4 experts, rank 4) on the tiny model's ff.net.2 and proj_out layers."""
    flux = load_flux(snapshot)
    add_lora(flux, rank=4, experts=4, targets=MOE_TARGETS, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(flux):  # B = 0 would hide the experts
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_safetensors(lora_state_dict(flux), tmp_path_factory.mktemp("moe") / "moe.safetensors")


@pytest.fixture(scope="module")
def pipe(snapshot, moe_file):
    return ICEditPipeline.from_pretrained(snapshot, lora=moe_file)


@pytest.fixture
def png(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
    img.save(tmp_path / "in.png")
    return tmp_path / "in.png"


def test_command_writes_figure_json_and_the_plain_edit(snapshot, moe_file, pipe, png, tmp_path, capsys):
    out = tmp_path / "explain"
    assert main(["--weights", str(snapshot), "--lora", str(moe_file), "--image", str(png), "--instruction", INSTRUCTION,
                 "--out", str(out), "--steps", "4", "--width", "64", "--frames", "3", "--seed", "5", "--no-progress"]) == 0
    assert "right half attends" in capsys.readouterr().out
    figure = Image.open(out / "explain.png")
    assert figure.width > 600 and figure.height > 600
    data = json.loads((out / "explain.json").read_text())
    tok = data["tokens"]
    L = tok["rows"] * tok["cols"]
    assert (tok["rows"], tok["cols"], tok["text"]) == (4, 8, 512)  # 64x128 diptych, 16-pixel tokens, T5 at 512
    assert data["attention"]["steps"] == [0, 2, 3] and len(data["attention"]["blocks"]) == 4
    rows = data["attention"]["rows"]
    assert len(rows) == 3 * 4  # every step read x every block
    for r in rows:  # each row's masses sum to 1 (float32 sums of 544 probabilities: 1e-5)
        assert abs(r["left"] + r["text"] + r["right"] - 1) <= 1e-5, r
        assert abs(r["text_instruction"] + r["text_prompt"] + r["text_padding"] - r["text"]) <= 1e-5, r
        assert len(r["words"]) == len(data["words"]) == 4 and sum(r["words"]) <= r["text_instruction"] + 1e-6
    assert [w["word"] for w in data["words"]] == INSTRUCTION.split()
    routing = data["routing"]
    assert len(routing) == 3 * 4  # steps read x MoE layers (d0, d1 img_mlp.2; s0, s1 linear2)
    region = sum(row.count("1") for row in data["region"]["mask"])
    for r in routing:  # the counts add up to the image tokens, the region's to the region
        assert sum(r["in_region"]) + sum(r["outside"]) == L and sum(r["in_region"]) == region
        assert len(r["map"]) == tok["rows"] and all(len(row) == tok["cols"] for row in r["map"])
    # the edit with hooks is the edit without them
    plain = pipe.edit(png, INSTRUCTION, width=64, steps=4, seed=5, progress=False)
    assert np.array_equal(np.asarray(Image.open(out / "edit.png")), np.asarray(plain))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_hooks_leave_the_edit_and_the_model_as_they_were(pipe, png):
    ex = explain_edit(pipe, png, INSTRUCTION, width=64, steps=3, seed=9, blocks="d1,s0", frames=2)
    plain = pipe.edit(png, INSTRUCTION, width=64, steps=3, seed=9, progress=False)
    assert np.array_equal(np.asarray(ex.result), np.asarray(plain))
    assert {r["block"] for r in ex.data["attention"]["rows"]} == {"double_blocks.1", "single_blocks.0"}
    assert ops._observer is None
    modules = [pipe.flux, *pipe.flux.double_blocks, *pipe.flux.single_blocks,
               *(m for m in pipe.flux.modules() if isinstance(m, LoRAMoELinear))]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)


def test_attention_and_routing_equal_an_independent_computation(pipe, png):
    """A capture backend sees the same rotated q, k as the probe; the reference takes the whole
    softmax in float64 and sums it with numpy masks. Tolerance 1e-5 absolute on shares in [0, 1]
    (the probe works in float32, in chunks of 7 rows). Routing: argmax of x R^T on the layer's input."""
    calls, inputs = [], {}

    def capture(q, k, v):
        calls.append((q.clone(), k.clone()))
        return ops.sdpa(q, k, v)

    layer_name = "single_blocks.1.linear2"
    layer = pipe.flux.get_submodule(layer_name)
    # (the hook returns None: the layer's output is kept)
    handle = layer.register_forward_hook(lambda m, a, out: inputs.update({len(inputs): a[0].clone()}))
    ops.register_attention_backend("capture", capture)
    ops.set_attention_backend("capture")
    try:
        ex = explain_edit(pipe, png, INSTRUCTION, width=64, steps=3, seed=4, steps_shown=[1], chunk=7, frames=1)
    finally:
        ops.set_attention_backend("sdpa")
        handle.remove()
    data, n_blocks = ex.data, 4
    T, rows, cols = data["tokens"]["text"], data["tokens"]["rows"], data["tokens"]["cols"]
    col = np.tile(np.arange(cols), rows)
    left, right = np.r_[np.zeros(T, bool), col < cols // 2], np.r_[np.zeros(T, bool), col >= cols // 2]
    text = np.r_[np.ones(T, bool), np.zeros(rows * cols, bool)]
    instr = np.zeros(T + rows * cols, bool)
    instr[[i for w in data["words"] for i in w["tokens"]]] = True
    got = {r["block"]: r for r in data["attention"]["rows"]}
    names = ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    left_maps = []
    for b, name in enumerate(names):
        q, k = (t[0].double() for t in calls[1 * n_blocks + b])  # step 1's calls, blocks in order
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).mean(0).numpy()[right]  # [Q, N]
        want = {"left": p[:, left].sum(1).mean(), "text": p[:, text].sum(1).mean(), "right": p[:, right].sum(1).mean(),
                "text_instruction": p[:, instr].sum(1).mean()}
        for key, value in want.items():
            assert abs(got[name][key] - value) <= 1e-5, (name, key, got[name][key], value)
        for j, w in enumerate(data["words"]):
            assert abs(got[name]["words"][j] - p[:, w["tokens"]].sum(1).mean()) <= 1e-5
        left_maps.append(p[:, left].sum(1))
    want_map = np.mean(left_maps, 0).reshape(rows, cols // 2)
    assert np.abs(np.array(data["attention"]["maps"][0]["left"]) - want_map).max() <= 1e-5

    x = inputs[1]  # the layer's input at step 1 (one call per step)
    expert = (x[0, T:].double() @ layer.lora_route.double().T).argmax(-1).numpy()
    recorded = [r for r in data["routing"] if r["layer"] == layer_name]
    assert len(recorded) == 1 and recorded[0]["step"] == 1
    assert "".join(recorded[0]["map"]) == "".join(str(e) for e in expert)


def test_attention_rows_in_chunks_equal_one_softmax():
    """The chunked float32 sums against one float64 softmax, odd sizes. Tolerance 1e-6."""
    g = torch.Generator().manual_seed(0)
    H, N, D, T = 3, 37, 8, 5
    q, k = torch.randn(H, N, D, generator=g) * 2, torch.randn(H, N, D, generator=g) * 2
    queries = torch.tensor([5, 9, 11, 20, 21, 22, 30, 36])
    groups = torch.randint(0, 3, (N,), generator=g)
    mass, text = attention_rows(q, k, queries, groups, T, chunk=3)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), -1).mean(0)[queries]
    want = torch.stack([p[:, groups == i].sum(1) for i in range(3)], 1)
    assert (mass.double() - want).abs().max() <= 1e-6 and (text.double() - p[:, :T]).abs().max() <= 1e-6
    assert (mass.sum(1) - 1).abs().max() <= 1e-6


def test_words_join_t5_pieces_and_lose_what_t5_cuts():
    tok = T5Tokenizer(REPO / "assets" / "mini" / "tokenizer_2" / "spiece.model", max_length=48)
    prompt = "A diptych. On the right, the same but make the side-by-side cat blue."
    instruction = "make the side-by-side cat blue."
    words, cut, n = instruction_words(tok, prompt, instruction)
    ids = tok.encode(prompt)
    assert [w["word"] for w in words] == instruction.split() and cut == [] and n == len(ids) + 1
    for w in words:  # the pieces join back into the word
        assert "".join(tok.sp.id_to_piece(ids[i]) for i in w["tokens"]).lstrip("▁") == w["word"]
    kept = len(ids) - 3  # T5 keeps max_length - 1 pieces, then </s>
    words2, cut2, _ = instruction_words(T5Tokenizer(tok.path, max_length=kept + 1), prompt, instruction)
    want = [(w["word"], [i for i in w["tokens"] if i < kept]) for w in words]
    assert [(w["word"], w["tokens"]) for w in words2] == [x for x in want if x[1]]
    assert cut2 == [x[0] for x in want if not x[1]] and cut2  # the last word lost every piece


def test_region_from_a_box(pipe, png):
    ex = explain_edit(pipe, png, INSTRUCTION, width=64, steps=1, blocks="d0", frames=1, region=(0, 0, 32, 32))
    assert ex.data["region"]["mask"] == ["1100", "1100", "0000", "0000"]  # the top-left 2x2 tokens of 16 px
    assert all(sum(r["in_region"]) == 4 for r in ex.data["routing"])


@pytest.mark.parametrize("args, message", [
    (["--blocks", "d7"], "double blocks d0..d1"),
    (["--blocks", "x"], "not 'all', 'double', 'single'"),
    (["--steps-shown", "9"], r"numbered 0..3"),
    (["--region", "5,5,2,9"], "x0 < x1"),
    (["--frames", "0"], "at least 1"),
])
def test_bad_input_is_a_clear_error(snapshot, png, tmp_path, args, message):
    with pytest.raises(FluxMinimalError, match=message):
        main(["--weights", str(snapshot), "--image", str(png), "--instruction", "x", "--out", str(tmp_path / "o"),
              "--steps", "4", "--width", "64", *args])


def test_out_must_be_a_folder(snapshot, png, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FluxMinimalError, match="not a folder"):
        main(["--weights", str(snapshot), "--image", str(png), "--instruction", "x", "--out", str(tmp_path / "file")])
