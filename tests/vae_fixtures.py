"""VAE test fixtures: random FLUX VAEs written in both layouts, and test images.

`write_vae_pair` writes one random VAE twice: as BFL's `ae.safetensors` (our state dict, whose
names are BFL's) and as a diffusers `vae/` folder made by diffusers' own LDM->diffusers converter
(`convert_ldm_vae_checkpoint`) and `save_pretrained`. The converter is an independent reading of
the BFL names, so a wrong name of ours fails there, not silently in our remap table.

For a pipeline test snapshot, `write_tiny_vae_folder(root / "vae")` is all that is needed.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from flux_minimal import PRESETS, AutoEncoderParams
from flux_minimal.vae import AutoEncoder
from flux_bench.common import diffusers_vae_config  # noqa: F401 (the tests use it from here too)
from tests.helpers import randomize_


def write_tiny_vae_folder(folder: str | Path, p: AutoEncoderParams | None = None, std: float = 0.05,
                          seed: int = 0) -> AutoencoderKL:
    """A random diffusers AutoencoderKL saved as a `vae/` folder (config.json + safetensors)."""
    ref = randomize_(AutoencoderKL(**diffusers_vae_config(p or PRESETS["tiny-fill"].ae)), std=std, seed=seed)
    ref.save_pretrained(folder)
    return ref.eval()


def write_vae_pair(root: Path, p: AutoEncoderParams, std: float = 0.05, seed: int = 0
                   ) -> tuple[AutoEncoder, AutoencoderKL, Path, Path]:
    """A random VAE as root/ae.safetensors and root/vae/ (see the module docstring).
    Returns (ours, diffusers reference, the file, the folder)."""
    with torch.device("meta"):
        ours = AutoEncoder(p)
    ours = randomize_(ours.to_empty(device="cpu"), std=std, seed=seed).eval()
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    ae_file = root / "ae.safetensors"
    save_file(state, ae_file)

    cfg = diffusers_vae_config(p)
    converted = convert_ldm_vae_checkpoint(dict(state), cfg)
    with torch.device("meta"):
        ref = AutoencoderKL(**cfg)
    ref.load_state_dict(converted, strict=True, assign=True)  # every BFL name must have been understood
    folder = root / "vae"
    ref.save_pretrained(folder)
    return ours, ref.eval(), ae_file, folder


def image(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image in [-1, 1] [B, 3, H, W]: bilinear 8x upsampled noise plus fine grain."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, H // 8 + 1, W // 8 + 1, generator=g) * 2 - 1
    x = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(B, 3, H, W, generator=g)).clamp(-1, 1)


def latents(B: int, C: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Scaled latents as the sampler produces them: roughly unit variance."""
    return torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(seed))
