"""The FLUX transformer's one key table: diffusers' names onto ours (the BFL checkpoint keys).

A diffusers `FluxTransformer2DModel` keeps every projection apart; BFL fuses some of them by rows
(img_attn.qkv = [to_q; to_k; to_v], single_blocks.N.linear1 = [to_q; to_k; to_v; proj_mlp]) and
stores the final norm's (scale, shift) halves the other way round (docs/flux.md section 3.2).

The table serves twice, so the two can never disagree:
- checkpoints: `flux_loading.load_flux` reads a diffusers folder through FLUX_FROM_DIFFUSERS;
- LoRA files: the same rules seen per linear layer (`diffusers_target`, `diffusers_name`): a
  diffusers layer is row block ("part") j of one of our layers (lora.py, lora_files.py).
It sits apart from both readers because both need it and the checkpoint loader also reads LoRA
files (a LoRA merged while FP8 weights load).
"""

import re
from dataclasses import dataclass

from .loading import Rule, cat_rows, swap_halves

# diffusers' FluxTransformer2DModel keys onto ours ({i} a block index, {w} weight|bias).
FLUX_FROM_DIFFUSERS = [
    Rule("img_in.{w}", "x_embedder.{w}"),
    Rule("txt_in.{w}", "context_embedder.{w}"),
    Rule("time_in.in_layer.{w}", "time_text_embed.timestep_embedder.linear_1.{w}"),
    Rule("time_in.out_layer.{w}", "time_text_embed.timestep_embedder.linear_2.{w}"),
    Rule("guidance_in.in_layer.{w}", "time_text_embed.guidance_embedder.linear_1.{w}"),
    Rule("guidance_in.out_layer.{w}", "time_text_embed.guidance_embedder.linear_2.{w}"),
    Rule("vector_in.in_layer.{w}", "time_text_embed.text_embedder.linear_1.{w}"),
    Rule("vector_in.out_layer.{w}", "time_text_embed.text_embedder.linear_2.{w}"),
    Rule("double_blocks.{i}.img_mod.lin.{w}", "transformer_blocks.{i}.norm1.linear.{w}"),
    Rule("double_blocks.{i}.txt_mod.lin.{w}", "transformer_blocks.{i}.norm1_context.linear.{w}"),
    Rule("double_blocks.{i}.img_attn.qkv.{w}", ("transformer_blocks.{i}.attn.to_q.{w}",
         "transformer_blocks.{i}.attn.to_k.{w}", "transformer_blocks.{i}.attn.to_v.{w}"), cat_rows),
    Rule("double_blocks.{i}.txt_attn.qkv.{w}", ("transformer_blocks.{i}.attn.add_q_proj.{w}",
         "transformer_blocks.{i}.attn.add_k_proj.{w}", "transformer_blocks.{i}.attn.add_v_proj.{w}"), cat_rows),
    Rule("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    Rule("double_blocks.{i}.img_attn.proj.{w}", "transformer_blocks.{i}.attn.to_out.0.{w}"),
    Rule("double_blocks.{i}.txt_attn.proj.{w}", "transformer_blocks.{i}.attn.to_add_out.{w}"),
    Rule("double_blocks.{i}.img_mlp.0.{w}", "transformer_blocks.{i}.ff.net.0.proj.{w}"),
    Rule("double_blocks.{i}.img_mlp.2.{w}", "transformer_blocks.{i}.ff.net.2.{w}"),
    Rule("double_blocks.{i}.txt_mlp.0.{w}", "transformer_blocks.{i}.ff_context.net.0.proj.{w}"),
    Rule("double_blocks.{i}.txt_mlp.2.{w}", "transformer_blocks.{i}.ff_context.net.2.{w}"),
    Rule("single_blocks.{i}.modulation.lin.{w}", "single_transformer_blocks.{i}.norm.linear.{w}"),
    Rule("single_blocks.{i}.linear1.{w}", ("single_transformer_blocks.{i}.attn.to_q.{w}",
         "single_transformer_blocks.{i}.attn.to_k.{w}", "single_transformer_blocks.{i}.attn.to_v.{w}",
         "single_transformer_blocks.{i}.proj_mlp.{w}"), cat_rows),
    Rule("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("single_blocks.{i}.linear2.{w}", "single_transformer_blocks.{i}.proj_out.{w}"),
    Rule("final_layer.linear.{w}", "proj_out.{w}"),
    Rule("final_layer.adaLN_modulation.1.{w}", "norm_out.linear.{w}", swap_halves),
]


@dataclass(frozen=True)
class Target:
    """Where a diffusers linear layer lives in our model: row block `part` of `n_parts` of `module`."""

    module: str  # e.g. double_blocks.3.img_attn.qkv
    part: int
    n_parts: int
    swap: bool = False  # diffusers' norm_out is (scale, shift); ours (shift, scale): swap B's halves


@dataclass(frozen=True)
class _Entry:
    diffusers: str  # diffusers module template, e.g. "transformer_blocks.{i}.attn.to_k"
    ours: str  # our module template, e.g. "double_blocks.{i}.img_attn.qkv"
    part: int
    n_parts: int
    swap: bool

    @staticmethod
    def regex(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


# The linear-layer view of the table: each diffusers linear layer is part j of one of ours.
_TABLE = [_Entry(src[: -len(".{w}")], rule.target[: -len(".{w}")], j, len(rule.sources), rule.combine is swap_halves)
          for rule in FLUX_FROM_DIFFUSERS if rule.target.endswith(".{w}")  # (norm scales are not linears)
          for j, src in enumerate(rule.sources)]


def diffusers_target(name: str) -> Target | None:
    """`transformer_blocks.3.attn.to_k` -> Target('double_blocks.3.img_attn.qkv', part 1 of 3)."""
    for e in _TABLE:
        m = e.regex(e.diffusers).match(name)
        if m:
            return Target(e.ours.format(**m.groupdict()), e.part, e.n_parts, e.swap)
    return None


def diffusers_name(module: str, part: int) -> str:
    """The inverse: ('double_blocks.3.img_attn.qkv', 1) -> 'transformer_blocks.3.attn.to_k'."""
    for e in _TABLE:
        m = e.regex(e.ours).match(module)
        if m and e.part == part:
            return e.diffusers.format(**m.groupdict())
    raise KeyError(f"{module} part {part} has no diffusers name")


def n_parts(module: str) -> int:
    """How many diffusers layers our `module` fuses (qkv: 3, linear1: 4, others: 1)."""
    for e in _TABLE:
        if e.regex(e.ours).match(module):
            return e.n_parts
    return 1
