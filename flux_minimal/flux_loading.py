"""Loading the FLUX transformer's weights: a BFL single file or a diffusers folder, LoRA/FP8 at load.

    flux1-fill-dev.safetensors (BFL keys = our parameter names; a ComfyUI prefix is dropped)
    transformer/ (diffusers: config.json + one or sharded files, read through the key table
                  flux_keys.FLUX_FROM_DIFFUSERS), or a snapshot root holding either
        -> configuration inferred (shapes or config.json) -> Flux built on meta -> tensors assigned

The model is built on the meta device and receives the file's tensors, memory-mapped, strictly
checked (loading.load_state). With fp8=True each linear weight is quantized as it is read
(fp8.load_fp8), and a plain LoRA is added to it first (lora_files.plain_lora_updates), because
merging after quantizing would round twice. Without FP8, LoRA files load on top of the model
(lora_files.load_lora).
"""

from pathlib import Path

import torch

from .config import FluxParams
from .errors import WeightsError
from .flux_keys import FLUX_FROM_DIFFUSERS
from .fp8 import load_fp8
from .loading import WEIGHTS_HELP, Checkpoint, Rule, count_blocks, load_state, open_checkpoint, read_config
from .lora_files import plain_lora_updates
from .mmdit import Flux

BFL_NAMES = ("flux1-fill-dev.safetensors", "flux1-dev.safetensors")
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = ("diffusion_pytorch_model.safetensors",)
COMFY_PREFIX = "model.diffusion_model."


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """(16, 56, 56) for FLUX's head_dim 128; the same proportions (d/8, 7d/16, 7d/16) otherwise."""
    a0 = head_dim // 8
    return a0, (head_dim - a0) // 2, (head_dim - a0) // 2


def flux_params_from_bfl(ckpt: Checkpoint) -> FluxParams:
    """Infer the configuration of a BFL single file from its tensor shapes."""
    keys = ckpt.keys()
    if "img_in.weight" not in ckpt:
        raise WeightsError(f"{ckpt.name} has no img_in.weight: it is not a FLUX transformer checkpoint. "
                           f"{WEIGHTS_HELP}")
    hidden, in_channels = ckpt.shape("img_in.weight")
    depth, depth_single = count_blocks(keys, "double_blocks"), count_blocks(keys, "single_blocks")
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = ckpt.shape(norm_key)[0]
    mlp_hidden = (ckpt.shape("double_blocks.0.img_mlp.0.weight")[0] if depth
                  else ckpt.shape("single_blocks.0.linear1.weight")[0] - 3 * hidden)
    return FluxParams(
        in_channels=in_channels, out_channels=ckpt.shape("final_layer.linear.weight")[0],
        vec_in_dim=ckpt.shape("vector_in.in_layer.weight")[1], context_in_dim=ckpt.shape("txt_in.weight")[1],
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=depth_single, axes_dim=default_axes_dim(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in ckpt or depth == 0,
        guidance_embed="guidance_in.in_layer.weight" in ckpt)


def flux_params_from_diffusers(cfg: dict) -> FluxParams:
    """The configuration of a diffusers `transformer/config.json`."""
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return FluxParams(
        in_channels=cfg["in_channels"], out_channels=cfg.get("out_channels") or cfg["in_channels"],
        vec_in_dim=cfg["pooled_projection_dim"], context_in_dim=cfg["joint_attention_dim"],
        hidden_size=heads * head_dim, num_heads=heads, depth=cfg["num_layers"],
        depth_single_blocks=cfg["num_single_layers"],
        axes_dim=tuple(cfg.get("axes_dims_rope") or default_axes_dim(head_dim)),
        guidance_embed=cfg.get("guidance_embeds", False))


def find_flux(path: str | Path) -> tuple[Checkpoint, FluxParams, list[Rule]]:
    """Resolve any accepted layout to (checkpoint, configuration, key rules)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():  # a Hugging Face snapshot root
        path = path / "transformer"
    if path.is_dir():  # a snapshot root with a BFL single file beside the folders (Fill first)
        bfl = [path / n for n in BFL_NAMES if (path / n).is_file()] or \
              sorted(path.glob("flux1-*.safetensors"), key=lambda f: ("fill" not in f.name, f.name))
        if bfl:
            path = bfl[0]
    if path.is_dir():
        ckpt = open_checkpoint(path, DIFFUSERS_SINGLE, DIFFUSERS_INDEX)
        cfg = read_config(path)
        if cfg is None:
            raise WeightsError(f"{path} has diffusers weights but no config.json. {WEIGHTS_HELP}")
        return ckpt, flux_params_from_diffusers(cfg), FLUX_FROM_DIFFUSERS
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder. {WEIGHTS_HELP}")
    ckpt = Checkpoint([path], prefix=COMFY_PREFIX)
    return ckpt, flux_params_from_bfl(ckpt), []


def load_flux(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              fp8: bool = False, lora: "str | Path | None" = None, lora_scale: float = 1.0) -> Flux:
    """Load the FLUX transformer from a BFL single file (`flux1-fill-dev.safetensors`, also with a
    `model.diffusion_model.` prefix), a diffusers `transformer/` folder (sharded or not), or a
    snapshot root holding either. dtype=None keeps the file's dtype.

    fp8=True: every linear weight becomes float8_e4m3fn with a scale per output channel
    (flux_minimal/fp8.py), quantized as it is read, one tensor at a time; the rest (norms, biases)
    and the compute take `dtype` (default bf16). `lora`: a plain LoRA added to the weights before
    they are quantized (its MoE parts, if any, go on afterwards: lora_files.load_lora(..., only_moe=True)).
    Files already in float8 load as they are, with their scales when present."""
    ckpt, params, rules = find_flux(path)
    with torch.device("meta"):
        model = Flux(params)
    float8 = [k for k in ckpt.keys() if ckpt.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if not fp8:
        if float8:
            raise WeightsError(f"{ckpt.name} holds FP8 weights ({float8[0]}, ...): load it with fp8=True (--fp8)")
        if lora is not None:
            raise ValueError("load_flux(lora=...) merges while quantizing (fp8=True); otherwise use "
                             "lora_files.load_lora")
        return load_state(model, ckpt, rules, device=device, dtype=dtype, what="FLUX transformer").eval()
    updates = plain_lora_updates(model, lora, lora_scale) if lora is not None else {}
    load_fp8(model, ckpt, rules, device=device, dtype=dtype or torch.bfloat16, what="FLUX transformer",
             updates=updates)
    return model.eval()


def require_fill(model: Flux, path: str | Path = "the checkpoint", down: int = 8) -> None:
    """ICEdit needs FLUX.1 Fill (384 input channels); say so plainly when given another FLUX.
    (`down`: the VAE's downsampling factor; a Fill model takes 64 + 64 + 4 down^2 channels.)"""
    n = model.params.in_channels
    if n != 128 + 4 * down * down:
        kind = {64: "FLUX.1 [dev] (or schnell)", 128: "FLUX.1 Canny/Depth [dev]"}.get(n, f"a {n}-channel FLUX")
        raise WeightsError(f"{path} is {kind}: its img_in takes {n} channels, but ICEdit inpaints with "
                           f"FLUX.1 Fill [dev], which takes 384 (noisy latent 64 + masked image 64 + mask 256). "
                           f"Download black-forest-labs/FLUX.1-Fill-dev. {WEIGHTS_HELP}")
