"""A tiny random FLUX.1-Fill-dev snapshot folder, in the diffusers layout, that both our pipeline and
diffusers' FluxFillPipeline load: transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/, scheduler/, model_index.json. Offline, a few seconds."""

import json
from pathlib import Path

import torch

from flux_minimal import PRESETS
from tests.helpers import randomize_
from tests.test_mmdit import diffusers_flux
from tests.text_fixtures import write_tiny_text_components
from tests.vae_fixtures import write_tiny_vae_folder

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
             "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True}
MODEL_INDEX = {"_class_name": "FluxFillPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def write_tiny_snapshot(root: Path, seed: int = 0) -> Path:
    root = Path(root)
    preset = PRESETS["tiny-fill"]
    transformer = randomize_(diffusers_flux(preset.flux), std=0.1, seed=seed)
    transformer.save_pretrained(root / "transformer")
    vae = write_tiny_vae_folder(root / "vae", preset.ae, std=0.05, seed=seed)
    # Posterior std ~ exp(-15): diffusers' pipeline samples the VAE posterior where we take its mean;
    # with a (clamped) logvar of -30 the two agree to ~1e-7, so the pipelines can be compared.
    with torch.no_grad():
        z = preset.ae.z_channels
        vae.encoder.conv_out.weight[z:] = 0
        vae.encoder.conv_out.bias[z:] = -30.0
    vae.save_pretrained(root / "vae")
    write_tiny_text_components(root, seed=seed)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root
