"""What the benchmarks share: our components and their diffusers/transformers twins holding the
same random tensors, the inputs, one timed run of each side, random LoRA files, the shape options.
The tests build their diffusers VAE twins from `diffusers_vae_config` too. A development module: it
imports diffusers and transformers (`pip install ".[test]"`), which the product never does.
"""

import argparse
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from flux_minimal import PRESETS, Flux
from flux_minimal.clip import CLIPTextModel as OurCLIP
from flux_minimal.config import AutoEncoderParams, Preset
from flux_minimal.flux_keys import FLUX_FROM_DIFFUSERS
from flux_minimal.loading import split_by_rules
from flux_minimal.ops import ATTENTION_BACKENDS
from flux_minimal.sampling import (Conditioning, DenoiseState, denoise, fill_conditioning, get_noise, get_schedule,
                                   pack, unpack)
from flux_minimal.timing import timed
from flux_minimal.t5 import T5EncoderModel as OurT5
from flux_minimal.vae import AutoEncoder
from infer.fast import GraphedDenoiser
from infer.options import EDIT


def diffusers_vae_config(p: AutoEncoderParams) -> dict:
    """AutoencoderKL's arguments for one of our VAE configurations (FLUX's vae/config.json for the default)."""
    n = len(p.ch_mult)
    return dict(in_channels=p.in_channels, out_channels=p.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(p.ch * m for m in p.ch_mult),
                layers_per_block=p.num_res_blocks, act_fn="silu", latent_channels=p.z_channels,
                norm_num_groups=p.num_groups, sample_size=1024, scaling_factor=p.scale_factor,
                shift_factor=p.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True, force_upcast=True)


@dataclass
class Models:
    """One side's components (ours, or the diffusers/transformers twins holding the same tensors)."""

    flux: torch.nn.Module
    t5: torch.nn.Module
    clip: torch.nn.Module
    vae: torch.nn.Module


def bench_preset(name: str, depth: int | None = None, single_depth: int | None = None,
                 text_layers: int | None = None) -> Preset:
    """The real FLUX.1 Fill shapes, or the tiny test shapes (CLIP widened to the DiT's pooled input),
    optionally with fewer DiT blocks and text-encoder layers (the widths stay)."""
    p = PRESETS["flux-fill-dev"] if name == "real" else PRESETS["tiny-fill"]
    if name != "real":
        p = replace(p, clip=replace(p.clip, hidden_size=p.flux.vec_in_dim))
    f = replace(p.flux, depth=p.flux.depth if depth is None else depth,
                depth_single_blocks=p.flux.depth_single_blocks if single_depth is None else single_depth)
    if text_layers is not None:
        p = replace(p, t5=replace(p.t5, num_layers=text_layers), clip=replace(p.clip, num_hidden_layers=text_layers))
    return replace(p, flux=f)


def randomized(module: torch.nn.Module, dev, dtype, std: float = 0.02) -> torch.nn.Module:
    """`module` (on the meta device or not) with random weights on `dev` in `dtype`: normal(0, std)
    matrices, norm scales 1, biases 0."""
    module = module.to_empty(device=dev)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.normal_(0, std) if t.ndim > 1 else t.fill_(1.0 if "norm" in name or "scale" in name else 0.0)
    return module.to(dtype).eval()


def our_models(p: Preset, dev, dtype, vae_dtype) -> Models:
    """Random weights (`randomized`), in `dtype`, the VAE in `vae_dtype`."""
    with torch.device("meta"):
        flux, t5, clip, vae = Flux(p.flux), OurT5(p.t5), OurCLIP(p.clip), AutoEncoder(p.ae)
    vae = randomized(vae, dev, torch.float32)
    with torch.no_grad():  # posterior std ~exp(-15): diffusers samples the VAE where we take the mean
        z = p.ae.z_channels
        vae.encoder.conv_out.weight[z:] = 0
        vae.encoder.conv_out.bias[z:] = -30.0
    return Models(*(randomized(m, dev, dtype) for m in (flux, t5, clip)), vae.to(vae_dtype))


