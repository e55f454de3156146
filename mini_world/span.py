"""Pretrain the mini T5 encoder on the world's text with T5's own objective: span corruption.

FLUX's T5 was pretrained and then frozen; a random frozen T5 gives the DiT token features that
barely say which word plays which role ("turn the red circle blue": which colour is the old one?).
T5's objective (Raffel et al. 2020, section 3.1.4) drops ~15% of the tokens in spans of mean
length 3, puts one sentinel in each hole, and trains a decoder to write the missing spans:

    input   turn the <extra_id_0> circle blue </s>
    target  <extra_id_0> red <extra_id_1> </s>

so the encoder learns what each position means in its context. The decoder here is a small
torch.nn.TransformerDecoder that is thrown away afterwards; only the encoder ships, in the same
layout (and through the same loader) as FLUX's T5.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_minimal.t5 import T5EncoderModel
from flux_minimal.tokenizers import T5Tokenizer

NOISE_DENSITY = 0.15  # T5's defaults
MEAN_SPAN = 3.0
IGNORE = -100  # target padding


def corrupt(ids: list[int], rng: np.random.Generator, sentinel0: int, eos: int) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one text's content ids (no </s>). Spans are drawn left to right:
    a span starts at each kept position with probability density / mean_span (so ~15% of the
    tokens end up in spans of mean length 3); sentinel i is id sentinel0 - i, as in T5."""
    inp, tgt, i, k = [], [], 0, 0
    p_start = NOISE_DENSITY / MEAN_SPAN
    while i < len(ids):
        if rng.random() < p_start:
            n = max(1, int(round(rng.exponential(MEAN_SPAN))))
            inp.append(sentinel0 - k)
            tgt += [sentinel0 - k, *ids[i:i + n]]
            i, k = i + n, k + 1
        else:
            inp.append(ids[i])
            i += 1
    if k == 0:  # every text teaches something: drop one token at least
        j = int(rng.integers(len(ids)))
        inp, tgt = [*ids[:j], sentinel0, *ids[j + 1:]], [sentinel0, ids[j]]
        k = 1
    return inp + [eos], tgt + [sentinel0 - k, eos]


class SpanCorruption(nn.Module):
    """The encoder being pretrained, and the decoder that reads it (discarded after training)."""

    def __init__(self, t5: T5EncoderModel, layers: int = 2, max_target: int = 32):
        super().__init__()
        cfg = t5.config
        self.t5 = t5
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(max_target, cfg.d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.num_heads, cfg.d_ff, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, inp: Tensor, tgt: Tensor) -> Tensor:
        """inp [B, L] encoder ids; tgt [B, S] target ids (IGNORE-padded) -> the mean cross-entropy."""
        memory = self.t5(inp)  # [B, L, d]
        start = torch.zeros_like(tgt[:, :1])  # T5 starts decoding from <pad> = 0
        dec_in = torch.cat([start, tgt[:, :-1].clamp(min=0)], dim=1)  # teacher forcing, shifted right
        S = tgt.shape[1]
        causal = torch.triu(torch.full((S, S), float("-inf"), device=tgt.device), diagonal=1)
        h = self.decoder(self.embed(dec_in) + self.pos[:S], memory, tgt_mask=causal)
        return F.cross_entropy(self.head(h).flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)


def span_batch(tok: T5Tokenizer, texts: list[str], rng: np.random.Generator, max_target: int = 32
               ) -> tuple[Tensor, Tensor]:
    """One batch: encoder ids [B, max_length] (pad 0) and target ids [B, max_target] (IGNORE-padded)."""
    sentinel0 = tok.specials["<extra_id_0>"]
    inp, tgt = [], []
    for t in texts:
        ids = tok.encode(t)[: tok.max_length - 1]
        a, b = corrupt(ids, rng, sentinel0, tok.eos_id)
        inp.append(a[: tok.max_length] + [tok.pad_id] * (tok.max_length - len(a)))
        b = b[:max_target]
        tgt.append(b + [IGNORE] * (max_target - len(b)))
    return torch.tensor(inp), torch.tensor(tgt)
