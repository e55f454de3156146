"""flux-minimal: FLUX.1 Fill [dev] and ICEdit from scratch, in readable PyTorch + Triton."""

from .config import PRESETS, AutoEncoderParams, CLIPConfig, FluxParams, Preset, T5Config
from .errors import FluxMinimalError, WeightsError
from .mmdit import Flux, load_flux, require_fill