def reference_twins(ours: Models, p: Preset) -> Models:
    """diffusers' and transformers' models holding our tensors (our key table, inverted; diffusers'
    converter for the VAE)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    f, t, c = p.flux, p.t5, p.clip
    dev = ours.flux.img_in.weight.device
    with torch.device("meta"):  # filled with our tensors below (assign=True): no second copy
        flux = FluxTransformer2DModel(patch_size=1, in_channels=f.in_channels, out_channels=f.out_channels,
                                      num_layers=f.depth, num_single_layers=f.depth_single_blocks,
                                      attention_head_dim=f.head_dim, num_attention_heads=f.num_heads,
                                      joint_attention_dim=f.context_in_dim, pooled_projection_dim=f.vec_in_dim,
                                      guidance_embeds=f.guidance_embed, axes_dims_rope=f.axes_dim)
        vae = AutoencoderKL(**diffusers_vae_config(p.ae))
    # The text encoders are built for real: they have buffers outside their state dicts (CLIP's
    # position ids) that a meta build would leave empty.
    with torch.device(dev):
        t5 = T5EncoderModel(T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
                                     num_layers=t.num_layers, num_heads=t.num_heads, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                            num_attention_heads=c.num_attention_heads, hidden_act=c.hidden_act,
                                            bos_token_id=c.vocab_size - 2, eos_token_id=c.eos_token_id))
    shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    flux.load_state_dict(split_by_rules(ours.flux.state_dict(), FLUX_FROM_DIFFUSERS, shapes), assign=True)
    t5.load_state_dict({**ours.t5.state_dict(), "encoder.embed_tokens.weight": ours.t5.state_dict()["shared.weight"]})
    theirs = set(clip.state_dict())  # transformers >= 5 drops the `text_model.` prefix
    clip.load_state_dict({k if k in theirs else k.removeprefix("text_model."): v for k, v in ours.clip.state_dict().items()})
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(ours.vae.state_dict()), diffusers_vae_config(p.ae)),
                        assign=True)
    dtype = ours.t5.shared.weight.dtype
    return Models(flux.eval(), t5.to(dtype).eval(), clip.to(dtype).eval(), vae.eval())


# ---- adapters on both sides ----------------------------------------------------------------------

def random_lora(flux: Flux, path: Path, experts: int, rank: int = 32, seed: int = 0) -> Path:
    """A random LoRA (experts = 0) or LoRA-MoE file in the official diffusers/peft layout, on ICEdit's
    targets for this model's depth: add_lora's adapters on a weightless (meta-device) twin of the
    model, given random values (A and the router ~ N(0, 1/in), B ~ N(0, 0.02^2)), then exported."""
    from safetensors.torch import save_file

    from flux_minimal.lora import add_lora, lora_layers
    from flux_minimal.lora_files import official_state_dict
    with torch.device("meta"):
        twin = Flux(flux.params)
    add_lora(twin, rank=rank, experts=experts)
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(twin).values():
        n_in = layer.in_features
        for table, std in ((layer.lora_A, n_in**-0.5), (layer.lora_B, 0.02)):
            for k, p in table.items():
                table[k] = torch.nn.Parameter(torch.randn(p.shape, generator=g) * std)
        if getattr(layer, "lora_route", None) is not None:
            layer.lora_route = torch.nn.Parameter(torch.randn(layer.lora_route.shape, generator=g) * n_in**-0.5)
    save_file({k: v.contiguous() for k, v in official_state_dict(twin).items()}, str(path))
    return path


class OfficialMoE(torch.nn.Module):
    """The official ICEdit MoE-LoRA layer's maths (every expert on every token, masked by the top-1
    routing) around a diffusers linear layer: `flux_kernels.lora_moe.lora_moe_linear_ref`."""

    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor):
        super().__init__()
        self.base, self.A, self.B, self.R = base, A, B, R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from flux_kernels.lora_moe import lora_moe_linear_ref
        return lora_moe_linear_ref(x, self.base.weight, self.base.bias, self.A, self.B, self.R)


def load_lora_both(ours: Models, theirs: Models, pipe, path: Path, merge: bool) -> str:
    """The same file on both sides; returns a one-line description."""
    from safetensors.torch import load_file

    from flux_minimal.lora import merge_lora
    from flux_minimal.lora_files import load_lora
    layers = load_lora(ours.flux, path)
    if merge:  # our weights are diffusers' tensors too (one copy): merge into copies of them
        for layer in layers.values():
            if not layer.is_moe:
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        merge_lora(ours.flux)
    state = load_file(str(path), device=str(ours.flux.img_in.weight.device))
    dtype = ours.flux.img_in.weight.dtype
    plain = {k: v.to(dtype) for k, v in state.items() if ".expert_" not in k and "lora_route" not in k}
    if plain:
        pipe.load_lora_weights(plain)
    moe = sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in state if "lora_route" in k})
    for name in moe:
        E = sum(1 for k in state if k.startswith(f"transformer.{name}.lora_A.expert_"))
        A = torch.stack([state[f"transformer.{name}.lora_A.expert_{e}.weight"] for e in range(E)]).to(dtype)
        B = torch.stack([state[f"transformer.{name}.lora_B.expert_{e}.weight"] for e in range(E)]).to(dtype)
        parent, _, child = name.rpartition(".")
        module = theirs.flux.get_submodule(parent)
        setattr(module, child, OfficialMoE(getattr(module, child), A, B, state[f"transformer.{name}.lora_route.weight"].to(dtype)))
    n_moe = sum(layer.is_moe for layer in layers.values())
    return (f"{path.name}: {len(layers) - n_moe} plain LoRA layers ({'merged' if merge else 'unmerged'} on our side), "
            f"{n_moe} MoE layers")


# ---- the two pipelines ---------------------------------------------------------------------------

@dataclass
class Inputs:
    ids_t5: torch.Tensor  # [1, 512]
    ids_clip: torch.Tensor  # [1, 77]
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1], the diptych
    mask: torch.Tensor  # [1, 1, H, W], 1 on the right half
    noise: torch.Tensor  # [1, 16, H/8, W/8]


def make_inputs(p: Preset, width: int, dev) -> Inputs:
    H, W = width, 2 * width
    mask = torch.zeros(1, 1, H, W, device=dev)
    mask[..., width:] = 1
    return Inputs(torch.randint(0, p.t5.vocab_size - 128, (1, 512), device=dev),
                  torch.randint(0, p.clip.vocab_size - 2, (1, 77), device=dev),
                  torch.rand(1, 3, H, W, device=dev) * 2 - 1, mask, get_noise([0], H, W))


def run_ours(m: Models, x: Inputs, steps: int, dev, graphed: GraphedDenoiser | None) -> tuple[dict, torch.Tensor]:
    """Seconds per stage of one edit through our pipeline's pieces, and the final latents."""
    H, W = x.image.shape[-2:]
    with torch.no_grad():
        (txt, vec), t_text = timed(lambda: (m.t5(x.ids_t5), m.clip(x.ids_clip)), dev)

        def edit():
            cond = Conditioning.of(txt, vec, fill_conditioning(m.vae, x.image, x.mask), H, W)
            state = DenoiseState(pack(x.noise).to(dev), get_schedule(steps, (H // 16) * (W // 16)))
            return (graphed.denoise if graphed else partial(denoise, m.flux))(state, cond, EDIT.guidance)
        state, t_den = timed(edit, dev)
        _, t_dec = timed(lambda: m.vae.decode(unpack(state.x, H, W)), dev)
    return {"text": t_text, "denoise": t_den, "decode": t_dec}, state.x


def run_reference(m: Models, pipe, x: Inputs, p: Preset, steps: int, dev, dtype) -> tuple[dict, torch.Tensor]:
    """The same stages through diffusers' FluxFillPipeline (text encoders called on the same ids)."""
    H, W = x.image.shape[-2:]
    with torch.no_grad():
        (pe, pooled), t_text = timed(lambda: (m.t5(x.ids_t5)[0], m.clip(x.ids_clip).pooler_output), dev)
        kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, image=(x.image + 1) / 2, mask_image=x.mask,
                  height=H, width=W, guidance_scale=EDIT.guidance, latents=pack(x.noise).to(dev, dtype), output_type="latent")
        lat, t_den = timed(lambda: pipe(num_inference_steps=steps, **kw).images, dev)
        z = unpack(lat.float(), H, W) / p.ae.scale_factor + p.ae.shift_factor
        vae_dtype = next(m.vae.parameters()).dtype
        _, t_dec = timed(lambda: m.vae.decode(z.to(vae_dtype)), dev)
    return {"text": t_text, "denoise": t_den, "decode": t_dec}, lat.float()


def reference_pipeline(m: Models):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    return FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True),
        vae=m.vae, text_encoder=m.clip, tokenizer=None, text_encoder_2=m.t5, tokenizer_2=None, transformer=m.flux)


