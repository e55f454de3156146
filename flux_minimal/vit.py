"""The vision transformers the edit metrics use, parameter names = the transformers keys.

    CLIP (openai/clip-vit-base-patch32, -large-patch14; a CLIPModel folder):
      pixels [B, 3, S, S] -> conv P x P, no bias -> [class_embedding; patches] + position_embedding
      -> pre_layrnorm -> N pre-LN layers (clip.py's, not causal) -> post_layernorm(x[:, 0])
      -> visual_projection                                                     image_embeds [B, proj]
      input_ids -> the text tower (clip.py) pooled at EOS -> text_projection     text_embeds [B, proj]
    DINO (facebook/dino-vits16; a ViTModel folder):
      pixels -> conv P x P (bias) -> [cls_token; patches] + position_embeddings
      -> N pre-LN layers: x += output(attention(layernorm_before(x))); x += mlp(layernorm_after(x))
      -> layernorm -> x[:, 0]                                                  cls [B, hidden]

What the metrics compare are cosines of these vectors (infer/metrics.py). No position-embedding
interpolation: the metrics' preprocessing always gives image_size x image_size.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .clip import ACTIVATIONS, CLIPEncoder, CLIPTextModel, LayerNorm
from .config import CLIPConfig, from_hf_config
from .errors import WeightsError
from .loading import WEIGHTS_HELP, load_state, open_checkpoint, read_config


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
class ViTConfig:
    """transformers' ViTConfig fields; the defaults are its own (ViT-B/16)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True


def _check_size(pixels: Tensor, size: int) -> None:
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(f"pixels must be {size} x {size} (the model's image_size), not "
                         f"{tuple(pixels.shape[-2:])}: preprocess with infer.metrics")


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


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(D, D, bias=cfg.qkv_bias) for _ in range(3))


class ViTSelfOutput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention, self.output = ViTSelfAttention(cfg), ViTSelfOutput(cfg)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attention
        q, k, v = (rearrange(p(x), "B L (H D) -> B H L D", H=a.num_heads) for p in (a.query, a.key, a.value))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.output.dense(rearrange(out, "B H L D -> B L (H D)"))


class ViTIntermediate(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class ViTOutput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.attention = ViTAttention(cfg)
        self.intermediate, self.output = ViTIntermediate(cfg), ViTOutput(cfg)
        self.layernorm_before = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ViTModel(nn.Module):
    """`vit(pixels [B, 3, S, S]) -> [B, hidden]`: the class token after the final layernorm (what
    DINO's hub model returns, and MagicBrush's DINO metric compares)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ViT hidden_act {cfg.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        _check_size(pixels, self.config.image_size)
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, 0]


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
    load_state(model, ckpt, device=device, dtype=dtype, what="ViT (DINO) model", ignore=(r"^pooler\.",))
    return model.eval().requires_grad_(False)
