"""Fine-tune ICEdit adapters (LoRA or LoRA-MoE) on FLUX.1 Fill with the flow-matching loss.

    # one GPU, the paper's MoE recipe (batch 1 x accumulation 2, Prodigy, bf16 base)
    .venv/bin/python -m train.train --weights FLUX.1-Fill-dev --data MagicBrush/ OmniEdit/ \
        --adapter moe --steps 42000 --batch 1 --grad-accum 2 --out runs/moe

    # 4 GPUs: DDP over the adapter parameters (the global batch is 4x)
    torchrun --nproc_per_node 4 -m train.train --weights FLUX.1-Fill-dev --data pairs/ --adapter lora \
        --batch 2 --grad-checkpointing --steps 42000 --out runs/lora

    # continue a run exactly where it stopped (adapter, optimizer, data position)
    ... --resume runs/moe

The objective, exactly ICEdit's (README, "Fine-tuning"): x0 = the VAE latent of [source | target],
t = sigmoid(randn), x_t = (1 - t) x0 + t eps, the model sees cat(x_t, masked latent, mask) with
guidance 1, and the loss is MSE(v, eps - x0) over the whole diptych latent. Noise, packing, ids
and conditioning are flux_minimal.sampling's, as at inference.

Every sample's randomness (prompt drop, t, eps) is drawn from (seed, sample number), so a run
split over N processes, or killed and resumed, sees exactly the same samples.
"""

