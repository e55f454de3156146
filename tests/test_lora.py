"""LoRA and LoRA-MoE on our fused, BFL-named model against diffusers + peft (the official stack).

Tolerance: fp32, relative error <= 1e-5 (same maths, different op order and fusion).
"""

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from flux_minimal import PRESETS, WeightsError, load_flux
from flux_minimal.flux_keys import diffusers_name, diffusers_target
from flux_minimal.lora import (MOE_TARGETS, OFFICIAL_TARGETS, add_lora, expand_targets, lora_layers, merge_lora,
                               unmerge_lora)
from flux_minimal.lora_files import load_lora, lora_state_dict, official_state_dict
from tests.helpers import randomize_, rel_err
from tests.test_mmdit import diffusers_flux, inputs, run_diffusers, run_ours

RANK = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    p = PRESETS["tiny-fill"].flux
    ref = randomize_(diffusers_flux(p), std=0.2).eval()
    folder = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(folder)
    return p, folder


def diffusers_with_lora(p, folder, targets):
    """The base model read back by diffusers, with a random peft LoRA on the given targets."""
    ref = FluxTransformer2DModel.from_pretrained(folder).eval()
    regex = "|".join(re.escape(t).replace(r"\{i\}", r"\d+") for t in targets)  # peft: a str is a full-match regex
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=f"^({regex})$", init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in ref.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return ref


def test_table_round_trip():
    for name in ["x_embedder", "transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_mlp",
                 "transformer_blocks.0.attn.add_v_proj", "norm_out.linear", "single_transformer_blocks.1.proj_out"]:
        t = diffusers_target(name)
        assert diffusers_name(t.module, t.part) == name
    assert diffusers_target("single_transformer_blocks.4.proj_mlp").module == "single_blocks.4.linear1"
    assert diffusers_target("single_transformer_blocks.4.proj_mlp").part == 3


def test_official_lora_matches_diffusers_peft(base, tmp_path):
    """Random LoRA on every official target, saved by diffusers in the official layout, loaded by
    diffusers/peft on one side and by us (onto fused qkv / linear1 row blocks) on the other."""
    p, folder = base
    ref = diffusers_with_lora(p, folder, OFFICIAL_TARGETS)
    ref.save_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    ours = load_flux(folder)
    layers = load_lora(ours, tmp_path)  # the folder: picks pytorch_lora_weights.safetensors
    assert "double_blocks.1.img_attn.qkv" in layers and "single_blocks.0.linear1" in layers
    assert len(layers["single_blocks.0.linear1"].lora_A) == 4  # q, k, v, mlp
    assert not any("txt" in n for n in layers)  # nothing on the text stream
    x = inputs(p)
    err = rel_err(run_ours(ours, x), run_diffusers(ref, x))
    assert err <= 1e-5, err

    # the other way: our official export equals diffusers' own file, key for key
    from safetensors.torch import load_file
    # (the model-level save has no `transformer.` prefix; the pipeline's save_lora_weights, which
    # made the released files, adds it; our loader takes both)
    theirs = {"transformer." + k: v for k, v in load_file(tmp_path / "pytorch_lora_weights.safetensors").items()}
    exported = official_state_dict(ours)
    assert sorted(exported) == sorted(theirs)
    for k in theirs:
        assert torch.allclose(exported[k], theirs[k], atol=1e-7), k


def test_lora_scale_and_text_stream_and_final_norm(base, tmp_path):
    """A LoRA on the text stream (add_q_proj, to_add_out) and on norm_out.linear (the swapped halves),
    at scale 0.5; diffusers/peft reproduces the scale with set_adapters weights."""
    p, folder = base
    targets = ["transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
               "transformer_blocks.{i}.attn.to_add_out", "norm_out.linear", "context_embedder"]
    ref = diffusers_with_lora(p, folder, targets)
    ref.save_lora_adapter(tmp_path, weight_name="l.safetensors")
    ref.set_adapters(["default"], weights=[0.5])
    ours = load_flux(folder)
    load_lora(ours, tmp_path / "l.safetensors", scale=0.5)
    x = inputs(p)
    assert rel_err(run_ours(ours, x), run_diffusers(ref, x)) <= 1e-5


def test_merge_unmerge(base, tmp_path):
    p, folder = base
    ours = load_flux(folder)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    add_lora(ours, rank=RANK)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for B in layer.lora_B.values():
                B.normal_(0, 0.3)
    x = inputs(p)
    unmerged = run_ours(ours, x)
    merge_lora(ours)
    assert rel_err(run_ours(ours, x), unmerged) <= 1e-5  # merged equals unmerged output
    assert not torch.equal(ours.img_in.weight, before["img_in.weight"])
    unmerge_lora(ours)
    for k, v in before.items():
        assert torch.allclose(ours.state_dict()[k], v, rtol=0, atol=1e-6), k
    assert rel_err(run_ours(ours, x), unmerged) <= 1e-6


