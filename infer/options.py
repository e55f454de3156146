"""Every default and every choice of an edit, in one place.

The pipeline's signature, the CLI, the web app, evaluation and training previews read them from
here, so a default is typed once (tests/test_options.py fails if one is typed again elsewhere).

    from infer.options import EDIT, PRESETS
    pipe.edit(image, instruction, steps=EDIT.steps)     # 28, ICEdit's
    PRESETS["mini"].edit.width                          # 64: the mini model's scenes
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EditOptions:
    """How one edit is sampled (ICEdit's settings unless said)."""

    width: int = 512  # the source is resized to this width (a multiple of 16); the diptych is twice as wide
    steps: int = 28  # Euler steps over FLUX's shifted schedule
    guidance: float = 50.0  # FLUX.1 Fill's distilled guidance, as ICEdit samples it
    seed: int = 42
    candidates: int = 1  # early-filter scaling: M noise candidates (1: off)
    early_steps: int = 10  # early-filter scaling: m preview steps
    preview: str = "short"  # "short": a complete m-step edit (the paper); "x0": the n-step run's x0 at m


EDIT = EditOptions()
PREVIEWS = ("short", "x0")
OFFLOAD_MODES = ("none", "model", "blocks")
# The judge the paper uses for early filtering, as an OpenAI-compatible server names it (vLLM: the
# Hub id). Any model the server serves can be given instead.
JUDGE_MODEL = "Qwen/Qwen2.5-VL-72B-Instruct"
# One dtype vocabulary for every command line (torch's own names).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Preset:
    """Weights shipped with the repository, with the edit settings they were trained for."""

    weights: Path
    lora: Path | None
    edit: EditOptions = field(default_factory=EditOptions)


PRESETS = {
    "mini": Preset(REPO / "assets" / "mini", REPO / "assets" / "mini" / "lora_moe.safetensors", replace(EDIT, width=64)),
}


def default_dtype(device: "str | torch.device") -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU (the models' weights and activations)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