def shape_args(ap: argparse.ArgumentParser) -> None:
    """The model and input shape options, shared by flux_bench/edit.py and profile.py (defaults: `shape_defaults`)."""
    ap.add_argument("--preset", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=None, help="source width (tiny: 64; real: 512 on a GPU, 128 on a CPU)")
    ap.add_argument("--depth", type=int, default=None, help="double blocks (default: the preset's, 19 for real)")
    ap.add_argument("--single-depth", type=int, default=None, help="single blocks (default: the preset's, 38 for real)")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="T5 and CLIP layers (default: all; 1 for the real preset on a CPU)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 for the real preset on a GPU, fp32 otherwise (a tight --check)")
    ap.add_argument("--lora", default=None, help="a LoRA file (official layout or ours), or random-lora / random-moe")
    ap.add_argument("--compile", action="store_true", help="ours: regional torch.compile of the blocks")
    ap.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="ours: the attention kernel")


def shape_defaults(args: argparse.Namespace) -> argparse.Namespace:
    cpu = torch.device(args.device).type == "cpu"
    args.width = args.width or (64 if args.preset == "tiny" else 128 if cpu else 512)
    if args.text_layers is None and args.preset == "real" and cpu:
        args.text_layers = 1
    args.dtype = args.dtype or ("bf16" if args.preset == "real" and not cpu else "fp32")
    return args


def lora_path(arg: str, flux: Flux, folder: Path) -> Path:
    """--lora's file: the path given, or a random file of that kind written into `folder`."""
    if arg in ("random-lora", "random-moe"):
        return random_lora(flux, folder / f"{arg}.safetensors", 4 if arg == "random-moe" else 0)
    if not Path(arg).exists():
        raise SystemExit(f"--lora {arg}: no such file (or use random-lora / random-moe)")
    return Path(arg)
