"""The CLIP text model against transformers' CLIPTextModel, and its loader's layouts and errors.

Tolerances: fp32 parity 1e-5 relative (same maths, different op order); bf16 within 2x the error
transformers itself makes in bf16 against its own fp32 output, + 1e-3.
"""

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPTextModel

from flux_minimal import PRESETS, CLIPConfig, WeightsError, load_clip
from flux_minimal.clip import CLIPTextModel as OurCLIP
from tests.helpers import randomize_, rel_err
from tests.text_fixtures import hf_clip_config

EOS = PRESETS["tiny-fill"].clip.vocab_size - 1  # 767, the last id, as 49407 is in CLIP's vocabulary


def clip_ids(B: int = 3, L: int = 77, seed: int = 0) -> torch.Tensor:
    """BOS, content, the first EOS at a different place in each row, then EOS padding (FLUX's)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, EOS - 1, (B, L), generator=g)
    ids[:, 0] = EOS - 1
    for b, first in enumerate([5, 30, L - 1][:B]):
        ids[b, first:] = EOS
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny HF CLIP text model with FLUX's legacy config (eos_token_id 2), saved by
    transformers 5 (keys without `text_model.`), single-file and sharded."""
    ref = randomize_(CLIPTextModel(hf_clip_config()), std=0.2).eval()
    single, sharded = tmp_path_factory.mktemp("clip_single"), tmp_path_factory.mktemp("clip_sharded")
    ref.save_pretrained(single)
    ref.save_pretrained(sharded, max_shard_size="20KB")
    return ref, single, sharded


def hf_out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def test_fp32_parity_sharded_and_single(tiny):
    ref, single, sharded = tiny
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = clip_ids()
    last_ref, pooled_ref = hf_out(ref, ids)
    for folder in (single, sharded):
        ours = load_clip(folder)
        assert ours.config == dataclasses.replace(PRESETS["tiny-fill"].clip, eos_token_id=2)
        with torch.no_grad():
            last, pooled = ours.encode(ids)
            assert torch.equal(ours(ids), pooled)
        assert pooled.shape == (3, 32)
        assert rel_err(last, last_ref) <= 1e-5
        assert rel_err(pooled, pooled_ref) <= 1e-5
    # the pooled state is the final-normed hidden state at the first EOS of each row
    assert torch.equal(pooled, last[torch.arange(3), torch.tensor([5, 30, 76])])


def test_pooling_with_a_new_style_eos_id(tmp_path):
    """Configs after transformers PR #24773 name the real EOS id: the first match is pooled, even
    when larger ids follow it (the legacy argmax rule would pick those)."""
    cfg = hf_clip_config()
    cfg.eos_token_id = 7
    ref = randomize_(CLIPTextModel(cfg), std=0.2, seed=1).eval()
    ref.save_pretrained(tmp_path)
    ids = clip_ids(B=2, L=20)
    ids[:, 3], ids[:, 10] = 7, EOS  # the first 7 at 3, a larger id later
    ours = load_clip(tmp_path)
    with torch.no_grad():
        pooled = ours(ids)
    assert torch.equal(ours.eos_positions(ids), torch.tensor([3, 3]))
    assert rel_err(pooled, hf_out(ref, ids)[1]) <= 1e-5


def test_legacy_prefixed_file_and_full_clip_model(tiny, tmp_path):
    """FLUX's own file keeps the `text_model.` prefix (and old exports the position_ids buffer);
    a whole CLIPModel (vision tower, projections) loads its text tower, config from text_config."""
    ref, single, _ = tiny
    ids = clip_ids()
    state = load_file(single / "model.safetensors")
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(single / "config.json", legacy)
    save_file(state, legacy / "model.safetensors")
    with torch.no_grad():
        assert rel_err(load_clip(legacy)(ids), hf_out(ref, ids)[1]) <= 1e-5

    text = hf_clip_config().to_dict()
    full_cfg = HFCLIPConfig(text_config=text, projection_dim=16, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16))
    full = randomize_(CLIPModel(full_cfg), std=0.2, seed=2).eval()
    full.save_pretrained(tmp_path / "full")
    with torch.no_grad():
        expect = full.text_model(input_ids=ids).pooler_output
        assert rel_err(load_clip(tmp_path / "full")(ids), expect) <= 1e-5


def test_snapshot_root(tiny, tmp_path):
    ref, single, _ = tiny
    (tmp_path / "text_encoder").symlink_to(single)
    with torch.no_grad():
        assert rel_err(load_clip(tmp_path)(clip_ids()), hf_out(ref, clip_ids())[1]) <= 1e-5


def _rewrite(folder, dst, edit):
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_loading_errors(tiny, tmp_path):
    _, single, _ = tiny
    key = "encoder.layers.1.mlp.fc1.weight"  # as transformers 5 writes it (mapped onto text_model.*)

    bad = _rewrite(single, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(WeightsError, match=r"model\.safetensors does not fit the CLIP text model: 1 missing key\(s\): "
                                           r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_clip(bad)

    extra = {"encoder.layers.9.mlp.fc1.weight": torch.ones(1)}
    bad = _rewrite(single, tmp_path / "unexpected", lambda s: s.update(extra))
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\): encoder\.layers\.9\.mlp\.fc1\.weight"):
        load_clip(bad)

    bad = _rewrite(single, tmp_path / "shape", lambda s: s.update({"embeddings.token_embedding.weight":
                                                                    torch.zeros(49408, 32)}))
    with pytest.raises(WeightsError, match=r"token_embedding\.weight in model\.safetensors: expected \[768, 32\], "
                                           r"found \[49408, 32\]"):
        load_clip(bad)

    gelu_tanh = _rewrite(single, tmp_path / "act", lambda s: None)
    cfg = (single / "config.json").read_text().replace("quick_gelu", "gelu_pytorch_tanh")
    (gelu_tanh / "config.json").write_text(cfg)
    with pytest.raises(WeightsError, match=r"config\.json: hidden_act 'gelu_pytorch_tanh' is not supported"):
        load_clip(gelu_tanh)

    # no config.json: CLIP ViT-L/14 is assumed, so the tiny file fails on its shapes
    with pytest.raises(WeightsError, match=r"expected \[49408, 768\]"):
        load_clip(single / "model.safetensors")
    with pytest.raises(WeightsError, match=r"no such CLIP file or folder.*weights\.md"):
        load_clip(tmp_path / "nowhere")
    assert CLIPConfig().hidden_size == 768 and CLIPConfig().hidden_act == "quick_gelu"


def test_bf16_within_derived_tolerance(tiny):
    ref, single, _ = tiny
    ids = clip_ids()
    last_ref, pooled_ref = hf_out(ref, ids)
    ref_bf16 = CLIPTextModel(ref.config)
    ref_bf16.load_state_dict(ref.state_dict())
    _, pooled_bf16 = hf_out(ref_bf16.to(torch.bfloat16).eval(), ids)
    oracle_err = rel_err(pooled_bf16.float(), pooled_ref)
    ours = load_clip(single, dtype=torch.bfloat16)
    with torch.no_grad():
        pooled = ours(ids)
    assert pooled.dtype == torch.bfloat16
    err = rel_err(pooled.float(), pooled_ref)
    assert err <= 2 * oracle_err + 1e-3, (err, oracle_err)


def test_input_checks():
    model = OurCLIP(PRESETS["tiny-fill"].clip)
    with pytest.raises(ValueError, match="at most 77 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 768\)"):
        model(torch.tensor([[49406, 49407]]))
