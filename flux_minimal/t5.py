"""The T5 v1.1 encoder (FLUX's `text_encoder_2`), parameter names = the Hugging Face keys.

    input_ids [B, L] --shared--> h [B, L, d_model]                    (no sqrt(d) scaling)
    bias = relative position bias [1, H, L, L], computed once from block 0's table, used by all blocks
    num_layers x T5Block:  h = h + o(attention(RMS(h)) + bias)        (no 1/sqrt(d_kv), no mask)
                           h = h + wo(gelu_new(wi_0 RMS(h)) * wi_1 RMS(h))    (gelu_new: tanh GELU)
    final_layer_norm(h) -> [B, L, d_model]   every position, pads included: FLUX attends to them

Exact maths in docs/flux.md section 5.

Precision. T5 v1.1 was trained in bfloat16 and its activations overflow float16 (docs/flux.md
5.4). We compute in the weights' dtype for float32 and bfloat16 (bfloat16 is how BFL and diffusers
run it, residual stream included, so our outputs follow theirs). Float16 weights are only *stored*
in float16: the activations, the residual stream and every matmul run in float32, each Linear
casting its weight up as it is used (one layer's weight at a time). ComfyUI likewise keeps T5's
residual stream in float32; unlike HF's clamping (which bends the result) this changes nothing but
the rounding of the weights. Costs: float32 matmul speed, one transient float32 weight.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import T5Config, from_hf_config
from .errors import WeightsError
from .loading import WEIGHTS_HELP, Rule, load_state, open_component, read_config


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The activations' dtype for weights stored in `weight_dtype`: float16 runs in float32."""
    return torch.float32 if weight_dtype == torch.float16 else weight_dtype


class Linear(nn.Linear):
    """A bias-free nn.Linear that computes in its input's dtype (float16 weights in float32)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))  # .to is free when the dtypes already agree


class T5LayerNorm(nn.Module):
    """RMSNorm: x * rsqrt(mean(x^2) + eps) * weight. No mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # statistics and the division in float32 (an fp32 island), back to x's dtype before the
        # scale, as in HF: in bfloat16 the product with `weight` is rounded the same way.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight.to(x.dtype) * y.to(x.dtype)


