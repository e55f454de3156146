"""The T5 v1.1 encoder against transformers' T5EncoderModel, and its loader's layouts and errors.

Tolerances: fp32 parity 1e-5 relative (same maths, different op order). bf16: within 2x the error
transformers itself makes in bf16 against its own fp32 output, + 1e-3. fp16 (which we compute in
fp32): 1e-5 against the fp32 model with the same fp16-rounded weights, since only the weights'
rounding differs. Random weights use std 0.1: T5 has no 1/sqrt(d) in attention, and at 0.2 the
tiny model's softmax is so peaked that fp32 itself is only good to ~1e-5 there.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from flux_minimal import PRESETS, T5Config, WeightsError, load_t5
from flux_minimal.t5 import relative_position_bucket
from tests.helpers import randomize_, rel_err
from tests.text_fixtures import hf_t5_config

STD = 0.1


def random_ids(B: int = 2, L: int = 40, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random content, then FLUX's padding: an EOS (1) and pads (0), which T5 attends to."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    ids[0, L // 2] = 1
    ids[0, L // 2 + 1:] = 0
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny HF T5 encoder, saved single-file and sharded."""
    ref = randomize_(T5EncoderModel(hf_t5_config()), std=STD).eval()
    single, sharded = tmp_path_factory.mktemp("t5_single"), tmp_path_factory.mktemp("t5_sharded")
    ref.save_pretrained(single)
    ref.save_pretrained(sharded, max_shard_size="20KB")
    return ref, single, sharded


def hf_out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_relative_position_bucket():
    """Against the closed form of docs/flux.md 5.2 and HF's own function, over +-300 positions."""
    n = torch.arange(-300, 301)
    ours = relative_position_bucket(n, 32, 128)
    a = n.abs()
    formula = 16 * (n > 0).long() + torch.tensor([x if x < 8 else min(15, 8 + int(math.log(x / 8) / math.log(16) * 8))
                                                  for x in a.tolist()])
    assert torch.equal(ours, formula)
    assert torch.equal(ours, T5Attention._relative_position_bucket(n, bidirectional=True, num_buckets=32,
                                                                   max_distance=128))


def test_fp32_parity_sharded_and_single(tiny):
    ref, single, sharded = tiny
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    ids = random_ids()
    expect = hf_out(ref, ids)
    for folder in (single, sharded):
        ours = load_t5(folder)
        assert ours.config == PRESETS["tiny-fill"].t5  # read from config.json, not the XXL default
        with torch.no_grad():
            out = ours(ids)
        assert out.shape == (2, 40, 64) and out.dtype == torch.float32
        assert rel_err(out, expect) <= 1e-5
    assert not any(p.requires_grad for p in ours.parameters())  # frozen


def test_full_length_512(tiny):
    """FLUX's 512 tokens: relative positions beyond max_distance (128) share the last bucket."""
    ref, single, _ = tiny
    ids = random_ids(B=1, L=512)
    with torch.no_grad():
        assert rel_err(load_t5(single)(ids), hf_out(ref, ids)) <= 1e-5


def test_snapshot_root(tiny, tmp_path):
    ref, single, _ = tiny
    (tmp_path / "text_encoder_2").symlink_to(single)
    with torch.no_grad():
        assert rel_err(load_t5(tmp_path)(random_ids()), hf_out(ref, random_ids())) <= 1e-5


