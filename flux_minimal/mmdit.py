"""The FLUX MM-DiT (rectified-flow transformer), parameter names = the BFL checkpoint keys.

    img [B, L, in] --img_in--> [B, L, D]          txt [B, T, 4096] --txt_in--> [B, T, D]
    vec = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y)          [B, D]
    adaLN: every block's (shift, scale, gate) vectors = lin(SiLU(vec))  [B, 1, k D]
    19 x DoubleStreamBlock: separate weights per stream, one joint attention over [txt; img]
    38 x SingleStreamBlock: one stream x = [txt; img], attention and MLP in parallel
    final_layer(x[:, T:], its adaLN) -> velocity [B, L, 64]

The adaLN vectors and the rotary table depend only on (t, guidance, pooled text) and on the
position ids, all known before sampling starts: the sampler makes them for every step of an edit
at once (sampling.precompute_steps, from `adaln`, `embed_vec` and `rope` here), and
`forward(..., pe=..., adaln=...)` takes them. Loading the weights: flux_loading.py.

Exact maths (and the traps) in docs/flux.md sections 1 and 2.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import FluxParams
from .ops import attention, rope, timestep_embedding


class EmbedND(nn.Module):
    """Position ids [B, L, n_axes] -> rotations [B, 1, L, head_dim/2, 2, 2], axes concatenated."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6) in float32, back to x's dtype, times a learned scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Only a container of weights (qkv, norm, proj): the joint attention runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, D]
    scale: Tensor
    gate: Tensor

    def apply(self, x_normed: Tensor) -> Tensor:
        return (1 + self.scale) * x_normed + self.shift


def modulation_outs(mod: Tensor, n: int) -> list[ModulationOut]:
    """[B, 1, 3n D] adaLN vectors -> n (shift, scale, gate) triples, in the checkpoint's order."""
    c = mod.chunk(3 * n, dim=-1)
    return [ModulationOut(*c[3 * j:3 * j + 3]) for j in range(n)]


class Modulation(nn.Module):
    """adaLN: lin(SiLU(vec)) -> [B, 1, k D], read as (shift, scale, gate) once (k = 3) or twice (k = 6)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(nn.functional.silu(vec))[:, None, :]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        for s in ("img", "txt"):  # two streams, identical shapes, separate weights
            setattr(self, f"{s}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{s}_norm1", _layer_norm(hidden_size))
            setattr(self, f"{s}_attn", SelfAttention(hidden_size, num_heads, qkv_bias))
            setattr(self, f"{s}_norm2", _layer_norm(hidden_size))
            setattr(self, f"{s}_mlp", nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
                nn.GELU(approximate="tanh"),
                nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
            ))

    def _qkv(self, attn: SelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(attn.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 12 D]: img_mod's two (shift, scale, gate) triples, then txt_mod's."""
        return torch.cat((self.img_mod(vec), self.txt_mod(vec)), dim=-1)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor,
                mod: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """img [B, L, D], txt [B, T, D], vec [B, D] or its precomputed mod = self.adaln(vec)
        [B, 1, 12 D], pe the rotary table. (The adaLN is computed here, in the block's own forward,
        so that wrappers of the block, FSDP or offloading, have its weights in place.)"""
        img_mod1, img_mod2, txt_mod1, txt_mod2 = modulation_outs(self.adaln(vec) if mod is None else mod, 4)

        img_q, img_k, img_v = self._qkv(self.img_attn, img_mod1.apply(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt_mod1.apply(self.txt_norm1(txt)))

        # joint attention over the concatenated sequence, text first
        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, T+L, D]
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)  # [B, T+L, H*D]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP: linear1 makes [q k v | mlp_in], linear2 reads [attn | gelu(mlp)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 3 D]: one (shift, scale, gate) triple."""
        return self.modulation(vec)

    def forward(self, x: Tensor, vec: Tensor | None, pe: Tensor, mod: Tensor | None = None) -> Tensor:
        """x [B, T+L, D], vec [B, D] or its precomputed mod = self.adaln(vec) [B, 1, 3 D], pe the
        rotary table."""
        (mod,) = modulation_outs(self.adaln(vec) if mod is None else mod, 1)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)  # [B, T+L, D]
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 2 D]: shift, then scale (diffusers' norm_out: scale first)."""
        return self.adaLN_modulation(vec)[:, None, :]

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.pe_embedder = EmbedND(dim=p.head_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False  # recompute each block in backward (training)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the weights', or with FP8 weights the biases' (bf16)."""
        return self.img_in.bias.dtype

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_vec(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """The conditioning vector [B, D] from sigma [B], pooled CLIP [B, vec_in_dim], guidance [B]."""
        # Everything enters in the weights' dtype; sigma and guidance are rounded to it before the
        # x1000 of the embedding, as in BFL and diffusers (guidance 30 in bf16 -> 29952).
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: pass `guidance` (e.g. 50.0 for ICEdit)")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        return vec + self.vector_in(y.to(dtype))

    def adaln(self, vec: Tensor) -> list[Tensor]:
        """Every block's adaLN vectors, then the final layer's: [N, 1, k D] each for vec [N, D]."""
        return [b.adaln(vec) for b in (*self.double_blocks, *self.single_blocks, self.final_layer)]

    def rope(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        """The rotary table of the joint sequence [txt; img]: [B, 1, T+L, head_dim/2, 2, 2] float32."""
        return self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor | None,
                y: Tensor | None, guidance: Tensor | None = None, pe: Tensor | None = None,
                adaln: list[Tensor | None] | None = None) -> Tensor:
        """img [B, L, in_channels], img_ids [B, L, 3], txt [B, T, context_in_dim], txt_ids [B, T, 3],
        timesteps sigma in [0, 1] [B], y pooled CLIP [B, vec_in_dim], guidance raw scale [B]
        -> velocity [B, L, out_channels]. Either may come made in advance (the sampler makes every
        step's at once: sampling.precompute_steps): `pe` = self.rope(txt_ids, img_ids), and then the
        ids are not read; `adaln` = self.adaln(vec), and then timesteps, y and guidance are not."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        dtype = self.compute_dtype
        vec = None
        if adaln is None:  # each block makes its adaLN vectors from vec in its own forward
            vec = self.embed_vec(timesteps, y, guidance)
            adaln = [None] * (len(self.double_blocks) + len(self.single_blocks)) + [self.final_layer.adaln(vec)]
        pe = self.rope(txt_ids, img_ids) if pe is None else pe
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        mods = iter(adaln)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, next(mods))
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, next(mods))
        return self.final_layer(x[:, txt.shape[1]:], next(mods))  # [B, L, out_channels]
