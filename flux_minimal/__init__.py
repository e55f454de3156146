"""flux-minimal: FLUX.1 Fill [dev] and ICEdit from scratch, in readable PyTorch + Triton."""

from .config import PRESETS, AutoEncoderParams, CLIPConfig, FluxParams, Preset, T5Config
from .errors import FluxMinimalError, WeightsError
from .mmdit import Flux
from .flux_loading import load_flux, require_fill
from .vae import AutoEncoder, load_vae
from .clip import CLIPTextModel, load_clip
from .t5 import T5EncoderModel, load_t5
from .text import PromptEncoder
from .tokenizers import CLIPTokenizer, T5Tokenizer
from .lora import add_lora, merge_lora, unmerge_lora
from .lora_files import load_lora

__all__ = [
    "PRESETS", "AutoEncoderParams", "CLIPConfig", "FluxParams", "Preset", "T5Config",
    "FluxMinimalError", "WeightsError",
    "Flux", "load_flux", "require_fill",
    "AutoEncoder", "load_vae", "CLIPTextModel", "load_clip", "T5EncoderModel", "load_t5",
    "PromptEncoder", "CLIPTokenizer", "T5Tokenizer",
    "add_lora", "load_lora", "merge_lora", "unmerge_lora",
]
