"""The MM-DiT against diffusers' FluxTransformer2DModel, for every accepted checkpoint layout.

Tolerances: fp32 parity 1e-5 relative (same maths, different op order); bf16 within 2x the error
diffusers itself makes in bf16 against its own fp32 output (the inherent bf16 error), + 1e-3.
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from flux_minimal import PRESETS, Flux, FluxParams, load_flux
from flux_minimal.flux_keys import FLUX_FROM_DIFFUSERS
from flux_minimal.loading import split_by_rules
from tests.helpers import randomize_, rel_err


def diffusers_flux(p: FluxParams) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim)


def inputs(p: FluxParams, B=2, h=3, w=4, T=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = h * w
    img_ids = torch.zeros(B, L, 3)
    img_ids[..., 1] = torch.arange(h).repeat_interleave(w)
    img_ids[..., 2] = torch.arange(w).repeat(h)
    return dict(img=torch.randn(B, L, p.in_channels, generator=g, dtype=dtype), img_ids=img_ids,
                txt=torch.randn(B, T, p.context_in_dim, generator=g, dtype=dtype), txt_ids=torch.zeros(B, T, 3),
                timesteps=torch.tensor([0.3, 0.9][:B], dtype=dtype), y=torch.randn(B, p.vec_in_dim, generator=g,
                dtype=dtype), guidance=torch.tensor([50.0, 30.0][:B], dtype=dtype))


def run_diffusers(model: FluxTransformer2DModel, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"]).sample


def run_ours(model: Flux, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random tiny diffusers model and its sharded save_pretrained folder."""
    p = PRESETS["tiny-fill"].flux
    ref = randomize_(diffusers_flux(p), std=0.2).eval()
    folder = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(folder, max_shard_size="100KB")
    return p, ref, folder


def test_tiny_diffusers_sharded_folder(tiny_pair):
    p, ref, folder = tiny_pair
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_flux(folder)
    assert ours.params == p
    x = inputs(p)
    err = rel_err(run_ours(ours, x), run_diffusers(ref, x))
    assert err <= 1e-5, err


def test_export_to_diffusers_layout(tiny_pair):
    """split_by_rules inverts the key table: our model's tensors, split back into diffusers' names
    and shapes, load strictly into FluxTransformer2DModel and give the same output bit for bit
    (the benchmark builds its diffusers twin this way)."""
    p, ref, folder = tiny_pair
    ours = load_flux(folder)
    twin = diffusers_flux(p).eval()
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    twin.load_state_dict(split_by_rules(ours.state_dict(), FLUX_FROM_DIFFUSERS, shapes))
    x = inputs(p)
    assert torch.equal(run_diffusers(twin, x), run_diffusers(ref, x))


def test_tiny_snapshot_root_and_bfl_file(tiny_pair, tmp_path):
    """A snapshot root with transformer/ loads the same; so does a BFL single file (also with the
    ComfyUI prefix) written from it, with the configuration inferred from the shapes."""
    p, ref, folder = tiny_pair
    root = tmp_path / "snapshot"
    root.mkdir()
    (root / "transformer").symlink_to(folder)
    ours = load_flux(root)
    x = inputs(p)
    expect = run_diffusers(ref, x)
    assert rel_err(run_ours(ours, x), expect) <= 1e-5

    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file(state, tmp_path / "flux1-fill-dev.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, tmp_path / "comfy.safetensors")
    for f in ("flux1-fill-dev.safetensors", "comfy.safetensors"):
        bfl = load_flux(tmp_path / f)
        assert bfl.params == p, f
        assert rel_err(run_ours(bfl, x), expect) <= 1e-5, f


def test_dev_model_without_guidance(tmp_path):
    p = FluxParams(**{**PRESETS["tiny-dev"].flux.__dict__, "guidance_embed": False})
    ref = randomize_(diffusers_flux(p)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_flux(tmp_path)
    x = inputs(p)
    x["guidance"] = None
    err = rel_err(run_ours(ours, x), run_diffusers(ref, x))
    assert err <= 1e-5, err


def test_bf16_forward(tiny_pair):
    """Ours in bf16 is as close to fp32 as diffusers in bf16 is (within 2x + 1e-3)."""
    p, ref, folder = tiny_pair
    x = inputs(p)
    gold = run_diffusers(ref, x)
    ours16 = load_flux(folder, dtype=torch.bfloat16)
    assert ours16.img_in.weight.dtype == torch.bfloat16
    ref16 = diffusers_flux(p).to(torch.bfloat16)
    ref16.load_state_dict(ref.state_dict())
    x16 = {k: (v.to(torch.bfloat16) if k not in ("img_ids", "txt_ids") else v) for k, v in x.items()}
    err_ours = rel_err(run_ours(ours16, x16).float(), gold)
    err_ref = rel_err(run_diffusers(ref16.eval(), x16).float(), gold)
    assert err_ours <= 2 * err_ref + 1e-3, (err_ours, err_ref)


@pytest.mark.slow
def test_full_width_blocks_with_diffusers_converter(tmp_path):
    """One double and one single block at the real width (3072, 24 heads, head_dim 128, rope axes
    16/56/56), written as a BFL single file; diffusers' own single-file converter gives the
    reference model. Checks our BFL names and remap table against an independent converter."""
    p = FluxParams(in_channels=384, vec_in_dim=32, context_in_dim=64, depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        skeleton = Flux(p)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in skeleton.state_dict().items():
        t = torch.randn(v.shape, generator=g) * (0.02 if v.ndim == 2 else 0.1)
        state[k] = t + 1.0 if k.endswith(".scale") else t
    path = tmp_path / "flux1-fill-dev.safetensors"
    save_file(state, path)

    ours = load_flux(path)
    assert ours.params.axes_dim == (16, 56, 56) and ours.params.num_heads == 24
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    del state
    with torch.device("meta"):
        ref = diffusers_flux(p)
    ref.load_state_dict(converted, strict=True, assign=True)
    del converted
    x = inputs(p, B=1, h=2, w=3, T=5)
    err = rel_err(run_ours(ours, x), run_diffusers(ref.eval(), x))
    assert err <= 1e-5, err


def test_gradient_checkpointing_same_gradients(tiny_pair):
    p, _, folder = tiny_pair
    model = load_flux(folder).train()
    for prm in model.parameters():
        prm.requires_grad_(True)
    x = inputs(p)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(**x).square().mean().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-6
