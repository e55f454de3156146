"""FP8 against bf16: bytes, the quality of the edits, the error per block, and memory per mode.

    .venv/bin/python -m flux_bench.fp8                  # CPU: mini, tiny, real-width blocks, the table (~2 min)
    .venv/bin/python -m flux_bench.fp8 --device cuda    # also a real-shape edit on a GPU: peak memory, seconds

1. The mini model (assets/mini, with its LoRA-MoE): the DiT's linear-weight bytes in FP8 against
   bf16, and the PSNR of each FP8 edit against the bf16 edit of the same input and seed (the
   README's four example scenes, and --heldout edits per type of the shapes world).
2. The tiny random model: the final latents of an 8-step denoise, FP8 against bf16.
3. One double and one single block at FLUX's real width (3072, random weights, std 0.02): the
   relative error of each block's update (output minus input), FP8 against bf16.
4. GPU memory per mode at the real shape (512x1024, batch 1): computed from the parameter counts
   (weights) and the activation sizes in weights.md; with --device cuda, a real-shape edit of
   random weights is measured in bf16 and in FP8 (peak memory and seconds per edit).
On a CPU the FP8 layers dequantize their weights (the CUDA path, torch._scaled_mm, also
quantizes the activations per row: measure on a GPU for that).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from flux_minimal import PRESETS, Flux
from flux_minimal.fp8 import linear_bytes, quantize_linears
from flux_bench.common import randomized

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Pixels in [0, 1]."""
    return float(10 * np.log10(1 / max(((a - b) ** 2).mean(), 1e-12)))


def mini_edits(heldout: int) -> list[tuple[str, object, str]]:
    """(name, source image, instruction): the README's four scenes, then held-out world edits."""
    from PIL import Image

    from flux_eval.datasets import read_mini
    folder = REPO / "examples" / "mini"
    edits = []
    for line in (folder / "instructions.txt").read_text().splitlines():
        name, _, instruction = line.partition(": ")
        edits.append((name, Image.open(folder / name).convert("RGB"), instruction))
    if heldout:
        sessions, _ = read_mini(heldout)
        edits += [(s.id, s.turns[0].source, s.turns[0].instruction) for s in sessions if s.meta["type"] != "move"]
    return edits


def mini(heldout: int) -> None:
    from infer.pipeline import ICEditPipeline
    w = REPO / "assets" / "mini"
    edits = mini_edits(heldout)
    out = {}
    for mode, kw in (("bf16", dict(dtype=torch.bfloat16)), ("fp8", dict(dtype=torch.bfloat16, fp8=True))):
        pipe = ICEditPipeline.from_pretrained(w, lora=w / "lora_moe.safetensors", **kw)
        out[mode] = [np.asarray(pipe.edit(img, ins, width=64, progress=False), dtype=np.float64) / 255
                     for _, img, ins in edits]
        out[mode + " bytes"] = linear_bytes(pipe.flux)
    print(f"mini DiT linear weights: fp8 {out['fp8 bytes'] / 1e6:.2f} MB, bf16 {out['bf16 bytes'] / 1e6:.2f} MB "
          f"({out['fp8 bytes'] / out['bf16 bytes']:.3f}x)")
    p = [psnr(a, b) for a, b in zip(out["fp8"], out["bf16"])]
    for (name, _, ins), v in list(zip(edits, p))[:4]:
        print(f"  {name} {ins!r}: fp8 edit against bf16 edit {v:.1f} dB")
    for label, sl in (("the four example scenes", slice(0, 4)), (f"{len(p) - 4} held-out world edits", slice(4, None))):
        q = p[sl]
        if q:
            mse = np.mean([((a - b) ** 2).mean() for a, b in zip(out["fp8"][sl], out["bf16"][sl])])
            print(f"  {label}: PSNR of the mean squared error {10 * np.log10(1 / mse):.1f} dB, "
                  f"median {np.median(q):.1f} dB, worst {min(q):.1f} dB")


