"""Short adapter experiments on the shipped mini base: what makes an edit learnable, in minutes.

    .venv/bin/python -m mini_world.quick --types color --objects 1 --shape-ref --steps 600   # ~10 min, 2 cores

Trains a fresh LoRA (or, with --mode full, every DiT weight) on edit pairs of the chosen types,
with scenes of exactly --objects objects (0: the world's 1-4) and optionally the edited object
named by its shape alone ("turn the circle blue"). It prints along the way the probe that the
README's diagnosis uses, the flow-matching error on the latent tokens the edit changes against the
unchanged ones at t = 0.9 and 0.5 (64 fixed training pairs, fixed noise), and at the end the
checker's success on --eval edits per type from the training and the held-out streams. Nothing is
written: it is a measuring tool (the recipe, mini_world/recipe.py, makes the shipped weights).
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flux_minimal.errors import run_cli
from flux_minimal.flux_loading import load_flux
from flux_minimal.icedit import make_diptych, right_half_mask
from flux_minimal.images import to_tensor
from flux_minimal.lora import add_lora
from flux_minimal.sampling import Conditioning, encode_fill_example, flow_matching_mse, vae_down
from flux_minimal.text import PromptEncoder
from flux_minimal.vae import load_vae
from mini_world import world
from mini_world.loop import Loop, LoopConfig
from mini_world.check import check_edit

SIZE = 64


def make_example(rng: np.random.Generator, edit_type: str, objects: int, shape_ref: bool) -> world.EditExample:
    """A world edit, on a scene of exactly `objects` objects when > 0, optionally shape-referenced."""
    record = world.make_edit_record(rng, edit_type, objects or None)
    if shape_ref and record.obj is not None:
        o = record.source.objects[record.obj]
        record = replace(record, instruction=record.instruction.replace(o.name, o.shape))
    return world.EditExample(world.render(record.source, SIZE), world.render(record.target, SIZE),
                             record.instruction, record)


def examples(args, n: int, split: str) -> list[world.EditExample]:
    types = args.types.split(",")
    stream = world.SPLIT_STREAMS[split]
    return [make_example(np.random.default_rng([stream, args.seed, i]), types[i % len(types)], args.objects,
                         args.shape_ref) for i in range(n)]


@torch.no_grad()
def encode(vae, text: PromptEncoder, exs: list[world.EditExample], chunk: int = 100) -> dict:
    """Latents x0 [N, L, 64], Fill conditioning [N, L, 320], prompts, which tokens the edit changes
    [N, L] (any pixel of the token's 2x2-latent patch moves by more than 0.12), the VAE's factor."""
    parts = {"x0": [], "cond": [], "txt": [], "vec": [], "changed": []}
    patch = vae_down(vae) * 2  # pixels per token side
    for k in range(0, len(exs), chunk):
        ch = exs[k:k + chunk]
        x = torch.cat([to_tensor(make_diptych(e.source, e.target)) for e in ch])
        copy = torch.cat([to_tensor(make_diptych(e.source, e.source)) for e in ch])
        x0, cond = encode_fill_example(vae, x, right_half_mask(SIZE, 2 * SIZE))
        parts["x0"].append(x0)
        parts["cond"].append(cond)
        txt, _, vec = text.encode_prompt([e.prompt for e in ch])
        parts["txt"].append(txt)
        parts["vec"].append(vec)
        moved = F.max_pool2d((x - copy).abs().amax(1, keepdim=True), patch)[:, 0] > 0.12  # [n, H/p, W/p]
        parts["changed"].append(moved.flatten(1))
    return {**{k: torch.cat(v) for k, v in parts.items()}, "down": vae_down(vae)}


def velocity_error(flux, data: dict, idx: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, L]: the training objective (ICEdit's, guidance 1) per token."""
    cond = Conditioning.of(data["txt"][idx], data["vec"][idx], data["cond"][idx], SIZE, 2 * SIZE, data["down"])
    return flow_matching_mse(flux, data["x0"][idx], eps, t, cond, torch.ones(len(idx)), per_token=True)


@torch.no_grad()
def probe(flux, data: dict, idx: torch.Tensor, eps: torch.Tensor) -> dict:
    out, was = {}, flux.training
    flux.eval()
    for tv in (0.9, 0.5):
        e, c = velocity_error(flux, data, idx, eps, torch.full((len(idx),), tv)), data["changed"][idx]
        out[f"changed@{tv}"], out[f"unchanged@{tv}"] = e[c].mean().item(), e[~c].mean().item()
    flux.train(was)
    return out


def success(pipe, exs: list[world.EditExample], steps: int) -> float:
    scores = [check_edit(e.record, e.source, pipe.edit(e.source, e.instruction, width=SIZE, steps=steps,
                                                       seed=1000 + 97 * i, progress=False))
              for i, e in enumerate(exs)]
    return float(np.mean([s.success for s in scores]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_world.quick", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"), help="the base, VAE and text encoders")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora", help="a fresh LoRA, or every DiT weight")
    ap.add_argument("--types", default=",".join(world.EDIT_TYPES), help="edit types, comma-separated")
    ap.add_argument("--objects", type=int, default=0, help="objects per scene (0: the world's 1-4)")
    ap.add_argument("--shape-ref", action="store_true", help='name the edited object by its shape ("the circle")')
    ap.add_argument("--pairs", type=int, default=4200)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW, 5%% warmup then cosine")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--eval", type=int, default=6, help="edits per type and split for the success figures")
    ap.add_argument("--sample-steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT (1.5x on 2 cores)")
    args = ap.parse_args(argv)
    for t in args.types.split(","):
        if t not in world.EDIT_TYPES:
            raise SystemExit(f"unknown edit type {t!r}; the types are {', '.join(world.EDIT_TYPES)}")
    torch.manual_seed(args.seed)
    vae, text = load_vae(args.weights / "ae.safetensors"), PromptEncoder.from_pretrained(args.weights)
    flux = load_flux(args.weights).requires_grad_(False)
    t0 = time.perf_counter()
    data = encode(vae, text, examples(args, args.pairs, "train"))
    print(f"{args.pairs} pairs encoded in {time.perf_counter() - t0:.0f}s; "
          f"{100 * data['changed'].float().mean():.1f}% of the tokens change")
    if args.mode == "full":
        params = list(flux.requires_grad_(True).parameters())
    else:
        params = add_lora(flux, rank=args.rank, seed=args.seed)
    print(f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters ({args.mode})")
    pg = torch.Generator().manual_seed(args.seed + 1)  # the probe's fixed pairs and noise
    N = len(data["x0"])
    p_idx = torch.randint(0, N, (min(64, N),), generator=pg)
    p_eps = torch.randn(len(p_idx), *data["x0"].shape[1:], generator=pg)
    print("step 0:", {k: round(v, 4) for k, v in probe(flux, data, p_idx, p_eps).items()})

    def loss_fn(model, g: torch.Generator, step: int) -> torch.Tensor:
        idx = torch.randint(0, N, (args.batch,), generator=g)
        eps = torch.randn(args.batch, *data["x0"].shape[1:], generator=g)
        t = torch.sigmoid(torch.randn(args.batch, generator=g))  # ICEdit's logit-normal t
        return velocity_error(model, data, idx, eps, t).mean()

    def after_step(step: int) -> None:
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            p = {k: round(v, 4) for k, v in probe(flux, data, p_idx, p_eps).items()}
            print(f"step {step}: loss {loop.losses[-1]:.4f}, {p} ({loop.seconds:.0f}s)", flush=True)

    # The recipe's loop (AdamW, 5% warmup, cosine), in a folder thrown away at the end: nothing is
    # kept, and the raw weights (not the loop's EMA) are what is measured.
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LoopConfig(steps=args.steps, lr=args.lr, clip=0.5, betas=(0.9, 0.999), log_every=max(1, args.steps // 10),
                         save_every_s=float("inf"), seed=args.seed)
        loop = Loop(Path(tmp), flux, cfg, compile=args.compile)
        loop.run(loss_fn, after_step)
    from infer.pipeline import ICEditPipeline
    pipe = ICEditPipeline(flux.eval(), vae, text)
    n = args.eval * len(args.types.split(","))
    print(f"success: train {100 * success(pipe, examples(args, n, 'train'), args.sample_steps):.0f}%, "
          f"held-out {100 * success(pipe, examples(args, n, 'heldout'), args.sample_steps):.0f}% "
          f"({n} edits each)")
    return 0


if __name__ == "__main__":
    run_cli(main)
