"""ICEdit: one source image + one instruction -> the edited image, on FLUX.1 Fill [dev].

    pipe = ICEditPipeline.from_pretrained("FLUX.1-Fill-dev", device="cuda", lora="ICEdit-MoE-LoRA")
    edited = pipe.edit("cat.png", "make the cat wear a red hat")      # a PIL image
    print(pipe.last_report)                                           # timings, NFE, peak memory

The path of one edit (each stage timed in `last_report["seconds"]`):
    text    T5 + CLIP on the in-context prompt            -> txt [1, T, 4096], vec [1, 768]
    encode  VAE of the masked diptych [src | gray]        -> img_cond [1, L, 320]
    denoise Euler over the FLUX schedule, M candidates in one batch (early filter: infer/scaling.py)
    decode  VAE decode, crop the right half               -> the edit
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from flux_minimal.errors import FluxMinimalError, WeightsError
from flux_minimal.flux_loading import load_flux, require_fill
from flux_minimal.icedit import IC_PROMPT, ic_prompt, make_diptych, right_half, right_half_mask
from flux_minimal.images import MIN_SIDE, fit_width, load_image, to_pil, to_tensor
from flux_minimal.loading import WEIGHTS_HELP
from flux_minimal.mmdit import Flux
from flux_minimal.ops import set_attention_backend
from flux_minimal.sampling import (Conditioning, DenoiseState, denoise, fill_conditioning, get_noise, get_schedule,
                                   pack, unpack, vae_down)
from flux_minimal.text import PromptEncoder
from flux_minimal.vae import load_vae
from flux_minimal.timing import Stopwatch, peak_memory
from infer.fast import GraphedDenoiser, compile_blocks
from infer.offload import Visitor, block_budget, offload_dit
from infer.options import EDIT, OFFLOAD_MODES, default_dtype


@dataclass
class EditJob:
    """One prepared edit: the fitted source, its diptych and everything the sampler conditions on."""

    source: Image.Image  # the fitted source, w x h
    instruction: str
    height: int  # diptych pixel size: h x 2w
    width: int
    cond: Conditioning
    down: int = 8  # the VAE's downsampling factor: a token is 2*down pixels square

    @property
    def seq_len(self) -> int:
        return (self.height // (2 * self.down)) * (self.width // (2 * self.down))


class ICEditPipeline:
    def __init__(self, flux: Flux, vae, text: PromptEncoder, device="cpu", offload: str = OFFLOAD_MODES[0],
                 files: str = "", compile: bool = False, cuda_graphs: bool = False):
        """compile: regional torch.compile of the DiT's blocks; cuda_graphs: each denoising step
        replayed from a CUDA graph captured once per shape (infer/fast.py; a CPU runs the same
        static-buffer step eagerly)."""
        if offload not in OFFLOAD_MODES:
            raise FluxMinimalError(f"offload must be one of {OFFLOAD_MODES}, not {offload!r}")
        if cuda_graphs and offload == "blocks":
            raise FluxMinimalError("cuda_graphs needs the whole DiT on the GPU; it cannot stream blocks (offload='blocks')")
        self.flux, self.vae, self.text = flux, vae, text
        self.device, self.offload, self.files = torch.device(device), offload, files
        self.last_report: dict = {}
        self._dit = self._text = None  # Visitors (infer/offload.py) when offloading
        if offload != "none":
            self._text = Visitor([text.t5, text.clip], self.device)
            budget = float("inf") if offload == "model" else block_budget(self.device)
            self._dit = offload_dit(flux, self.device, budget)
        if compile:
            compile_blocks(flux)
        self._graphed = GraphedDenoiser(flux) if cuda_graphs else None

    @classmethod
    def from_pretrained(cls, path: "str | Path", device="cpu", dtype: torch.dtype | None = None,
                        lora: "str | Path | None" = None, lora_scale: float = 1.0, offload: str = OFFLOAD_MODES[0],
                        max_length: int | None = None, merge_lora: bool = True, vae_dtype: torch.dtype | None = None,
                        compile: bool = False, cuda_graphs: bool = False,
                        attention: str | None = None, fp8: bool = False) -> "ICEditPipeline":
        """Load a FLUX.1-Fill-dev snapshot folder: diffusers layout (transformer/, vae/, text_encoder/,
        text_encoder_2/, tokenizer/, tokenizer_2/) or the BFL files flux1-fill-dev.safetensors and
        ae.safetensors beside the text folders. dtype=None: bfloat16 on CUDA, float32 on the CPU;
        the VAE likewise (vae_dtype; its bf16 error is in the README's benchmark notes).
        offload: "none", "model" or "blocks" (infer/offload.py: one big model on the GPU at a time,
        and optionally streamed DiT blocks). merge_lora: fold a plain LoRA into the weights it adapts
        (no cost per step; a LoRA-MoE's routed layers stay apart, on the fused kernel).
        compile, cuda_graphs: infer/fast.py. attention: a backend of flux_minimal.ops ("sdpa",
        "flash", "cudnn", "efficient", "math"), checked on `device` first.
        fp8: the DiT's and T5's linear weights in float8 with per-channel scales, quantized while
        loading (flux_minimal/fp8.py); a plain LoRA is added to the weights before quantizing, a
        LoRA-MoE's experts stay in `dtype` beside the FP8 base.
        """
        root, device = Path(path), torch.device(device)
        if not root.is_dir():
            raise WeightsError(f"{root}: no such weights folder. {WEIGHTS_HELP}")
        if offload not in OFFLOAD_MODES:
            raise FluxMinimalError(f"offload must be one of {OFFLOAD_MODES}, not {offload!r}")
        dtype = dtype or default_dtype(device)
        if attention is not None:
            try:
                set_attention_backend(attention, device, dtype)
            except ValueError as e:
                raise FluxMinimalError(str(e)) from None
        stay = device if offload == "none" else "cpu"  # offloaded weights stay in host memory
        vae = load_vae(root, device=device, dtype=vae_dtype or dtype)
        from flux_minimal.lora import merge_lora as merge
        from flux_minimal.lora_files import load_lora
        if fp8:  # a plain LoRA goes into the weights before they are quantized; MoE experts after
            flux = load_flux(root, device=stay, dtype=dtype, fp8=True, lora=lora if merge_lora else None,
                             lora_scale=lora_scale)
            if lora is not None:
                load_lora(flux, lora, scale=lora_scale, only_moe=merge_lora)
        else:
            flux = load_flux(root, device=stay, dtype=dtype)
            if lora is not None:
                load_lora(flux, lora, scale=lora_scale)
                if merge_lora:
                    merge(flux)
        require_fill(flux, root, vae_down(vae))
        text = PromptEncoder.from_pretrained(root, device=stay, dtype=dtype, max_length=max_length, fp8=fp8)
        files = f"{root.name}" + (f" + LoRA {Path(lora).name} x{lora_scale}" if lora else "") + (" (fp8)" if fp8 else "")
        return cls(flux, vae, text, device=device, offload=offload, files=files, compile=compile,
                   cuda_graphs=cuda_graphs)

    # ---- the stages ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        if self._text is None:
            return self.text.encode_prompt(prompts, device=self.device)
        if self._graphed is not None:  # the graphs hold the DiT's weight addresses, which are about to move
            self._graphed.drop()
        self._dit.leave()  # one big model on the GPU at a time
        self._text.arrive()
        try:
            return self.text.encode_prompt(prompts, device=self.device)
        finally:
            self._text.leave()
            self._dit.arrive()

    @torch.no_grad()
    def prepare(self, image, instruction: str, width: int = EDIT.width, watch: Stopwatch | None = None,
                min_side: int = MIN_SIDE, template: str = IC_PROMPT, mask: Tensor | None = None) -> EditJob:
        """Fit the source, build the diptych and mask, encode the prompt and the masked diptych.
        `template` is the in-context prompt; "{instruction}" alone gives the paper's ablation
        without it. `mask` [1, 1, H, W] (1: generate) replaces ICEdit's right-half mask, for Fill
        on other holes (the mini world's probes)."""
        watch = watch or Stopwatch(self.device)
        source = fit_width(load_image(image, min_side), width)
        prompt = ic_prompt(instruction, template)
        diptych = make_diptych(source)
        W, H = diptych.size
        if mask is not None and tuple(mask.shape) != (1, 1, H, W):
            raise FluxMinimalError(f"mask must have shape [1, 1, {H}, {W}] for this diptych, not {list(mask.shape)}")
        with watch("text"):
            txt, _, vec = self.encode_text([prompt])
        with watch("encode"):
            img_cond = fill_conditioning(self.vae, to_tensor(diptych).to(self.device),
                                         (right_half_mask(H, W) if mask is None else mask).to(self.device))
        down = vae_down(self.vae)
        cond = Conditioning.of(txt, vec, img_cond, H, W, down)
        return EditJob(source, instruction, H, W, cond, down)

    @torch.no_grad()
    def sample(self, job: EditJob, state: DenoiseState, guidance: float, stop: int | None = None,
               desc: str = "denoise", progress: bool = True) -> DenoiseState:
        if self._dit is not None:
            self._dit.arrive()
        bar = None
        if progress:
            from tqdm import tqdm
            total = (stop if stop is not None else len(state.timesteps) - 1) - state.step
            bar = tqdm(total=total, desc=desc, unit="step", leave=False)
        update = (lambda s: bar.update(1)) if bar else None
        try:
            if self._graphed is not None:
                return self._graphed.denoise(state, job.cond, guidance, stop=stop, callback=update)
            return denoise(self.flux, state, job.cond, guidance, stop=stop, callback=update)
        finally:
            if bar is not None:
                bar.close()

    @torch.no_grad()
    def decode(self, x: Tensor, job: EditJob) -> list[Image.Image]:
        """Packed latents [B, L, 64] -> the right halves of the decoded diptychs."""
        z = unpack(x.float(), job.height, job.width, job.down)
        return [right_half(to_pil(self.vae.decode(z[i:i + 1]))) for i in range(z.shape[0])]

    def initial_state(self, job: EditJob, seeds: list[int], steps: int, latents: Tensor | None = None) -> DenoiseState:
        if latents is not None:
            want = (1, 16, job.height // job.down, job.width // job.down)
            if tuple(latents.shape) != want:
                raise FluxMinimalError(f"latents must have shape {list(want)} for this {job.width}x{job.height} "
                                       f"diptych, not {list(latents.shape)}")
            noise = latents.float().cpu()
        else:
            noise = get_noise(seeds, job.height, job.width, down=job.down)
        return DenoiseState(pack(noise).to(self.device), get_schedule(steps, job.seq_len))

    # ---- the API ------------------------------------------------------------------------------------

    def edit(self, image, instruction: str, *, width: int = EDIT.width, steps: int = EDIT.steps,
             guidance: float = EDIT.guidance, seed: int = EDIT.seed, latents: Tensor | None = None,
             candidates: int = EDIT.candidates, early_steps: int = EDIT.early_steps, preview: str = EDIT.preview, judge=None, save_candidates: "str | Path | None" = None,
             progress: bool = True, min_side: int = MIN_SIDE, template: str = IC_PROMPT) -> Image.Image:
        """Edit `image` (a path or a PIL image) as `instruction` says; returns the edited PIL image.

        candidates > 1 turns on early-filter scaling (infer/scaling.py): `candidates` noises are
        denoised `early_steps` steps in one batch, `judge` picks the best preview, the winner is
        finished. `last_report` holds the stage timings, NFE, peak memory and the tournament.
        Inputs with a side under `min_side` (64) pixels are refused.
        """
        if steps < 1:
            raise FluxMinimalError(f"steps must be >= 1, not {steps}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        watch = Stopwatch(self.device)
        t0 = time.perf_counter()
        job = self.prepare(image, instruction, width, watch, min_side, template)
        report = {"instruction": instruction, "seed": seed, "steps": steps, "guidance": guidance,
                  "size": f"{job.width // 2}x{job.height}", "files": self.files}
        if candidates > 1:
            from infer.scaling import early_filter
            state, scaling = early_filter(self, job, seed=seed, steps=steps, guidance=guidance,
                                          candidates=candidates, early_steps=early_steps, preview=preview,
                                          judge=judge, watch=watch, save_candidates=save_candidates,
                                          progress=progress)
            report.update(scaling)
        else:
            state = self.initial_state(job, [seed], steps, latents)
            with watch("denoise"):
                state = self.sample(job, state, guidance, progress=progress)
        with watch("decode"):
            out = self.decode(state.x, job)[0]
        # it/s of the "denoise" stage: the winner of an x0-preview tournament resumes at early_steps
        ran = steps - early_steps if candidates > 1 and preview == "x0" else steps
        report.update(nfe=state.nfe if candidates == 1 else report["nfe"], seconds=watch.seconds,
                      total_seconds=time.perf_counter() - t0, it_per_s=ran / max(watch.seconds["denoise"], 1e-9),
                      **peak_memory(self.device))
        self.last_report = report
        return out

    def edit_turns(self, image, instructions: list[str], **kwargs) -> list[Image.Image]:
        """Multi-turn editing: each instruction edits the previous turn's result; returns every turn."""
        results, reports, current = [], [], image
        for k, instruction in enumerate(instructions):
            # our own results are accepted at any size the first turn produced
            current = self.edit(current, instruction, **kwargs, **({"min_side": 16} if k else {}))
            results.append(current)
            reports.append(self.last_report)
        self.last_report = {"turns": reports}
        return results