class OfficialMoELinear(nn.Module):
    """The official MoE-LoRA layer, written out directly (dense over experts, masked): logits =
    x R^T, keep the top-k (k = 1), softmax over the kept, y = base(x) + sum_i w_i s B_i(A_i x)."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, k: int = 1):
        super().__init__()
        self.base, self.A, self.B, self.R, self.k = base, A, B, R, k

    def forward(self, x):
        logits = x @ self.R.T  # [..., E]
        top, idx = torch.topk(logits, self.k, dim=-1)
        w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        out = self.base(x)
        for i in range(self.A.shape[0]):  # every expert for every token, then masked by w
            out = out + w[..., i:i + 1] * ((x @ self.A[i].T) @ self.B[i].T)
        return out


def moe_file_and_reference(p, folder, tmp_path, experts):
    """A tiny MoE-LoRA file in the official key layout (plain LoRA elsewhere) and the reference."""
    plain = [t for t in OFFICIAL_TARGETS if t not in MOE_TARGETS]
    ref = diffusers_with_lora(p, folder, plain)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(ref).items()}
    g = torch.Generator().manual_seed(2)
    for name in expand_targets(load_flux(folder), MOE_TARGETS):
        lin = ref.get_submodule(name)
        A = torch.randn(experts, RANK, lin.in_features, generator=g) * 0.3
        B = torch.randn(experts, lin.out_features, RANK, generator=g) * 0.3
        R = torch.randn(experts, lin.in_features, generator=g)
        for e in range(experts):
            state[f"transformer.{name}.lora_A.expert_{e}.weight"] = A[e].contiguous()
            state[f"transformer.{name}.lora_B.expert_{e}.weight"] = B[e].contiguous()
        state[f"transformer.{name}.lora_route.weight"] = R
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, OfficialMoELinear(lin, A, B, R))
    save_file(state, tmp_path / "moe.safetensors")
    return ref


@pytest.mark.parametrize("experts", [4, 1])
def test_moe_lora_matches_official_layer(base, tmp_path, experts):
    p, folder = base
    ref = moe_file_and_reference(p, folder, tmp_path, experts)
    ours = load_flux(folder)
    layers = load_lora(ours, tmp_path / "moe.safetensors")
    assert layers["double_blocks.0.img_mlp.2"].is_moe and layers["single_blocks.1.linear2"].is_moe
    assert layers["double_blocks.0.img_mlp.2"].lora_A["experts"].shape == (experts, RANK, 4 * p.hidden_size)
    x = inputs(p)
    err = rel_err(run_ours(ours, x), run_diffusers(ref, x))
    assert err <= 1e-5, err
    # and back out: our export is loadable and gives the same model
    save_file(official_state_dict(ours), tmp_path / "again.safetensors")
    again = load_flux(folder)
    load_lora(again, tmp_path / "again.safetensors")
    assert rel_err(run_ours(again, x), run_diffusers(ref, x)) <= 1e-5


def test_our_format_round_trip(base, tmp_path):
    p, folder = base
    ours = load_flux(folder)
    add_lora(ours, rank=RANK, experts=3, alpha=8.0, seed=3)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for B in layer.lora_B.values():
                B.normal_(0, 0.3)
    save_file({k: v.contiguous() for k, v in lora_state_dict(ours).items()}, tmp_path / "ours.safetensors")
    again = load_flux(folder)
    load_lora(again, tmp_path / "ours.safetensors")
    x = inputs(p)
    assert rel_err(run_ours(again, x), run_ours(ours, x)) <= 1e-6
    # alpha != rank: the official export folds alpha / r into B and stays equivalent
    save_file(official_state_dict(ours), tmp_path / "off.safetensors")
    third = load_flux(folder)
    load_lora(third, tmp_path / "off.safetensors")
    assert rel_err(run_ours(third, x), run_ours(ours, x)) <= 1e-6


def test_errors(base, tmp_path):
    p, folder = base
    ours = load_flux(folder)
    D = p.hidden_size
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "transformer.x_embedder.lora_A.weight": torch.zeros(4, 384)}, tmp_path / "te.safetensors")
    with pytest.raises(WeightsError, match=r"not LoRA weights of the FLUX transformer.*text_encoder\.text_model"):
        load_lora(ours, tmp_path / "te.safetensors")
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(D, 4)}, tmp_path / "dev.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit img_in .*384 inputs.*FLUX.1 Fill"):
        load_lora(ours, tmp_path / "dev.safetensors")  # a LoRA for FLUX.1 [dev] (64 input channels)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, D),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(D, 8)}, tmp_path / "r.safetensors")
    with pytest.raises(WeightsError, match=r"A \[4, 64\] and B \[64, 8\] do not fit double_blocks\.0\.img_attn\.qkv"):
        load_lora(ours, tmp_path / "r.safetensors")  # rank mismatch
    save_file({"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(4, D),
               "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(D, 4)}, tmp_path / "d.safetensors")
    with pytest.raises(WeightsError, match=r"no module 'double_blocks\.5\.img_attn\.qkv'"):
        load_lora(ours, tmp_path / "d.safetensors")  # a deeper model's LoRA
