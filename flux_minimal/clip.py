"""The CLIP ViT-L/14 text transformer (FLUX's `text_encoder`), parameter names = the HF keys.

    input_ids [B, L] -> token_embedding + position_embedding[:L]        [B, L, D]
    num_hidden_layers x pre-LN layer:  x = x + out_proj(causal attention(layer_norm1(x)))
                                       x = x + fc2(quick_gelu(fc1(layer_norm2(x))))
    last = final_layer_norm(x)                                          [B, L, D]
    pooled = last[b, first EOS of row b]                                [B, D]  (what FLUX uses)

No text projection (this is CLIPTextModel, 768-d) and no padding mask: the causal mask already
hides everything after the first EOS from it, so the padding token cannot change the pooled
output. Exact maths in docs/flux.md section 6.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import CLIPConfig, from_hf_config
from .errors import WeightsError
from .loading import WEIGHTS_HELP, Rule, load_state, open_component, read_config

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # openai CLIP's approximation
    "gelu": F.gelu,
}


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 (an fp32 island) and returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig, causal: bool = True):
        super().__init__()
        self.num_heads, self.causal = cfg.num_attention_heads, causal  # the text tower is causal, the vision one not
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(p(x), "B L (H D) -> B H L D", H=self.num_heads) for p in (self.q_proj, self.k_proj,
                                                                                        self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # scale 1/sqrt(head_dim)
        return self.out_proj(rearrange(out, "B H L D -> B L (H D)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        L, n_pos = input_ids.shape[1], self.position_embedding.num_embeddings
        if L > n_pos:
            raise ValueError(f"CLIP reads at most {n_pos} tokens; got {L} (tokenize with max_length={n_pos})")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]  # [B, L, D]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """`clip(input_ids [B, L]) -> pooled [B, hidden]`; `clip.encode(ids)` also gives the hidden states."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {cfg.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        """[B]: where each row's pooled state is read, the first end-of-text token."""
        if self.config.eos_token_id == 2:
            # Legacy configs (openai's, FLUX's) say 2, HF's rule for which is "the largest id":
            # <|endoftext|> is the last id of the vocabulary, and argmax returns its first occurrence.
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # first match (0 if none)

    def encode(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids [B, L] -> (last_hidden_state [B, L, D] after final_layer_norm, pooled [B, D])."""
        tm = self.text_model
        if input_ids.max() >= self.config.vocab_size or input_ids.min() < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]: tokenizer and CLIP do not match")
        last = tm.final_layer_norm(tm.encoder(tm.embeddings(input_ids)))
        pooled = last[torch.arange(last.shape[0], device=last.device), self.eos_positions(input_ids).to(last.device)]
        return last, pooled

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encode(input_ids)[1]


# ---- loading ------------------------------------------------------------------------------------

CLIP_INDEX = "model.safetensors.index.json"
CLIP_SINGLE = ("model.safetensors",)
# Keys a CLIP file may hold that the text model does not use: the position-ids buffer of older
# exports (it is just arange(77)), and the vision tower, projections and logit scale of a full
# CLIPModel checkpoint (FLUX reads the text tower's pooled output, unprojected).
CLIP_IGNORE = (r"^(text_model\.)?embeddings\.position_ids$", r"^vision_model\.", r"^visual_projection\.",
               r"^text_projection\.", r"^logit_scale$")


def clip_config(folder: Path | None) -> CLIPConfig:
    """The folder's config.json (a CLIPModel config's `text_config` part); ViT-L/14 only when there is none."""
    cfg = read_config(folder) if folder is not None else None
    if cfg is None:
        return CLIPConfig()
    config = from_hf_config(CLIPConfig, cfg.get("text_config") or cfg)
    if config.hidden_act not in ACTIVATIONS:
        raise WeightsError(f"{folder / 'config.json'}: hidden_act {config.hidden_act!r} is not supported "
                           f"(known: {sorted(ACTIVATIONS)}). {WEIGHTS_HELP}")
    return config


def load_clip(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
              ) -> CLIPTextModel:
    """Load the CLIP text model from an HF folder (`config.json` + `model.safetensors`, or shards +
    index), a snapshot root holding `text_encoder/`, or a single .safetensors file (taken as
    ViT-L/14's text tower). dtype=None keeps the file's dtype. The weights are frozen."""
    path, ckpt, folder = open_component(path, "text_encoder", "CLIP", CLIP_SINGLE, CLIP_INDEX)
    config = clip_config(folder)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    rules = []
    if "text_model.final_layer_norm.weight" not in ckpt and "final_layer_norm.weight" in ckpt:
        # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix (and adds it back on load)
        rules = [Rule(k, k.removeprefix("text_model.")) for k in model.state_dict()]
    load_state(model, ckpt, rules, device=device, dtype=dtype, ignore=CLIP_IGNORE, what="CLIP text model")
    return model.eval().requires_grad_(False)