def gelu_new(x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the tanh GELU, op by op in x's dtype as
    HF's `gelu_new` computes it. In bfloat16 every op rounds, and matching that keeps our T5 equal
    to the one BFL and diffusers run (torch's fused F.gelu(approximate="tanh") rounds once: more
    accurate, but ~0.7% away from them in bfloat16 on the tiny test model)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Bidirectional bucket of n = key_pos - query_pos, in [0, num_buckets).

    Half the buckets are for n > 0, half for n <= 0. Within a half: |n| < half/2 gets its own
    bucket; larger |n| share logarithmically wider ones up to max_distance (beyond: the last one).
    With 32 buckets: b = 16 [n > 0] + (|n| if |n| < 8 else min(15, 8 + int(ln(|n|/8) / ln(16) * 8))).
    """
    half = num_buckets // 2
    exact = half // 2
    n = relative_position.abs()
    # float32 with the same operation order as Mesh TensorFlow / HF, so boundary cases agree;
    # clamp(min=1) only keeps log() finite on the positions that use the exact branch anyway.
    large = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (half - exact)).to(torch.long)
    large = large.clamp(max=half - 1)
    return (relative_position > 0).to(torch.long) * half + torch.where(n < exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:  # only block 0 owns the table
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, length: int, dtype: torch.dtype) -> Tensor:
        """[1, H, L, L]: bias[h, q, k] = table[bucket(k - q), h]."""
        device = self.relative_attention_bias.weight.device
        pos = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)  # [L, L, H]
        return rearrange(values, "q k H -> 1 H q k").to(dtype)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        q, k, v = (rearrange(lin(x), "B L (H D) -> B H L D", H=self.n_heads) for lin in (self.q, self.k, self.v))
        # scale=1: T5 folds 1/sqrt(d_kv) into its initialisation. The bias is the only position
        # signal and there is no padding mask (FLUX passes none: pads are attended to).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)  # [B, H, L, D]
        return self.o(rearrange(out, "B H L D -> B L (H D)"))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h: Tensor, position_bias: Tensor) -> Tensor:
        return h + self.SelfAttention(self.layer_norm(h), position_bias)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_new(wi_0 x) * wi_1 x): T5 v1.1's "gated-gelu"."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(gelu_new(self.wi_0(x)) * self.wi_1(x))  # [B, L, d_ff] -> [B, L, d_model]


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, h: Tensor, position_bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](h, position_bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=(i == 0)) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h: Tensor) -> Tensor:
        bias = self.block[0].layer[0].SelfAttention.compute_bias(h.shape[1], h.dtype)  # shared by all blocks
        for block in self.block:
            h = block(h, bias)
        return self.final_layer_norm(h)


class T5EncoderModel(nn.Module):
    """`t5(input_ids [B, L]) -> [B, L, d_model]`, in the weights' dtype (float32 for float16 weights).

    HF's `encoder.embed_tokens` is the same tensor as `shared` (tied), so only `shared` exists here.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.max() >= self.config.vocab_size or input_ids.min() < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]: tokenizer and T5 do not match")
        h = self.shared(input_ids).to(compute_dtype(self.shared.weight.dtype))  # [B, L, d_model]
        return self.encoder(h)


# ---- loading ------------------------------------------------------------------------------------

T5_INDEX = "model.safetensors.index.json"
T5_SINGLE = ("model.safetensors",)
# Keys a T5 file may hold that the encoder does not use: the decoder and LM head of a full
# encoder-decoder T5 (FLUX needs the encoder only), and HF's tied copy of the embedding
# (`encoder.embed_tokens.weight` is `shared.weight`; when a file stores both we read `shared`).
T5_IGNORE = (r"^decoder\.", r"^lm_head\.", r"^encoder\.embed_tokens\.weight$")


def t5_config(folder: Path | None) -> T5Config:
    """The folder's config.json; T5 v1.1 XXL (FLUX's) only when there is none."""
    cfg = read_config(folder) if folder is not None else None
    if cfg is None:
        return T5Config()
    config = from_hf_config(T5Config, cfg)
    if config.feed_forward_proj != "gated-gelu":
        raise WeightsError(f"{folder / 'config.json'}: feed_forward_proj is {config.feed_forward_proj!r}; FLUX uses "
                           f"T5 v1.1 ('gated-gelu'), the only variant built here. {WEIGHTS_HELP}")
    if cfg.get("is_decoder"):
        raise WeightsError(f"{folder / 'config.json'} describes a T5 decoder; FLUX needs the encoder. {WEIGHTS_HELP}")
    return config


def load_t5(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            fp8: bool = False) -> T5EncoderModel:
    """Load the T5 encoder from an HF folder (`config.json` + `model.safetensors`, or shards +
    `model.safetensors.index.json`), a snapshot root holding `text_encoder_2/`, or a single
    .safetensors file (taken as T5 v1.1 XXL). dtype=None keeps the file's dtype; float16 is safe
    (it computes in float32, see the module docstring). The weights are frozen. fp8=True: the
    linear weights in float8 with per-channel scales, quantized while loading (flux_minimal/fp8.py;
    4.9 GB for T5-XXL instead of 9.5), the embeddings and norms in `dtype` (default bf16)."""
    path, ckpt, folder = open_component(path, "text_encoder_2", "T5", T5_SINGLE, T5_INDEX)
    config = t5_config(folder)
    # A file without `shared.weight` may still hold the tied copy under the encoder's name.
    tied_only = "shared.weight" not in ckpt and "encoder.embed_tokens.weight" in ckpt
    rules = [Rule("shared.weight", "encoder.embed_tokens.weight")] if tied_only else []
    with torch.device("meta"):
        model = T5EncoderModel(config)
    if fp8:
        from .fp8 import load_fp8
        load_fp8(model, ckpt, rules, device=device, dtype=dtype or torch.bfloat16, ignore=T5_IGNORE, what="T5 encoder")
    else:
        load_state(model, ckpt, rules, device=device, dtype=dtype, ignore=T5_IGNORE, what="T5 encoder")
    return model.eval().requires_grad_(False)
