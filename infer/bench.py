"""The whole edit, stage by stage: ours against diffusers' FluxFillPipeline on the same weights.

    # tiny random components on the CPU
    .venv/bin/python -m infer.bench --preset tiny --steps 28 --width 64
    # the real FLUX.1 Fill shapes with random bf16 weights on a CUDA GPU (512x1024 diptych, 28 steps)
    .venv/bin/python -m infer.bench --preset real --device cuda --steps 28 --width 512 --check

Prints seconds per stage (text, VAE encode + denoise, decode), it/s and the ratio diffusers/ours.
Both pipelines are built in memory from one set of random weights (no download): diffusers' and
transformers' models receive our tensors (our checkpoint key table, inverted), and both
text encoders get the same token ids, so the two pipelines compute the same thing; --check compares
the final latents. Every stage is run once before it is timed, on both sides. A development tool:
it imports diffusers and transformers (`pip install ".[test]"`), which the product never does.
"""

import argparse
import time
from dataclasses import dataclass, replace

import torch

from flux_minimal import PRESETS, Flux
from flux_minimal.clip import CLIPTextModel as OurCLIP
from flux_minimal.config import AutoEncoderParams, Preset
from flux_minimal.loading import split_by_rules
from flux_minimal.mmdit import FLUX_FROM_DIFFUSERS
from flux_minimal.sampling import (Conditioning, DenoiseState, denoise, fill_conditioning, get_noise, get_schedule,
                                   image_ids, pack, unpack)
from flux_minimal.t5 import T5EncoderModel as OurT5
from flux_minimal.vae import AutoEncoder


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) / repeat


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


def bench_preset(name: str) -> Preset:
    """The real FLUX.1 Fill shapes, or the tiny test shapes (CLIP widened to the DiT's pooled input)."""
    if name == "real":
        return PRESETS["flux-fill-dev"]
    p = PRESETS["tiny-fill"]
    return replace(p, clip=replace(p.clip, hidden_size=p.flux.vec_in_dim))


def our_models(p: Preset, dev, dtype) -> Models:
    """Random weights (normal 0.02; norms 1, biases 0), in `dtype` except the fp32 VAE."""
    def randomized(module, std=0.02):
        module = module.to_empty(device=dev)
        with torch.no_grad():
            for name, t in module.state_dict().items():
                t.normal_(0, std) if t.ndim > 1 else t.fill_(1.0 if "norm" in name or "scale" in name else 0.0)
        return module.to(dtype).eval()

    with torch.device("meta"):
        flux, t5, clip, vae = Flux(p.flux), OurT5(p.t5), OurCLIP(p.clip), AutoEncoder(p.ae)
    vae = randomized(vae).float()
    with torch.no_grad():  # posterior std ~exp(-15): diffusers samples the VAE where we take the mean
        z = p.ae.z_channels
        vae.encoder.conv_out.weight[z:] = 0
        vae.encoder.conv_out.bias[z:] = -30.0
    return Models(randomized(flux), randomized(t5), randomized(clip), vae)


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


def time_ours(m: Models, x: Inputs, steps: int, dev) -> tuple[dict, torch.Tensor]:
    """Seconds per stage of our pipeline's pieces, and the final latents."""
    H, W = x.image.shape[-2:]

    def text():
        with torch.no_grad():
            return m.t5(x.ids_t5), m.clip(x.ids_clip)

    def edit(n):
        cond = Conditioning(image_ids(1, H, W, dev), txt, torch.zeros(1, txt.shape[1], 3, device=dev), vec,
                            fill_conditioning(m.vae, x.image, x.mask))
        return denoise(m.flux, DenoiseState(pack(x.noise).to(dev), get_schedule(n, (H // 16) * (W // 16))), cond, 50.0)

    text()  # warm-up, as on the reference side
    (txt, vec), t_text = timed(text, dev)
    edit(2)
    state, t_den = timed(lambda: edit(steps), dev)
    with torch.no_grad():
        m.vae.decode(unpack(state.x, H, W))
        _, t_dec = timed(lambda: m.vae.decode(unpack(state.x, H, W)), dev)
    return {"text": t_text, "denoise": t_den, "decode": t_dec}, state.x


def time_reference(m: Models, x: Inputs, p: Preset, steps: int, dev, dtype) -> tuple[dict, torch.Tensor]:
    """The same stages through diffusers' FluxFillPipeline (text encoders called on the same ids)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    H, W = x.image.shape[-2:]
    pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True),
        vae=m.vae, text_encoder=m.clip, tokenizer=None, text_encoder_2=m.t5, tokenizer_2=None, transformer=m.flux)

    def text():
        with torch.no_grad():
            return m.t5(x.ids_t5)[0], m.clip(x.ids_clip).pooler_output

    text()
    (pe, pooled), t_text = timed(text, dev)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, image=(x.image + 1) / 2, mask_image=x.mask, height=H,
              width=W, guidance_scale=50.0, latents=pack(x.noise).to(dev, dtype), output_type="latent")
    pipe(num_inference_steps=2, **kw)
    lat, t_den = timed(lambda: pipe(num_inference_steps=steps, **kw).images, dev)
    z = unpack(lat.float(), H, W) / p.ae.scale_factor + p.ae.shift_factor
    with torch.no_grad():
        m.vae.decode(z)
        _, t_dec = timed(lambda: m.vae.decode(z), dev)
    return {"text": t_text, "denoise": t_den, "decode": t_dec}, lat.float()


def report(preset, args, ours, theirs):
    print(f"\n{preset} preset: diptych {2 * args.width}x{args.width}, {args.steps} steps, {args.device}")
    print(f"{'stage':<22}{'ours s':>10}{'diffusers s':>13}{'ratio':>8}")
    for k in ("text", "denoise", "decode"):
        print(f"{k + (' (+VAE encode)' if k == 'denoise' else ''):<22}{ours[k]:10.3f}{theirs[k]:13.3f}"
              f"{theirs[k] / max(ours[k], 1e-9):8.2f}")
    to, tt = sum(ours.values()), sum(theirs.values())
    print(f"{'edit':<22}{to:10.3f}{tt:13.3f}{tt / to:8.2f}")
    print(f"denoising: ours {args.steps / ours['denoise']:.2f} it/s, diffusers {args.steps / theirs['denoise']:.2f} it/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--width", type=int, default=None, help="source width (tiny: 64, real: 512)")
    ap.add_argument("--check", action="store_true", help="compare the final latents")
    args = ap.parse_args()
    args.width = args.width or (64 if args.preset == "tiny" else 512)
    if args.preset == "real" and not torch.cuda.is_available():
        raise SystemExit("the real preset needs a CUDA GPU (about 70 GB for both pipelines in bf16)")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.preset == "real" else torch.float32
    p = bench_preset(args.preset)
    ours = our_models(p, dev, dtype)
    theirs = reference_twins(ours, p)
    x = make_inputs(p, args.width, dev)
    ours_t, ours_x = time_ours(ours, x, args.steps, dev)
    ref_t, ref_x = time_reference(theirs, x, p, args.steps, dev, dtype)
    if args.check:
        err = ((ours_x.double() - ref_x.double()).norm() / ref_x.double().norm()).item()
        print(f"final latents, ours vs diffusers: relative error {err:.3e} "
              f"({'bf16: a few 1e-2 is expected' if dtype == torch.bfloat16 else 'fp32: ~1e-5 expected'} "
              f"over {args.steps} steps)")
    report(args.preset, args, ours_t, ref_t)


if __name__ == "__main__":
    main()
