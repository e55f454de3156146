"""The vision transformers the edit metrics use, parameter names = the transformers keys.

    CLIP (openai/clip-vit-base-patch32, -large-patch14; a CLIPModel folder):
      pixels [B, 3, S, S] -> conv P x P, no bias -> [class_embedding; patches] + position_embedding
      -> pre_layrnorm -> N pre-LN layers (clip.py's, not causal) -> post_layernorm(x[:, 0])
      -> visual_projection                                                     image_embeds [B, proj]
      input_ids -> the text tower (clip.py) pooled at EOS -> text_projection     text_embeds [B, proj]
    DINO (facebook/dino-vits16; a ViTModel folder):
      pixels -> conv P x P (bias) -> [cls_token; patches] + position_embeddings
      -> N pre-LN layers (clip.py's, not causal; ViT's key names mapped by VIT_RULES)
      -> layernorm -> x[:, 0]                                                  cls [B, hidden]

What the metrics compare are cosines of these vectors (flux_eval/metrics.py). No position-embedding
interpolation: the metrics' preprocessing always gives image_size x image_size.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from .clip import ACTIVATIONS, CLIPEncoder, CLIPTextModel, LayerNorm
from .config import CLIPConfig, from_hf_config
from .errors import WeightsError
from .loading import WEIGHTS_HELP, Rule, load_state, open_checkpoint, read_config


@dataclass
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields; the defaults are its own (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


# transformers' CLIPTextConfig defaults (ViT-B/32's text tower), for fields a config.json leaves out
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                          hidden_act="quick_gelu", eos_token_id=49407)


@dataclass
class ViTConfig(CLIPVisionConfig):
    """transformers' ViTConfig fields: the same shape fields, its own defaults (ViT-B/16)."""

    patch_size: int = 16
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True


def _check_size(pixels: Tensor, size: int) -> None:
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(f"pixels must be {size} x {size} (the model's image_size), not "
                         f"{tuple(pixels.shape[-2:])}: preprocess with flux_eval.metrics")


# ---- CLIP ----------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D, n = cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n + 1, D)

    def forward(self, pixels: Tensor) -> Tensor:
        x = rearrange(self.patch_embedding(pixels), "B D h w -> B (h w) D")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B, 1 + n, D]


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic: the checkpoint's key)
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] normalised -> pooled [B, D] (the class token after post_layernorm)."""
        _check_size(pixels, self.config.image_size)
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class CLIPModel(CLIPTextModel):
    """A whole CLIP: the text tower of clip.py (same keys), the vision tower, both projections."""

    def __init__(self, text: CLIPConfig, vision: CLIPVisionConfig, projection_dim: int = 512):
        super().__init__(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, projection_dim, bias=False)

    def image_features(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] CLIP-normalised -> [B, projection_dim] (openai's encode_image, unnormalised)."""
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, input_ids: Tensor) -> Tensor:
        """[B, 77] -> [B, projection_dim] (openai's encode_text, unnormalised)."""
        return self.text_projection(self.encode(input_ids)[1])


# ---- DINO (a plain ViT in transformers' ViTModel layout) -----------------------------------------

class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        x = rearrange(self.patch_embeddings.projection(pixels), "B D h w -> B (h w) D")
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings


# transformers' ViT layer is CLIP's pre-LN layer (clip.py) under other names; loading renames them
VIT_RULES = [Rule(f"encoder.layers.{{i}}.{ours}.{{w}}", f"encoder.layer.{{i}}.{theirs}.{{w}}") for ours, theirs in (
    ("self_attn.q_proj", "attention.attention.query"), ("self_attn.k_proj", "attention.attention.key"),
    ("self_attn.v_proj", "attention.attention.value"), ("self_attn.out_proj", "attention.output.dense"),
    ("layer_norm1", "layernorm_before"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
    ("layer_norm2", "layernorm_after"))]


class ViTModel(nn.Module):
    """`vit(pixels [B, 3, S, S]) -> [B, hidden]`: the class token after the final layernorm (what
    DINO's hub model returns, and MagicBrush's DINO metric compares)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS or not cfg.qkv_bias:
            raise ValueError(f"ViT with hidden_act {cfg.hidden_act!r}, qkv_bias {cfg.qkv_bias} is not supported "
                             f"(known activations: {sorted(ACTIVATIONS)}; q/k/v need biases)")
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, causal=False)  # keys renamed from ViT's by VIT_RULES
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        _check_size(pixels, self.config.image_size)
        return self.layernorm(self.encoder(self.embeddings(pixels)))[:, 0]


# ---- loading ------------------------------------------------------------------------------------

def _folder_config(path: Path, what: str) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: the {what} needs its folder (config.json + model.safetensors), as on the "
                           f"Hub. {WEIGHTS_HELP}")
    cfg = read_config(path)
    if cfg is None:
        raise WeightsError(f"{path / 'config.json'}: missing; the {what} folder needs its config. {WEIGHTS_HELP}")
    return path, cfg


def load_clip_model(path: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32) -> CLIPModel:
    """A CLIPModel folder (e.g. openai/clip-vit-base-patch32): both towers and projections."""
    path, cfg = _folder_config(path, "CLIP model")
    if "vision_config" not in cfg:
        raise WeightsError(f"{path / 'config.json'}: not a whole CLIP (no vision_config); the metrics need "
                           f"e.g. openai/clip-vit-base-patch32. {WEIGHTS_HELP}")
    text = from_hf_config(CLIPConfig, {**CLIP_TEXT_DEFAULTS, **(cfg.get("text_config") or {})})
    vision = from_hf_config(CLIPVisionConfig, cfg["vision_config"] or {})
    for c, part in ((text, "text_config"), (vision, "vision_config")):
        if c.hidden_act not in ACTIVATIONS:
            raise WeightsError(f"{path / 'config.json'}: {part}.hidden_act {c.hidden_act!r} is not supported")
    with torch.device("meta"):
        model = CLIPModel(text, vision, cfg.get("projection_dim", 512))
    ckpt = open_checkpoint(path, ("model.safetensors",), "model.safetensors.index.json")
    load_state(model, ckpt, device=device, dtype=dtype, what="CLIP model",
               ignore=(r"^logit_scale$", r"\.position_ids$"))
    return model.eval().requires_grad_(False)


def load_vit(path: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32) -> ViTModel:
    """A ViTModel folder (e.g. facebook/dino-vits16). Its pooler, if saved, is not used."""
    path, cfg = _folder_config(path, "ViT (DINO) model")
    with torch.device("meta"):
        model = ViTModel(from_hf_config(ViTConfig, cfg))
    ckpt = open_checkpoint(path, ("model.safetensors",), "model.safetensors.index.json")
    load_state(model, ckpt, VIT_RULES, device=device, dtype=dtype, what="ViT (DINO) model", ignore=(r"^pooler\.",))
    return model.eval().requires_grad_(False)
