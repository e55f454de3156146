"""Configurations of every component, as dataclasses, and the preset table.

Field names follow the checkpoints' own configs: BFL's `FluxParams` / `AutoEncoderParams`
(src/flux/util.py) and the Hugging Face `config.json` of T5 and CLIP, so a folder's config
reads straight in (`from_hf_config`). Tiny presets share the code path of the real ones and are
what the tests run.
"""

from dataclasses import dataclass, field, fields


@dataclass
class FluxParams:
    in_channels: int = 384  # 64 noisy latent + 64 masked-image latent + 256 mask (Fill); 64 for dev
    out_channels: int = 64  # 16 latent channels x 2x2 packing
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL d_model
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # rope dims per id axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        self.axes_dim = tuple(self.axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass
class AutoEncoderParams:
    resolution: int = 256  # unused by the maths; kept because BFL's config has it
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has num_res_blocks + 1
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    # GroupNorm groups. BFL's code fixes 32 (so an ae.safetensors always means 32); only a diffusers
    # config.json (norm_num_groups) can say otherwise.
    num_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class T5Config:
    """T5 v1.1 XXL's encoder (FLUX's text_encoder_2/config.json), transformers' field names."""

    vocab_size: int = 32128
    d_model: int = 4096  # the residual stream's width
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64  # per head: 64 heads x 64 = d_model
    d_ff: int = 10240
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1: wo(gelu_new(wi_0 x) * wi_1 x); the only one we build
    # positions enter as a learned bias per (head, bucket) in the first layer's attention, shared by all
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6  # RMSNorm, no mean, no bias


@dataclass
class CLIPConfig:
    """CLIP ViT-L/14's text tower (FLUX's text_encoder/config.json), transformers' field names."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x); "gelu" (erf) is accepted too
    # Pooling reads the hidden state at the first occurrence of this id. FLUX's config.json still
    # says 2 (openai's legacy value), which means "the position of the largest id" (= first EOS).
    eos_token_id: int = 49407


def from_hf_config(cls, cfg: dict):
    """Build one of the dataclasses above from a Hugging Face / diffusers `config.json` dict,
    taking the fields it names and ignoring the rest (architectures, torch_dtype, ...)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


@dataclass
class Preset:
    """One model family: the DiT, VAE and text-encoder configurations that go together."""

    flux: FluxParams
    ae: AutoEncoderParams = field(default_factory=AutoEncoderParams)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig = field(default_factory=CLIPConfig)


def _tiny_flux(in_channels: int) -> FluxParams:
    return FluxParams(in_channels=in_channels, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                      num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14))


# 32 groups, as in every BFL-format VAE, so the tiny VAE round-trips through an ae.safetensors too.
_TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, num_groups=32)
# Text vocabularies sized for the tiny tokenizers of tests/text_fixtures.py: T5 = a 128-piece
# sentencepiece model + 100 sentinels (228 ids, padded to 256 as 32100 is to 32128); CLIP = 512 byte
# symbols + 254 merges + the two specials (768 ids, <|endoftext|> last, as in the real 49408).
_TINY_T5 = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
_TINY_CLIP = CLIPConfig(vocab_size=768, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=767)

PRESETS: dict[str, Preset] = {
    "flux-fill-dev": Preset(FluxParams(in_channels=384)),
    "flux-dev": Preset(FluxParams(in_channels=64)),
    # Tiny presets: same code, random weights, seconds on a CPU. The tests run these.
    "tiny-fill": Preset(_tiny_flux(384), _TINY_AE, _TINY_T5, _TINY_CLIP),
    "tiny-dev": Preset(_tiny_flux(64), _TINY_AE, _TINY_T5, _TINY_CLIP),
    # The miniature world (mini_world/recipe.py, assets/mini): every component, small enough to train
    # on a CPU in a few hours. Vocabulary sizes are set by the tokenizers it learns. Its VAE downsamples
    # 4x, not 8x, so a 64-px scene keeps 16 x 16 latent pixels (8x lost small shapes); the Fill input
    # is then 64 + 64 + 64 channels (the mask unshuffled 4 x 4 instead of 8 x 8).
    "mini": Preset(
        FluxParams(in_channels=192, vec_in_dim=64, context_in_dim=64, hidden_size=128, num_heads=4, depth=2,
                   depth_single_blocks=4, axes_dim=(4, 14, 14)),
        AutoEncoderParams(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, num_groups=8),
        T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
        CLIPConfig(vocab_size=714, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   eos_token_id=713)),
}