import argparse
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.flux_loading import load_flux, require_fill
from flux_minimal.icedit import make_diptych, right_half_mask
from flux_minimal.images import save_png, to_pil
from flux_minimal.lora import add_lora, lora_parameters
from flux_minimal.lora_files import load_lora, lora_state_dict, official_from_ours
from flux_minimal.sampling import Conditioning, encode_fill_example, flow_matching_mse, vae_down
from flux_minimal.text import PromptEncoder
from flux_minimal.vae import load_vae
from flux_minimal.files import check_folder, save_safetensors
from infer.options import DTYPES, EDIT, default_dtype
from train.checkpoint import load_checkpoint, optimizer_state, restore_optimizer, save_checkpoint
from train.data import EditPairs, loader

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="FLUX.1-Fill-dev snapshot folder (weights.md)")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="pairs folders / .jsonl / .parquet")
    ap.add_argument("--adapter", choices=["lora", "moe"], default="lora")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=None, help="default: = rank (scale 1)")
    ap.add_argument("--experts", type=int, default=4, help="LoRA experts per MoE layer (--adapter moe)")
    ap.add_argument("--init-lora", type=Path, help="start from an existing adapter file (ours or official)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps in total (a resume continues to it)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per process per micro-step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512, help="each image is resized to R x R")
    ap.add_argument("--optimizer", choices=["prodigy", "adamw"], default="prodigy")
    ap.add_argument("--lr", type=float, default=None, help="default: 1.0 for Prodigy, 1e-4 for AdamW")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: 5%% linear warmup, then cosine decay to 0 at --steps (constant: the paper's)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip-grad", type=float, default=0.5)
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model's forward and backward")
    ap.add_argument("--fsdp", action="store_true", help="shard the base over the torchrun processes (FSDP2)")
    ap.add_argument("--cache", action="store_true", help="keep text embeddings and latents in memory (small datasets)")
    ap.add_argument("--workers", type=int, default=0, help="processes that read and prepare samples ahead (0: inline)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="frozen base dtype (default bf16 on CUDA)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", type=Path, help="a run folder (its `latest`) or a step_* checkpoint")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--preview-every", type=int, default=0, help="save a preview edit every N steps (0: never)")
    ap.add_argument("--preview-steps", type=int, default=EDIT.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=None,
                    help="T5 tokens (default: the tokenizer_config.json of tokenizer_2, else 512)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def sample_generator(seed: int, g: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + g) % 2**63)


def warmup_cosine(lr: float, step: int, steps: int, warmup: float = 0.05) -> float:
    """The learning rate of step `step` (1-based) of `steps`: linear warmup, then cosine to zero.
    A function of the step alone, so a resumed run follows the same schedule."""
    warm = max(1, int(warmup * steps))
    if step <= warm:
        return lr * step / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def make_optimizer(args, params: list[Tensor]) -> torch.optim.Optimizer:
    if args.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise FluxMinimalError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt "
                                   "(or pass --optimizer adamw)") from None
        # the paper's settings: lr 1, bias correction, safeguard warmup, decoupled weight decay 0.01
        return Prodigy(params, lr=args.lr or 1.0, use_bias_correction=True, safeguard_warmup=True,
                       weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr or 1e-4, weight_decay=args.weight_decay)


class Batcher:
    """Turns sample numbers into model inputs; with --cache, prompts and latents are kept in memory."""

    def __init__(self, data: EditPairs, text: PromptEncoder, vae, device, dtype, seed: int, cache: bool):
        self.data, self.text, self.vae, self.device, self.dtype = data, text, vae, device, dtype
        self.seed, self.cache = seed, cache
        self.prompts: dict[str, tuple[Tensor, Tensor]] = {}  # prompt -> (txt [T, d], vec [d])
        self.latents: dict[int, tuple[Tensor, Tensor]] = {}  # pair -> (x0 [L, 64], img_cond [L, 320])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.prompts]
        if todo:
            txt, _, vec = self.text.encode_prompt(todo, device=self.device)
            fresh = {p: (txt[i], vec[i]) for i, p in enumerate(todo)}
        else:
            fresh = {}
        got = [self.prompts.get(p) or fresh[p] for p in prompts]
        if self.cache:
            self.prompts.update(fresh)
        return torch.stack([t for t, _ in got]), torch.stack([v for _, v in got])

    @torch.no_grad()
    def encode_images(self, pairs: list[int], diptychs: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        todo = [(i, d) for i, d in zip(pairs, diptychs) if i not in self.latents]
        fresh = {}
        if todo:
            x = torch.stack([d for _, d in todo]).to(self.device)  # [n, 3, R, 2R]
            x0, cond = encode_fill_example(self.vae, x, right_half_mask(*x.shape[-2:]).to(self.device))  # [n, L, 64|320]
            fresh = {i: (x0[k], cond[k]) for k, (i, _) in enumerate(todo)}
        got = [self.latents.get(i) or fresh[i] for i in pairs]
        if self.cache:
            self.latents.update(fresh)
        return torch.stack([a for a, _ in got]), torch.stack([c for _, c in got])

    def batch(self, rows: list[tuple[int, tuple]]) -> dict | None:
        """Model inputs for the readable samples [(g, (pair, diptych, prompt))] of one micro-batch
        (the unreadable ones were dropped by the loader: they count as zero loss)."""
        if not rows:
            return None
        gs = [g for g, _ in rows]
        pairs, diptychs, prompts = zip(*[s for _, s in rows])
        txt, vec = self.encode_prompts(list(prompts))
        x0, cond = self.encode_images(list(pairs), list(diptychs))
        gens = [sample_generator(self.seed, g) for g in gs]
        t = torch.sigmoid(torch.cat([torch.randn(1, generator=gen) for gen in gens]))  # logit-normal t
        eps = torch.stack([torch.randn(x0.shape[1:], generator=gen) for gen in gens])
        return dict(x0=x0, cond=cond, txt=txt, vec=vec, t=t.to(self.device), eps=eps.to(self.device))


def full_adapter(flux) -> dict[str, Tensor]:
    """The adapter in our format as whole tensors (FSDP shards are gathered: every process calls this)."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in lora_state_dict(flux).items()}


def flow_loss(model, b: dict, R: int, nominal: int, dtype, down: int = 8) -> tuple[Tensor, Tensor]:
    """ICEdit's loss for one micro-batch: sum over its samples / the nominal batch size (so a
    skipped sample counts as zero and N processes average to exactly the single-process loss).
    Returns (loss, per-sample MSE)."""
    B, dev = b["x0"].shape[0], b["x0"].device
    cond = Conditioning.of(b["txt"], b["vec"], b["cond"], R, 2 * R, down)
    per_sample = flow_matching_mse(model, b["x0"], b["eps"], b["t"], cond, torch.ones(B, device=dev), dtype)  # guidance 1
    return per_sample.sum() / nominal, per_sample.detach()


@torch.no_grad()
def preview(flux, vae, text, data: EditPairs, R: int, steps: int, path: Path, device, save: bool = True) -> None:
    """[source | edit | target] of the first pair, sampled with the inference code."""
    from infer.pipeline import ICEditPipeline
    diptych = data.diptych(0)
    src, tgt = to_pil(diptych[:, :, :R]), to_pil(diptych[:, :, R:])
    was_training = flux.training
    flux.eval()
    pipe = ICEditPipeline(flux, vae, text, device=device)
    instruction = data.instruction(0)
    edit = pipe.edit(src, instruction, width=R, steps=steps, seed=0, progress=False)
    flux.train(was_training)
    if save:
        save_png(make_diptych(make_diptych(src, edit), make_diptych(tgt, tgt)).crop((0, 0, 3 * R, R)), path,
                 {"instruction": instruction})


@dataclass
class Procs:
    """This process's place in the job (torchrun's environment; one process: size 1, rank 0)."""

    size: int
    rank: int
    device: torch.device
    dtype: torch.dtype  # the frozen base's

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(args) -> Procs:
    size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    torch.manual_seed(args.seed)
    return Procs(size, rank, device, dtype)


def load_models(args, procs: Procs):
    """The frozen base (VAE, DiT, text encoders) and the fresh adapter on it, in fp32 master weights."""
    vae = load_vae(args.weights, device=procs.device, dtype=torch.float32)
    flux = load_flux(args.weights, device=procs.device, dtype=procs.dtype)
    require_fill(flux, args.weights, vae_down(vae))
    flux.requires_grad_(False)
    text = PromptEncoder.from_pretrained(args.weights, device=procs.device, dtype=procs.dtype,
                                         max_length=args.max_length)
    add_lora(flux, rank=args.rank, alpha=args.alpha, experts=args.experts if args.adapter == "moe" else 0,
             seed=args.seed)
    if args.init_lora:  # e.g. continue from a released adapter (ICEdit issue #40)
        load_lora(flux, args.init_lora)
    for p in lora_parameters(flux):  # fp32 master weights, whatever the base dtype
        p.data = p.data.float()
        p.requires_grad_(True)
    flux.gradient_checkpointing = args.grad_checkpointing
    return flux.train(), vae, text


def resume_adapter(args, flux, samples_per_step: int) -> tuple[int, float, dict | None]:
    """Put a checkpoint's adapter into `flux` (before any sharding); returns (step, seconds trained,
    optimizer state to restore after sharding), or a fresh start."""
    if not args.resume:
        return 0, 0.0, None
    adapter, opt_state, state = load_checkpoint(args.resume)
    if state["samples_per_step"] != samples_per_step:
        raise FluxMinimalError(f"{args.resume} was trained with {state['samples_per_step']} samples per step; "
                               f"this run has {samples_per_step} (batch x grad-accum x processes): keep them equal")
    names = lora_state_dict(flux)
    with torch.no_grad():
        for k, v in adapter.items():
            if k in names and not k.rsplit(".", 2)[-2] == "alpha":
                names[k].copy_(v)
    return state["step"], state.get("seconds", 0.0), opt_state


def distribute(args, flux, procs: Procs):
    """The module the loop calls: FSDP-sharded, DDP-wrapped or plain, compiled if asked."""
    model = flux
    if args.fsdp:  # shard every block (base and adapter) over the processes: for a base too big for one GPU
        if procs.size < 2:
            raise FluxMinimalError("--fsdp shards over processes: launch with torchrun --nproc_per_node N")
        from torch.distributed.fsdp import fully_shard
        for block in [*flux.double_blocks, *flux.single_blocks]:
            fully_shard(block)
        fully_shard(flux)
    elif procs.size > 1:  # DDP: every process holds the base; only the adapter's gradients are all-reduced
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(flux, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    if args.compile:  # fused elementwise work (norms, modulation, RoPE, GELU): ~1.5x on small widths
        model = torch.compile(model)
    return model


class LossLog:
    """Per-sample losses binned by t, written to OUT/log.jsonl and printed every --log-every steps."""

    def __init__(self, args, procs: Procs, samples_per_step: int):
        self.args, self.procs, self.samples_per_step = args, procs, samples_per_step
        self.bins, self.t0 = defaultdict(list), time.perf_counter()

    def add(self, t: Tensor, per_sample: Tensor) -> None:
        for tk, lk in zip(t.tolist(), per_sample.tolist()):
            self.bins[min(int(tk * 4), 3)].append(lk)

    def write(self, step: int, trained: float, skipped: int, say) -> None:
        every, losses = self.args.log_every, [v for b in self.bins.values() for v in b]
        rec = {"step": step, "loss": sum(losses) / max(len(losses), 1),
               "loss_by_t": {f"{T_BINS[k]:.2f}-{T_BINS[k + 1]:.2f}": sum(v) / len(v) for k, v in sorted(self.bins.items())},
               "samples_per_s": self.samples_per_step * every / max(time.perf_counter() - self.t0, 1e-9),
               "skipped": skipped, "seconds": trained}
        if self.procs.device.type == "cuda":
            rec["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.procs.device) / 2**30
        with open(self.args.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        say(f"step {step}: loss {rec['loss']:.4f}, " + ", ".join(f"t {k} {v:.4f}" for k, v in rec["loss_by_t"].items()))
        self.bins, self.t0 = defaultdict(list), time.perf_counter()


def micro_batches(args, procs: Procs, start: int):
    """The sample numbers of this process's micro-batches, from step `start` to the end: the
    processes take turns, so N of them see exactly the samples one process would."""
    for step in range(start, args.steps):
        for a in range(args.grad_accum):
            g0 = ((step * args.grad_accum + a) * procs.size + procs.rank) * args.batch
            yield list(range(g0, g0 + args.batch))


def optimizer_step(args, model, batcher: Batcher, samples, params, optimizer, base_lr: float, step: int,
                   procs: Procs, down: int, log: LossLog) -> None:
    """One step: --grad-accum micro-batches from `samples` (the loader), clipping, the schedule."""
    for a in range(args.grad_accum):
        b = batcher.batch(next(samples))
        if b is None:  # every sample unreadable: a zero loss that still takes part in DDP
            loss = sum(p.sum() for p in params) * 0.0
        else:
            loss, per = flow_loss(model, b, args.resolution, args.batch, procs.dtype, down)
            log.add(b["t"], per)
        (loss / args.grad_accum).backward()
    torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    if args.schedule == "cosine":
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(base_lr, step + 1, args.steps)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def export(args, flux, data: EditPairs, procs: Procs, step: int, seconds: float) -> None:
    """The final adapter in our format and in the official one (every process gathers; rank 0 writes)."""
    adapter = full_adapter(flux)
    if not procs.main:
        return
    save_safetensors(adapter, args.out / "adapter.safetensors")
    save_safetensors(official_from_ours(adapter), args.out / "pytorch_lora_weights.safetensors")
    if data.skipped:
        print(f"skipped {sum(data.skipped.values())} unreadable sample(s): {dict(data.skipped.most_common(5))}")
    print(f"done: {step} steps in {seconds:.1f}s; adapter: {args.out / 'adapter.safetensors'}, "
          f"official format: {args.out / 'pytorch_lora_weights.safetensors'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_folder(args.out, "--out folder")  # before minutes of loading
    procs = start_processes(args)
    flux, vae, text = load_models(args, procs)
    samples_per_step = args.batch * args.grad_accum * procs.size
    step, trained, opt_state = resume_adapter(args, flux, samples_per_step)
    model = distribute(args, flux, procs)
    params = lora_parameters(flux)  # after sharding: FSDP replaces them with sharded ones
    optimizer = make_optimizer(args, params)
    base_lr = optimizer.param_groups[0]["lr"]  # (--schedule cosine scales it)
    if opt_state is not None:
        restore_optimizer(flux, optimizer, opt_state)
    data = EditPairs(args.data, resolution=args.resolution)
    batcher = Batcher(data, text, vae, procs.device, procs.dtype, args.seed, args.cache)
    samples = loader(data, args.seed, micro_batches(args, procs, step), args.workers)
    if procs.main:
        print(f"{len(data)} pairs, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters ({args.adapter}, "
              f"rank {args.rank}), {procs.size} process(es), {samples_per_step} samples/step, base {procs.dtype}, "
              f"start at step {step}")
    bar = None
    if procs.main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, unit="step")
    log, t0 = LossLog(args, procs, samples_per_step), time.perf_counter()
    while step < args.steps:
        t_step = time.perf_counter()
        optimizer_step(args, model, batcher, samples, params, optimizer, base_lr, step, procs, vae_down(vae), log)
        step, trained = step + 1, trained + time.perf_counter() - t_step
        if bar is not None:
            bar.update(1)
        if procs.main and (step % args.log_every == 0 or step == args.steps):
            log.write(step, trained, sum(data.skipped.values()), bar.write if bar else print)
        if step % args.save_every == 0 or step == args.steps:  # (gathering is collective under FSDP)
            adapter, opt = full_adapter(flux), optimizer_state(flux, optimizer)
            if procs.main:
                save_checkpoint(args.out, step, adapter, opt, {"samples_per_step": samples_per_step, "seconds": trained,
                                "args": {k: str(v) for k, v in vars(args).items()}})
        if args.preview_every and step % args.preview_every == 0 and (procs.main or args.fsdp):
            preview(flux, vae, text, data, args.resolution, args.preview_steps, args.out / f"preview_{step:07d}.png",
                    procs.device, save=procs.main)
        if procs.size > 1:
            dist.barrier()
    if bar is not None:
        bar.close()
    export(args, flux, data, procs, step, time.perf_counter() - t0)
    if procs.size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)
