"""The whole edit, stage by stage: ours against diffusers' FluxFillPipeline on the same weights.

    # the real FLUX.1 Fill shapes on an H200 (512x1024 diptych, 28 steps, bf16), with a random MoE LoRA
    .venv/bin/python -m flux_bench.edit --preset real --device cuda --lora random-moe --compile --cuda-graphs --check
    # the same wiring on a CPU: real widths, one block of each kind, 1-layer text encoders, fp32
    .venv/bin/python -m flux_bench.edit --preset real --device cpu --depth 1 --single-depth 1 --steps 2 --check
    # tiny random components on the CPU
    .venv/bin/python -m flux_bench.edit --preset tiny --steps 28

Prints seconds per stage (text, VAE encode + denoise, decode), it/s and the ratio diffusers/ours.
Both pipelines are built in memory from one set of random weights (no download): diffusers' and
transformers' models receive our tensors (our checkpoint key table, inverted), and both
text encoders get the same token ids, so the two pipelines compute the same thing; --check compares
the final latents and exits 1 past its tolerance. --lora PATH (or random-lora / random-moe, a
random rank-32 file in the official layout) is loaded on both sides: ours through load_lora (a plain
LoRA merged unless --no-merge-lora), diffusers' through load_lora_weights for the plain parts and the
official dense mixture-of-experts layer (`lora_moe_linear_ref`) on ff.net.2 / proj_out. Each side
runs the whole edit once, untimed, before the timed run (compile and graph capture happen there,
and are reported). A development tool: it imports diffusers and transformers
(`pip install ".[test]"`), which the product never does.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from flux_bench.common import (bench_preset, our_models, reference_twins, load_lora_both, make_inputs, run_ours, run_reference, reference_pipeline, shape_args, shape_defaults, lora_path)
from flux_minimal.ops import set_attention_backend
from infer.fast import GraphedDenoiser, compile_blocks


def report(args, ours: dict, theirs: dict, first: dict) -> None:
    print(f"{'stage':<22}{'ours s':>10}{'diffusers s':>13}{'ratio':>8}")
    for k in ("text", "denoise", "decode"):
        print(f"{k + (' (+VAE encode)' if k == 'denoise' else ''):<22}{ours[k]:10.3f}{theirs[k]:13.3f}"
              f"{theirs[k] / max(ours[k], 1e-9):8.2f}")
    to, tt = sum(ours.values()), sum(theirs.values())
    print(f"{'edit':<22}{to:10.3f}{tt:13.3f}{tt / to:8.2f}")
    print(f"denoising: ours {args.steps / ours['denoise']:.2f} it/s, diffusers {args.steps / theirs['denoise']:.2f} it/s")
    print(f"first (untimed) edit: ours {sum(first['ours'].values()):.2f} s, diffusers {sum(first['theirs'].values()):.2f} s"
          + (" (ours includes compiling the blocks)" if args.compile else "")
          + (" (and capturing the CUDA graph)" if args.cuda_graphs else ""))


def vae_error(weights: Path, images: list[Path], dev) -> int:
    """The VAE in bf16 against float32 on real images: latents (relative error) and the decoded
    round trip (PSNR of the bf16 images against the float32 ones, pixels in [0, 1])."""
    from flux_minimal.images import load_image, to_tensor
    from flux_minimal.vae import load_vae
    vae32, vae16 = (load_vae(weights, device=dev, dtype=d) for d in (torch.float32, torch.bfloat16))
    lat, psnr = [], []
    with torch.no_grad():
        for path in images:
            img = load_image(path)
            x = to_tensor(img.crop((0, 0, img.width // 16 * 16, img.height // 16 * 16))).to(dev)
            z32, z16 = vae32.encode(x), vae16.encode(x)
            lat.append(((z16.double() - z32.double()).norm() / z32.double().norm()).item())
            a, b = ((v.decode(z).float().clamp(-1, 1) + 1) / 2 for v, z in ((vae32, z32), (vae16, z16)))
            psnr.append((10 * torch.log10(1 / (a - b).square().mean())).item())
    print(f"VAE {weights} in bf16 against float32, {len(images)} images on {dev}: latents relative error "
          f"mean {sum(lat) / len(lat):.2e} (max {max(lat):.2e}); decoded round trip PSNR mean "
          f"{sum(psnr) / len(psnr):.1f} dB (min {min(psnr):.1f} dB)")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flux_bench.edit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(ap)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--no-merge-lora", action="store_true", help="keep a plain LoRA apart on our side")
    ap.add_argument("--cuda-graphs", action="store_true", help="ours: the denoising step replayed from a CUDA graph")
    ap.add_argument("--check", action="store_true", help="compare the final latents; exit 1 past the tolerance")
    ap.add_argument("--vae-error", type=Path, metavar="WEIGHTS",
                    help="instead: the VAE of WEIGHTS in bf16 against float32 on --images")
    ap.add_argument("--images", type=Path, nargs="+", default=sorted(Path("examples/mini").glob("*.png")))
    return shape_defaults(ap.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if args.vae_error:
        return vae_error(args.vae_error, args.images, dev)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    p = bench_preset(args.preset, args.depth, args.single_depth, args.text_layers)
    set_attention_backend(args.attention, dev, dtype)
    print(f"{args.preset} preset: DiT {p.flux.depth} double + {p.flux.depth_single_blocks} single blocks of width "
          f"{p.flux.hidden_size}, T5 {p.t5.num_layers} / CLIP {p.clip.num_hidden_layers} layers; diptych "
          f"{2 * args.width}x{args.width}, {args.steps} steps, {args.dtype}, {dev}, attention {args.attention}")
    ours = our_models(p, dev, dtype, vae_dtype=dtype)
    theirs = reference_twins(ours, p)
    pipe = reference_pipeline(theirs)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        with tempfile.TemporaryDirectory() as tmp:
            path = lora_path(args.lora, ours.flux, Path(tmp))
            print("LoRA:", load_lora_both(ours, theirs, pipe, path, merge=not args.no_merge_lora))
    if args.compile:
        print(f"compiling {compile_blocks(ours.flux)} blocks (regionally: one graph per kind of block)")
    graphed = GraphedDenoiser(ours.flux) if args.cuda_graphs else None
    x = make_inputs(p, args.width, dev)
    first = {"ours": run_ours(ours, x, args.steps, dev, graphed)[0],
             "theirs": run_reference(theirs, pipe, x, p, args.steps, dev, dtype)[0]}
    ours_t, ours_x = run_ours(ours, x, args.steps, dev, graphed)
    ref_t, ref_x = run_reference(theirs, pipe, x, p, args.steps, dev, dtype)
    report(args, ours_t, ref_t, first)
    if args.check:
        err = ((ours_x.double() - ref_x.double()).norm() / ref_x.double().norm()).item()
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: a few 1e-2 of rounding over the steps
        ok = err <= tol
        print(f"check: final latents, ours vs diffusers, relative error {err:.3e} "
              f"({'within' if ok else 'PAST'} the tolerance {tol:g} for {args.dtype})")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