def test_tied_embedding_names(tiny, tmp_path):
    """A file may store the embedding as encoder.embed_tokens.weight only, or under both names."""
    ref, single, _ = tiny
    state = load_file(single / "model.safetensors")
    shutil.copy(single / "config.json", tmp_path / "config.json")
    expect = hf_out(ref, random_ids())

    only = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    save_file(only, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert rel_err(load_t5(tmp_path)(random_ids()), expect) <= 1e-5

    both = dict(state, **{"encoder.embed_tokens.weight": state["shared.weight"].clone()})
    save_file(both, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert rel_err(load_t5(tmp_path)(random_ids()), expect) <= 1e-5


def test_full_encoder_decoder_checkpoint(tmp_path):
    """A whole T5 (decoder, lm_head): the decoder keys are ignored, the encoder matches."""
    cfg = hf_t5_config()
    cfg.is_encoder_decoder, cfg.num_decoder_layers = True, 1
    full = randomize_(T5ForConditionalGeneration(cfg), std=STD, seed=3).eval()
    full.save_pretrained(tmp_path)
    ours = load_t5(tmp_path)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(ids), full.encoder(input_ids=ids).last_hidden_state) <= 1e-5


def _rewrite(folder, dst, edit):
    """Copy a single-file folder to dst with its state dict changed by `edit(state)`."""
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_loading_errors(tiny, tmp_path):
    _, single, _ = tiny
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"

    bad = _rewrite(single, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(WeightsError, match=r"model\.safetensors does not fit the T5 encoder: 1 missing key\(s\): "
                                           + key.replace(".", r"\.")):
        load_t5(bad)

    bad = _rewrite(single, tmp_path / "unexpected", lambda s: s.update({"encoder.block.1.extra.weight": torch.ones(2)}))
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\): encoder\.block\.1\.extra\.weight"):
        load_t5(bad)

    bad = _rewrite(single, tmp_path / "shape", lambda s: s.update({key: torch.zeros(64, 95)}))
    with pytest.raises(WeightsError, match=r"wrong shape.*wo\.weight in model\.safetensors: expected \[64, 96\], "
                                           r"found \[64, 95\]"):
        load_t5(bad)

    no_embedding = _rewrite(single, tmp_path / "no_embedding", lambda s: s.pop("shared.weight"))
    with pytest.raises(WeightsError, match=r"missing key\(s\): shared\.weight"):
        load_t5(no_embedding)


def test_config_fallback_and_checks(tiny, tmp_path):
    """No config.json: T5 v1.1 XXL is assumed, so a tiny file fails on shapes, naming the file.
    A config of the original T5 (relu FF) is refused; a missing path is a WeightsError."""
    _, single, _ = tiny
    with pytest.raises(WeightsError, match=r"model\.safetensors does not fit the T5 encoder.*"
                                           r"expected \[32128, 4096\], found \[256, 64\]"):
        load_t5(single / "model.safetensors")

    relu = tmp_path / "relu"
    relu.mkdir()
    shutil.copy(single / "model.safetensors", relu)
    cfg = json.loads((single / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps(dict(cfg, feed_forward_proj="relu")))
    with pytest.raises(WeightsError, match=r"config\.json: feed_forward_proj is 'relu'.*T5 v1\.1"):
        load_t5(relu)
    with pytest.raises(WeightsError, match=r"no such T5 file or folder.*weights\.md"):
        load_t5(tmp_path / "nowhere")
    assert T5Config() == T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def test_bf16_within_derived_tolerance(tiny):
    ref, single, _ = tiny
    ids = random_ids()
    expect = hf_out(ref, ids)
    ref_bf16 = T5EncoderModel(ref.config)
    ref_bf16.load_state_dict(ref.state_dict())
    hf_bf16 = hf_out(ref_bf16.to(torch.bfloat16).eval(), ids).float()
    oracle_err = rel_err(hf_bf16, expect)
    ours = load_t5(single, dtype=torch.bfloat16)
    assert ours.shared.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = ours(ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expect) <= 2 * oracle_err + 1e-3, (rel_err(out.float(), expect), oracle_err)
    # Beyond the tolerance: we round where transformers rounds (gelu_new op by op, the norms), so
    # in bf16 we follow it, not just fp32 (0 here; torch's fused tanh GELU would give ~7e-3).
    assert rel_err(out.float(), hf_bf16) <= 1e-3


def test_fp16_is_safe_where_naive_fp16_overflows(tmp_path):
    """Weights whose residual stream passes fp16's 65504 (a few huge channels, as in T5 v1.1 XXL):
    ours from an fp16 file is finite and equals the fp32 model with the same fp16-rounded weights
    (it computes in fp32)."""
    ref = randomize_(T5EncoderModel(hf_t5_config()), std=STD, seed=5).eval()
    with torch.no_grad():
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wo.weight[:2] *= 1e5  # two channels that grow ~1e5 per block
        for p in ref.parameters():
            p.copy_(p.half().float())  # both sides use exactly the fp16 weights
            assert torch.isfinite(p).all()
    peak = []
    hooks = [b.register_forward_hook(lambda m, i, out: peak.append(out[0].abs().max().item()))
             for b in ref.encoder.block]
    ids = random_ids()
    expect = hf_out(ref, ids)
    for h in hooks:
        h.remove()
    assert max(peak) > torch.finfo(torch.float16).max, "the test weights must overflow a naive fp16 residual stream"
    assert torch.isfinite(expect).all()

    ref.half().save_pretrained(tmp_path)  # (transformers' own fp16 run of it clamps: finite, ~7% off)
    ours = load_t5(tmp_path)
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float16  # stored in fp16
    with torch.no_grad():
        out = ours(ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, expect) <= 1e-5


def test_bad_ids():
    from flux_minimal.t5 import T5EncoderModel as Ours

    model = Ours(PRESETS["tiny-fill"].t5)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        model(torch.tensor([[5, 300]]))
