"""FP8 weights (flux_minimal/fp8.py) against independent references: a brute-force nearest-e4m3
search for the rounding, the bf16 model for the layers and the edit, and the quantize-after-merge
model for loading with a LoRA.

Tolerances: e4m3 keeps 3 mantissa bits, so a weight's rounding error is at most 2^-4 of its
magnitude (half a step of 2^-3), and a layer's output moves by a few percent (the errors of the K
terms of a dot product add up incoherently, like the terms themselves). Each test says its bound.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flux_minimal import WeightsError, load_flux
from flux_minimal.fp8 import FP8, FP8Linear, dequantize, linear_bytes, quantize, quantize_linears
from flux_minimal.lora import lora_layers, merge_lora
from flux_minimal.lora_files import load_lora
from tests.helpers import rel_err
from tests.test_fast import REPO

MINI = REPO / "assets" / "mini"
# Every finite e4m3 value (the 256 codes minus the two NaNs), to find nearest values by brute force.
E4M3 = torch.arange(256, dtype=torch.uint8).view(FP8).float()
E4M3 = E4M3[~E4M3.isnan()].unique()


def test_quantize_rounds_to_the_nearest_e4m3_value_per_channel():
    w = torch.randn(24, 40) * torch.logspace(-3, 2, 24)[:, None]  # rows of very different sizes
    w[3] = 0.0
    q, scale = quantize(w)
    assert q.dtype == FP8 and scale.shape == (24,) and scale[3] == 1.0
    assert torch.allclose(scale, torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 448, torch.ones(24)))
    x = w / scale[:, None]  # what is rounded
    nearest = E4M3[(x[..., None] - E4M3).abs().argmin(-1)]
    ties = ((x[..., None] - E4M3).abs().sort(-1).values[..., :2].diff(dim=-1)[..., 0] == 0)  # exact ties: either
    assert torch.equal(q.float()[~ties], nearest[~ties])
    err = (dequantize(q, scale, torch.float32) - w).abs()
    assert (err <= w.abs() * 2**-4 + scale[:, None] * 2**-10).all()  # half a step, or subnormal spacing


def test_fp8_linear_against_the_bf16_layer():
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(5, 7, 256, dtype=torch.bfloat16)
    ref = lin(x)
    (fp8,) = quantize_linears(torch.nn.Sequential(lin)).values()
    assert isinstance(fp8, FP8Linear) and fp8.weight.dtype == FP8
    assert rel_err(fp8(x).float(), ref.float()) <= 0.04  # measured ~0.02: rounding of 256 terms, incoherent


@pytest.fixture(scope="module")
def mini_pair():
    return load_flux(MINI, dtype=torch.bfloat16), load_flux(MINI, dtype=torch.bfloat16, fp8=True)


def test_loading_quantizes_every_linear_and_halves_the_bytes(mini_pair):
    bf16, fp8 = mini_pair
    assert not any(type(m) is torch.nn.Linear for m in fp8.modules())
    assert linear_bytes(fp8) <= 0.55 * linear_bytes(bf16)  # the bar (0.512 measured)
    assert fp8.compute_dtype == torch.bfloat16
    # the same FP8 weights as quantizing the model in memory, from the file's own precision
    reference = load_flux(MINI)
    layers = quantize_linears(reference)
    for name, ref in layers.items():
        got = fp8.get_submodule(name)
        assert torch.equal(got.weight.view(torch.uint8), ref.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, ref.weight_scale), name


def test_fp8_file_loads_as_it_is_and_is_refused_without_fp8(mini_pair, tmp_path):
    """A file whose weights are already e4m3 with ComfyUI's per-layer `scale_weight` (one per
    tensor) and `scaled_fp8` marker: loaded as stored; without fp8=True, a clear refusal."""
    src = load_file(str(MINI / "flux1-fill-mini.safetensors"))
    state = {}
    for k, v in src.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = v.float().abs().max() / 448
            state[k] = (v.float() / s).to(FP8)
            state[k[:-len("weight")] + "scale_weight"] = s
        else:
            state[k] = v
    state["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    path = tmp_path / "mini-fp8.safetensors"
    save_file(state, str(path))
    model = load_flux(path, dtype=torch.bfloat16, fp8=True)
    layer = model.double_blocks[0].img_attn.qkv
    assert torch.equal(layer.weight.view(torch.uint8), state["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale, state["double_blocks.0.img_attn.qkv.scale_weight"].expand(layer.out_features))
    bf16 = mini_pair[0]
    p = bf16.params
    args = dict(img=torch.randn(1, 16, p.in_channels), img_ids=torch.randn(1, 16, 3), txt=torch.randn(1, 8, p.context_in_dim),
                txt_ids=torch.zeros(1, 8, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, p.vec_in_dim),
                guidance=torch.tensor([30.0]))
    with torch.no_grad():
        assert rel_err(model(**args).float(), bf16(**args).float()) <= 0.15  # per-tensor scales: coarser
    with pytest.raises(WeightsError, match="holds FP8 weights.*fp8=True"):
        load_flux(path)


def test_plain_lora_is_merged_before_quantizing():
    """load_flux(fp8=True, lora=...) quantizes W + BA: the same bytes as merging in float32 and then
    quantizing; merging into FP8 weights afterwards is refused (it would round twice)."""
    merged = load_flux(MINI, dtype=torch.float32)
    load_lora(merged, MINI / "lora.safetensors")
    merge_lora(merged)
    quantize_linears(merged)
    fp8 = load_flux(MINI, dtype=torch.float32, fp8=True, lora=MINI / "lora.safetensors")
    for name, layer in lora_layers(merged).items():
        got = fp8.get_submodule(name)
        assert torch.equal(got.weight.view(torch.uint8), layer.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, layer.weight_scale), name
    load_lora(fp8, MINI / "lora.safetensors")  # unmerged on top: allowed, but not merged again
    with pytest.raises(WeightsError, match="round twice"):
        merge_lora(fp8)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_moe_experts_beside_an_fp8_base(monkeypatch, interpret):
    """A LoRA-MoE layer over an FP8 weight: the experts in bf16 add to the FP8 GEMM's output (the
    Triton kernels under the interpreter, or the CPU path), as the reference computes it with the
    dequantized weight."""
    from flux_kernels.lora_moe import lora_moe_linear, lora_moe_linear_ref
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(0)
    T, K, N, E, r = 40, 64, 48, 4, 8
    x = torch.randn(T, K, generator=g)
    w, b = torch.randn(N, K, generator=g) / 8, torch.randn(N, generator=g)
    A, B, R = torch.randn(E, r, K, generator=g) / 8, torch.randn(E, N, r, generator=g) / 8, torch.randn(E, K, generator=g)
    q, s = quantize(w)
    base = F.linear(x, dequantize(q, s, torch.float32), b)
    got = lora_moe_linear(x, q, b, A, B, R, scale=0.5, base_out=base.clone())
    want = lora_moe_linear_ref(x, dequantize(q, s, torch.float32), b, A, B, R, scale=0.5)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.slow
def test_mini_pipeline_fp8_edit_against_bf16(monkeypatch):
    """The four README scenes with the LoRA-MoE: the FP8 edits within 30 dB of the bf16 edits (the
    issue's bar), taken over the four (PSNR of the mean squared error); T5 in FP8 too."""
    from flux_bench.fp8 import mini_edits
    from infer.pipeline import ICEditPipeline
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the MoE's CPU path (the interpreter: minutes per edit)
    edits = mini_edits(0)
    outs = []
    for fp8 in (False, True):
        pipe = ICEditPipeline.from_pretrained(MINI, lora=MINI / "lora_moe.safetensors", dtype=torch.bfloat16, fp8=fp8)
        if fp8:
            assert any(isinstance(m, FP8Linear) for m in pipe.text.t5.modules())
            assert any(layer.is_moe and layer.fp8 for layer in lora_layers(pipe.flux).values())
        outs.append([np.asarray(pipe.edit(img, ins, width=64, progress=False), dtype=np.float64) / 255
                     for _, img, ins in edits])
    mse = np.mean([((a - b) ** 2).mean() for a, b in zip(*outs)])
    assert 10 * np.log10(1 / mse) >= 30  # measured 34.0 dB (flux_bench.fp8)


def test_t5_in_fp8_against_bf16():
    from flux_minimal.t5 import load_t5
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = load_t5(MINI / "text_encoder_2", dtype=torch.bfloat16)
    fp8 = load_t5(MINI / "text_encoder_2", dtype=torch.bfloat16, fp8=True)
    assert sum(isinstance(m, FP8Linear) for m in fp8.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in ref.modules())
    with torch.no_grad():
        assert rel_err(fp8(ids).float(), ref(ids).float()) <= 0.1  # measured 0.029