def tiny() -> None:
    from flux_minimal.sampling import Conditioning, DenoiseState, denoise, get_noise, get_schedule, image_ids, pack
    p = PRESETS["tiny-fill"].flux
    torch.manual_seed(0)
    ref = randomized(Flux(p), "cpu", torch.bfloat16, std=0.1)
    H, W = 64, 128
    L = (H // 16) * (W // 16)
    cond = Conditioning(image_ids(1, H, W), torch.randn(1, 16, p.context_in_dim), torch.zeros(1, 16, 3),
                        torch.randn(1, p.vec_in_dim), torch.randn(1, L, p.in_channels - 64))
    state = DenoiseState(pack(get_noise([0], H, W)), get_schedule(8, L))
    a = denoise(ref, state, cond, 30.0).x
    quantize_linears(ref)
    b = denoise(ref, state, cond, 30.0).x
    rel = ((b - a).norm() / a.norm()).item()
    span = (a.max() - a.min()).item()
    print(f"tiny random DiT, 8 steps: final latents relative error {rel:.3f}, "
          f"PSNR {10 * np.log10(span ** 2 / ((a - b) ** 2).mean().item()):.1f} dB (over the latents' range)")


def real_blocks(tokens: int) -> None:
    from flux_minimal.mmdit import DoubleStreamBlock, SingleStreamBlock
    from flux_minimal.mmdit import EmbedND
    from flux_minimal.sampling import image_ids
    f = PRESETS["flux-fill-dev"].flux
    side = int(tokens ** 0.5)
    D, T, L = f.hidden_size, 512, side * side
    torch.manual_seed(0)  # the blocks' weights
    g = torch.Generator().manual_seed(0)  # their inputs
    ids = torch.cat([torch.zeros(1, T, 3), image_ids(1, 16 * side, 16 * side)], dim=1)  # [txt; img] positions
    pe = EmbedND(f.head_dim, f.theta, f.axes_dim)(ids)
    for kind, block in (("double", DoubleStreamBlock(D, f.num_heads, f.mlp_ratio, f.qkv_bias)),
                        ("single", SingleStreamBlock(D, f.num_heads, f.mlp_ratio))):
        block = randomized(block, "cpu", torch.bfloat16)
        vec = torch.randn(1, D, generator=g).to(torch.bfloat16)
        txt, img = (torch.randn(1, n, D, generator=g).to(torch.bfloat16) for n in (T, L))
        with torch.no_grad():
            args = (img, txt, vec, pe) if kind == "double" else (torch.cat([txt, img], 1), vec, pe)
            ins = torch.cat([args[0], args[1]], 1) if kind == "double" else args[0]
            ref = block(*args)
            ref = torch.cat([ref[0], ref[1]], 1) if kind == "double" else ref
            t0 = time.perf_counter()
            quantize_linears(block)
            qt = time.perf_counter() - t0
            args = (img, txt, vec, pe) if kind == "double" else (torch.cat([txt, img], 1), vec, pe)
            out = block(*args)
            out = torch.cat([out[0], out[1]], 1) if kind == "double" else out
        du, dq = (ref - ins).float(), (out - ins).float()
        print(f"real-width {kind} block ({D} wide, {T} text + {L} image tokens, random weights): update relative "
              f"error {((dq - du).norm() / du.norm()).item():.4f}, output {((out - ref).float().norm() / ref.float().norm()).item():.5f}"
              f" (quantized in {qt:.1f} s)")


def memory_table() -> None:
    """Computed from the real configuration's parameter counts (meta device: nothing allocated)."""
    from flux_minimal.t5 import T5EncoderModel
    p = PRESETS["flux-fill-dev"]
    with torch.device("meta"):
        dit, t5 = Flux(p.flux), T5EncoderModel(p.t5)

    def split(m):
        lin = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
        return lin, sum(x.numel() for x in m.parameters()) - lin

    (dl, do), (tl, to) = split(dit), split(t5)
    dit16, dit8 = 2 * (dl + do) / GB, (dl + 2 * do) / GB
    t516, t58 = 2 * (tl + to) / GB, (tl + 2 * to) / GB
    clip, vae, act = 0.25, 0.17, 1.1  # CLIP-L bf16, VAE bf16, activations + VAE decode at 512x1024 (weights.md)
    print(f"\nGPU memory at 512x1024, batch 1, computed (DiT {dit16:.1f} GB bf16 / {dit8:.1f} GB fp8; "
          f"T5 {t516:.1f} / {t58:.1f} GB; CLIP {clip}, VAE {vae}, activations ~{act} GB):")
    rows = [("bf16", dit16 + t516 + clip + vae + act, dit16 + clip + vae + act),
            ("fp8", dit8 + t58 + clip + vae + act, dit8 + clip + vae + act)]
    print("| mode | peak, all resident | peak, text encoders visiting (--offload model) |")
    print("| --- | ---: | ---: |")
    for name, full, visit in rows:
        print(f"| {name} | {full:.1f} GB | {visit:.1f} GB |")
    print("\n| card | bf16 | fp8 | fp8 + --offload blocks: DiT bytes streamed per step |")
    print("| --- | --- | --- | --- |")
    for card in (80, 48, 24, 16):
        def fits(gb):
            return "fits" if gb <= card - 1.0 else "no"
        budget = max(0.0, card - 4.0 - (t58 + clip + vae + act))  # resident blocks; 4 GiB headroom as offload.py
        streamed = max(0.0, dit8 - budget)
        print(f"| {card} GB | {fits(rows[0][1])} | {fits(rows[1][1])} | "
              f"{'none (all resident)' if streamed == 0 else f'{streamed:.1f} GB (>= {streamed / 25:.2f} s/step at 25 GB/s PCIe)'} |")


def gpu_edit(steps: int) -> None:
    """Random real-shape weights on the GPU: one edit in bf16, then the same DiT quantized in place."""
    r = fp8_edit(torch.device("cuda"), "real", 512, steps, torch.bfloat16)
    for mode in ("bf16", "fp8"):
        print(f"GPU real shape, {mode}: {r[mode]['seconds']:.2f} s per edit ({steps} steps), peak "
              f"{r[mode]['peak_gb']:.1f} GB")
    print(f"FP8 edit against the bf16 edit: PSNR {r['psnr_db']:.1f} dB")


def fp8_edit(dev: torch.device, preset: str, width: int, steps: int, dtype: torch.dtype) -> dict:
    """One edit of random weights in `dtype`, then the same DiT and T5 quantized in place and the
    edit again: {mode: {"seconds", "peak_gb"}, "psnr_db": the FP8 image against the `dtype` one}.
    Peak memory: torch's allocator on a GPU (None on a CPU)."""
    from flux_bench.common import bench_preset, make_inputs, our_models, run_ours
    from flux_minimal.sampling import unpack
    from flux_minimal.timing import sync
    cuda = dev.type == "cuda"
    p = bench_preset(preset)
    m = our_models(p, dev, dtype, vae_dtype=dtype)
    x = make_inputs(p, width, dev)
    H, W = x.image.shape[-2:]
    out, images = {}, {}
    for mode in ("bf16" if dtype == torch.bfloat16 else "fp32", "fp8"):
        if mode == "fp8":
            quantize_linears(m.flux)
            quantize_linears(m.t5)
            if cuda:
                torch.cuda.empty_cache()
        run_ours(m, x, min(steps, 2), dev, None)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        _, lat = run_ours(m, x, steps, dev, None)
        sync(dev)
        out[mode] = {"seconds": time.perf_counter() - t0,
                     "peak_gb": torch.cuda.max_memory_allocated(dev) / GB if cuda else None}
        with torch.no_grad():
            img = m.vae.decode(unpack(lat.to(dtype), H, W)).float().clamp(-1, 1)
        images[mode] = ((img + 1) / 2).cpu().numpy()
    a, b = images.values()
    out["psnr_db"] = psnr(a, b)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flux_bench.fp8", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=int, default=2, help="held-out world edits per type for the mini PSNR")
    ap.add_argument("--tokens", type=int, default=256, help="image tokens for the real-width blocks")
    ap.add_argument("--device", default="cpu", help="cuda adds the measured real-shape edit")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    mini(args.heldout)
    tiny()
    real_blocks(args.tokens)
    memory_table()
    if torch.device(args.device).type == "cuda":
        gpu_edit(args.steps)
    return 0


if __name__ == "__main__":
    from flux_minimal.errors import run_cli
    run_cli(main)
