"""Prompt encoding for FLUX: text -> (txt, txt_ids, vec), the DiT's text inputs.

    texts --T5 tokenizer (max_length, 512)--> [B, L] --T5 encoder--> txt [B, L, 4096]   every position
    texts --CLIP tokenizer (77)-------------> [B, 77] --CLIP-------> vec [B, 768]       pooled at EOS
    txt_ids = zeros [B, L, 3]: text tokens all sit at rope position (0, 0, 0)

The same maths as BFL's `HFEmbedder` pair and diffusers' `FluxFillPipeline.encode_prompt`.
Note that the T5 padding length changes the result (FLUX attends to the pads): diffusers' Fill
pipeline uses 512, BFL's `cli_fill.py` 128 (docs/flux.md section 1, item 5).
"""

import gc
import json
from pathlib import Path

import torch
from torch import Tensor

from .clip import CLIPTextModel, load_clip
from .errors import FluxMinimalError, WeightsError
from .loading import WEIGHTS_HELP
from .t5 import T5EncoderModel, load_t5
from .tokenizers import CLIPTokenizer, T5Tokenizer

# The folders of a FLUX snapshot (diffusers layout) and the files each must hold.
TEXT_FOLDERS = {
    "text_encoder": "the CLIP-L text model (config.json, model.safetensors)",
    "text_encoder_2": "the T5-XXL encoder (config.json, model.safetensors.index.json and shards)",
    "tokenizer": "the CLIP tokenizer (vocab.json, merges.txt)",
    "tokenizer_2": "the T5 tokenizer (spiece.model)",
}


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class PromptEncoder:
    """The two tokenizers and the two text encoders of FLUX, as one object.

    The encoders may sit on another device than the DiT (e.g. T5 on the CPU): each gets its ids
    on its own device, and `encode_prompt` returns everything on the device asked for.
    """

    def __init__(self, t5: T5EncoderModel, clip: CLIPTextModel, t5_tokenizer: T5Tokenizer,
                 clip_tokenizer: CLIPTokenizer):
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer

    @classmethod
    def from_pretrained(cls, root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        max_length: int | None = None, fp8: bool = False) -> "PromptEncoder":
        """Load from a FLUX snapshot root holding text_encoder/ (CLIP), text_encoder_2/ (T5),
        tokenizer/ (vocab.json, merges.txt) and tokenizer_2/ (spiece.model). dtype=None keeps the
        files' dtypes (bfloat16 in FLUX's); max_length is T5's padded length (CLIP's is 77): by
        default tokenizer_2/tokenizer_config.json's model_max_length, else 512 (FLUX's). fp8: T5's
        linear weights in FP8 (t5.load_t5); CLIP (0.25 GB) stays as it is."""
        root = Path(root)
        if not root.is_dir():
            raise WeightsError(f"{root}: no such folder (expected a FLUX snapshot with the text folders "
                               f"{', '.join(TEXT_FOLDERS)}). {WEIGHTS_HELP}")
        missing = [f"{name}/ ({what})" for name, what in TEXT_FOLDERS.items() if not (root / name).is_dir()]
        if missing:
            raise WeightsError(f"{root} lacks the text folder(s) {'; '.join(missing)}. A FLUX.1-Fill-dev snapshot "
                               f"has them all. {WEIGHTS_HELP}")
        if max_length is None:  # T5 attends to its pads, so the padded length is part of the model
            cfg = root / "tokenizer_2" / "tokenizer_config.json"
            max_length = (json.loads(cfg.read_text()).get("model_max_length") if cfg.is_file() else None) or 512
            max_length = 512 if max_length > 100_000 else int(max_length)  # transformers' "no limit" marker
        t5_tokenizer = T5Tokenizer(root / "tokenizer_2" / "spiece.model", max_length=max_length)
        clip = load_clip(root / "text_encoder", device=device, dtype=dtype)
        clip_tokenizer = CLIPTokenizer(root / "tokenizer" / "vocab.json", root / "tokenizer" / "merges.txt",
                                       max_length=clip.config.max_position_embeddings)  # 77
        t5 = load_t5(root / "text_encoder_2", device=device, dtype=dtype, fp8=fp8)
        for name, tok, model in (("tokenizer_2", t5_tokenizer, t5), ("tokenizer", clip_tokenizer, clip)):
            if tok.vocab_size > model.config.vocab_size:
                raise WeightsError(f"{root / name} makes ids up to {tok.vocab_size - 1}, but its text encoder has only "
                                   f"{model.config.vocab_size} embeddings: the folders do not belong together. "
                                   f"{WEIGHTS_HELP}")
        return cls(t5, clip, t5_tokenizer, clip_tokenizer)

    @torch.no_grad()
    def encode_prompt(self, texts: list[str], device: str | torch.device | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """texts (B strings) -> txt [B, L, d_t5], txt_ids [B, L, 3] (zeros, float32), vec [B, d_clip],
        on `device` (default: T5's device), in the encoders' dtypes."""
        if self.t5 is None or self.clip is None:
            raise FluxMinimalError("the text encoders were freed (PromptEncoder.free()); load them again with "
                                   "PromptEncoder.from_pretrained, or encode the prompts before freeing")
        texts = [texts] if isinstance(texts, str) else list(texts)
        t5_device, clip_device = _module_device(self.t5), _module_device(self.clip)
        device = torch.device(device) if device is not None else t5_device
        txt = self.t5(self.t5_tokenizer(texts).to(t5_device)).to(device)  # [B, L, d_t5]
        vec = self.clip(self.clip_tokenizer(texts).to(clip_device)).to(device)  # [B, d_clip]
        txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=device)
        return txt, txt_ids, vec

    def to(self, device: str | torch.device) -> "PromptEncoder":
        """Move both encoders (e.g. to the GPU for encoding, back to the CPU afterwards)."""
        for model in (self.t5, self.clip):
            if model is not None:
                model.to(device)
        return self

    def free(self) -> None:
        """Drop the encoders' weights (T5-XXL is 9.5 GB in bf16) once the prompts are encoded; the
        tokenizers stay. Accelerator memory is returned to the device as well."""
        self.t5 = self.clip = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
