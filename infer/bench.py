"""The whole edit, stage by stage: ours against diffusers' FluxFillPipeline on the same weights.

    # tiny random components on the CPU (a snapshot folder both pipelines load)
    .venv/bin/python -m infer.bench --preset tiny --steps 28 --width 64
    # the real FLUX.1 Fill shapes with random bf16 weights on a CUDA GPU (512x1024 diptych, 28 steps)
    .venv/bin/python -m infer.bench --preset real --device cuda --steps 28 --width 512

Prints seconds per stage (text, VAE encode + denoise, decode), it/s and the ratio diffusers/ours.
The real preset builds both models in memory from one set of random weights (no download) and
feeds both text encoders the same token ids, so the two pipelines compute the same thing; with
--check the final latents are compared. A development tool: it imports diffusers/transformers,
which the product never does.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch


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


def bench_tiny(args):
    """Both pipelines load one tiny random snapshot folder and run the full edit."""
    from diffusers import FluxFillPipeline
    from PIL import Image

    from flux_minimal.images import IC_PROMPT, make_diptych
    from infer.pipeline import ICEditPipeline
    from tests.snapshot import write_tiny_snapshot

    root = write_tiny_snapshot(Path(tempfile.mkdtemp()) / "snapshot")
    src = Image.radial_gradient("L").convert("RGB").resize((args.width, args.width))
    ours = ICEditPipeline.from_pretrained(root, device=args.device)
    ours.edit(src, "warm up", width=args.width, steps=2, progress=False)
    ours.edit(src, "make it red", width=args.width, steps=args.steps, progress=False)
    r = ours.last_report
    ours_t = {"text": r["seconds"]["text"], "denoise": r["seconds"]["encode"] + r["seconds"]["denoise"],
              "decode": r["seconds"]["decode"]}

    ref = FluxFillPipeline.from_pretrained(root).to(args.device)
    W, H = 2 * args.width, args.width
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (args.width, 0, W, H))
    prompt = IC_PROMPT.format(instruction="make it red")
    (pe, pooled, _), t_text = timed(lambda: ref.encode_prompt(prompt, None, device=args.device), args.device)
    kw = dict(image=make_diptych(src), mask_image=mask, height=H, width=W, guidance_scale=50.0,
              prompt_embeds=pe, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(0))
    ref(num_inference_steps=2, output_type="latent", **kw)  # warm up
    lat, t_den = timed(lambda: ref(num_inference_steps=args.steps, output_type="latent", **kw).images, args.device)
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    z = FluxPipeline._unpack_latents(lat, H, W, ref.vae_scale_factor)
    z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    _, t_dec = timed(lambda: ref.vae.decode(z), args.device)
    report("tiny", args, ours_t, {"text": t_text, "denoise": t_den, "decode": t_dec})


def bench_real(args):
    """Real FLUX.1 Fill shapes, random bf16 weights, both pipelines in memory."""
    from diffusers import AutoencoderKL, FluxFillPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_minimal import PRESETS, Flux
    from flux_minimal.clip import CLIPTextModel as OurCLIP
    from flux_minimal.sampling import (Conditioning, DenoiseState, denoise, fill_conditioning, get_noise,
                                       get_schedule, image_ids, pack, unpack)
    from flux_minimal.t5 import T5EncoderModel as OurT5
    from flux_minimal.vae import AutoEncoder

    dev, dt = torch.device(args.device), torch.bfloat16
    p = PRESETS["flux-fill-dev"]

    def randomized(module, std=0.02):
        module = module.to_empty(device=dev)
        with torch.no_grad():
            for name, t in module.state_dict().items():
                t.normal_(0, std) if t.ndim > 1 else t.fill_(1.0 if "norm" in name or "scale" in name else 0.0)
        return module.to(dt).eval()

    with torch.device("meta"):
        flux, t5, clip, vae = Flux(p.flux), OurT5(p.t5), OurCLIP(p.clip), AutoEncoder(p.ae)
    flux, t5, clip = randomized(flux), randomized(t5), randomized(clip)
    vae = randomized(vae).float()
    # diffusers / transformers twins holding the same tensors
    with torch.device("meta"):
        d_flux = FluxTransformer2DModel(in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                                        guidance_embeds=True)
    d_flux.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(flux.state_dict())), assign=True)
    with torch.device("meta"):
        d_t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                       feed_forward_proj="gated-gelu", vocab_size=32128, is_encoder_decoder=False))
        d_clip = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu"))
    d_t5.load_state_dict({**t5.state_dict(), "encoder.embed_tokens.weight": t5.state_dict()["shared.weight"]},
                         assign=True, strict=False)
    d_clip.load_state_dict(clip.state_dict(), assign=True, strict=False)
    from tests.vae_fixtures import diffusers_vae_config
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg = diffusers_vae_config(p.ae)
    with torch.device("meta"):
        d_vae = AutoencoderKL(**cfg)
    d_vae.load_state_dict(convert_ldm_vae_checkpoint(dict(vae.state_dict()), cfg), assign=True)

    W, H = 2 * args.width, args.width
    ids_t5 = torch.randint(0, 32000, (1, 512), device=dev)
    ids_clip = torch.randint(0, 49406, (1, 77), device=dev)
    image = torch.rand(1, 3, H, W, device=dev) * 2 - 1
    mask = torch.zeros(1, 1, H, W, device=dev)
    mask[..., args.width:] = 1
    noise = get_noise([0], H, W)
    L = (H // 16) * (W // 16)

    def ours_text():
        with torch.no_grad():
            return t5(ids_t5), clip(ids_clip)
    (txt, vec), t_text = timed(ours_text, dev)

    def ours_denoise(steps):
        cond = Conditioning(image_ids(1, H, W, dev), txt, torch.zeros(1, 512, 3, device=dev), vec,
                            fill_conditioning(vae, image, mask))
        return denoise(flux, DenoiseState(pack(noise).to(dev), get_schedule(steps, L)), cond, 50.0)
    ours_denoise(2)
    state, t_den = timed(lambda: ours_denoise(args.steps), dev)
    with torch.no_grad():
        _, t_dec = timed(lambda: vae.decode(unpack(state.x, H, W)), dev)
    ours_t = {"text": t_text, "denoise": t_den, "decode": t_dec}

    ref = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5,
                           max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True), vae=d_vae,
                           text_encoder=d_clip, tokenizer=None, text_encoder_2=d_t5, tokenizer_2=None,
                           transformer=d_flux)

    def ref_text():
        with torch.no_grad():
            return d_t5(ids_t5)[0], d_clip(ids_clip).pooler_output
    (pe, pooled), r_text = timed(ref_text, dev)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, image=(image + 1) / 2, mask_image=mask[:, :1],
              height=H, width=W, guidance_scale=50.0, latents=pack(noise).to(dev, dt), output_type="latent")
    ref(num_inference_steps=2, **kw)
    lat, r_den = timed(lambda: ref(num_inference_steps=args.steps, **kw).images, dev)
    z = unpack(lat.float(), H, W) / p.ae.scale_factor + p.ae.shift_factor
    with torch.no_grad():
        _, r_dec = timed(lambda: d_vae.decode(z), dev)
    if args.check:
        from tests.helpers import rel_err
        print(f"final latents, ours vs diffusers: relative error {rel_err(state.x, lat.float()):.3e} "
              f"(bf16: a few 1e-2 is expected over {args.steps} steps)")
    report("real", args, ours_t, {"text": r_text, "denoise": r_den, "decode": r_dec})


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
    ap.add_argument("--check", action="store_true", help="compare the final latents (real preset)")
    args = ap.parse_args()
    args.width = args.width or (64 if args.preset == "tiny" else 512)
    if args.preset == "real" and not torch.cuda.is_available():
        raise SystemExit("the real preset needs a CUDA GPU (about 70 GB for both pipelines in bf16)")
    torch.manual_seed(0)
    (bench_tiny if args.preset == "tiny" else bench_real)(args)


if __name__ == "__main__":
    main()
