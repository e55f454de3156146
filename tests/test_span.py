"""T5's span corruption (mini_world/span.py), which pretrains the mini T5: the holes and the
target fit back together into the text, sentinels count down from <extra_id_0> as in T5, and about
15% of the tokens are dropped in spans of mean length ~3 (Raffel et al. 2020, section 3.1.4)."""

import numpy as np
import torch

from flux_minimal.config import T5Config
from flux_minimal.t5 import T5EncoderModel
from mini_world.span import IGNORE, SpanCorruption, corrupt

SENTINEL0, EOS = 355, 1


def _fill(inp: list[int], tgt: list[int]) -> list[int]:
    """Put the target's spans back into the input's holes (the inverse of corruption)."""
    spans, k = {}, None
    for i in tgt[:-1]:
        if i > SENTINEL0 - 100:
            k = i
            spans[k] = []
        else:
            spans[k].append(i)
    return [j for i in inp[:-1] for j in (spans[i] if i in spans else [i])]


def test_corruption_is_invertible_and_t5_shaped():
    rng = np.random.default_rng(0)
    dropped, spans, total = 0, [], 0
    for n in range(2000):
        ids = list(rng.integers(3, 250, size=int(rng.integers(3, 40))))
        inp, tgt = corrupt(ids, rng, SENTINEL0, EOS)
        assert inp[-1] == EOS and tgt[-1] == EOS
        assert _fill(inp, tgt) == ids
        sentinels = [i for i in inp if i > SENTINEL0 - 100]
        assert sentinels == [SENTINEL0 - k for k in range(len(sentinels))] and sentinels
        assert tgt[-2] == SENTINEL0 - len(sentinels)  # a closing sentinel, as T5 writes it
        dropped += len(tgt) - 1 - len(sentinels) - 1
        total += len(ids)
        if len(ids) >= 30:  # long texts: spans are rarely cut by the end or forced to one token
            cuts = [j for j, i in enumerate(tgt) if i > SENTINEL0 - 100]
            spans += [b - a - 1 for a, b in zip(cuts, cuts[1:])]
    assert 0.12 < dropped / total < 0.25, dropped / total  # 15% plus the one-token minimum on short texts
    assert 2.5 < np.mean(spans) < 3.5, np.mean(spans)


def test_decoder_learns_a_span():
    """The objective trains: a tiny T5 + decoder fits one corrupted sentence within 200 steps."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = SpanCorruption(T5EncoderModel(cfg), layers=1)
    inp = torch.tensor([[5, 6, SENTINEL0, 8, EOS]])
    tgt = torch.tensor([[SENTINEL0, 7, SENTINEL0 - 1, EOS, IGNORE, IGNORE]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(inp, tgt).item()
    for _ in range(200):
        loss = model(inp, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.05, (first, loss.item())
