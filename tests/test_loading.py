"""Strict, lazy checkpoint loading: every error a user can hit, with its message."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_minimal import PRESETS, Flux, WeightsError, load_flux, require_fill
from flux_minimal.loading import Checkpoint, SafetensorsFile
from tests.helpers import randomize_


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    model = randomize_(Flux(PRESETS["tiny-fill"].flux))
    path = tmp_path_factory.mktemp("bfl") / "flux1-fill-dev.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def edited(tmp_path, src, fn, name="flux1-fill-dev.safetensors"):
    state = load_file(src)
    fn(state)
    out = tmp_path / name
    save_file(state, out)
    return out


def test_reader_matches_safetensors_library(bfl_file):
    ours, ref = SafetensorsFile(bfl_file), load_file(bfl_file)
    assert sorted(ours.keys()) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(ours.tensor(k), v), k


def test_lazy_copy_on_write_and_dtype(bfl_file):
    """dtype=None keeps the file's tensors as views of the memory map; writing to them (e.g. merging
    a LoRA) never touches the file. A dtype converts tensor by tensor."""
    before = bfl_file.read_bytes()
    model = load_flux(bfl_file)
    with torch.no_grad():
        model.img_in.weight.add_(1.0)
    assert bfl_file.read_bytes() == before
    assert load_flux(bfl_file, dtype=torch.bfloat16).txt_in.weight.dtype == torch.bfloat16


def test_missing_key(bfl_file, tmp_path):
    bad = edited(tmp_path, bfl_file, lambda s: s.pop("double_blocks.1.img_attn.qkv.weight"))
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): double_blocks\.1\.img_attn\.qkv\.weight") as e:
        load_flux(bad)
    assert str(bad) in str(e.value)


def test_unexpected_key(bfl_file, tmp_path):
    bad = edited(tmp_path, bfl_file, lambda s: s.update({"double_blocks.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected key\(s\): double_blocks\.0\.extra\.weight"):
        load_flux(bad)


def test_wrong_shape(bfl_file, tmp_path):
    bad = edited(tmp_path, bfl_file, lambda s: s.update({"single_blocks.1.linear2.bias": torch.zeros(65)}))
    with pytest.raises(WeightsError, match=r"single_blocks\.1\.linear2\.bias in flux1-fill-dev\.safetensors: "
                                           r"expected \[64\], found \[65\]"):
        load_flux(bad)


def test_dev_checkpoint_where_fill_is_needed(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file(Flux(PRESETS["tiny-dev"].flux).state_dict(), path)
    model = load_flux(path)  # a valid FLUX.1 [dev]: loads ...
    with pytest.raises(WeightsError, match=r"FLUX\.1 \[dev\].*takes 64 channels.*FLUX\.1 Fill \[dev\]"):
        require_fill(model, path)  # ... but ICEdit says what it needs instead


def test_truncated_file(bfl_file, tmp_path):
    data = bfl_file.read_bytes()
    cut = tmp_path / "flux1-fill-dev.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"is truncated: the header promises \d+ bytes, the file has \d+"):
        load_flux(cut)
    cut.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_flux(cut)


def test_not_safetensors(tmp_path):
    junk = tmp_path / "flux1-fill-dev.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="header is not JSON"):
        load_flux(junk)


def test_pickle_is_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"img_in.weight": [1.0]}))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(WeightsError, match="pickle checkpoint; this project loads only .safetensors"):
        load_flux(path)


def test_missing_paths(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder.*weights.md"):
        load_flux(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="found neither diffusion_pytorch_model.safetensors.index.json"):
        load_flux(tmp_path / "empty")


def test_incomplete_sharded_folder(bfl_file, tmp_path):
    """An index json that names a shard which is not there: the download is incomplete."""
    state = load_file(bfl_file)
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:10]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"diffusion_pytorch_model-0000{1 + (i >= 10)}-of-00002.safetensors"
                                            for i, k in enumerate(keys)}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="names shards that are not in.*00002-of-00002.*incomplete"):
        load_flux(tmp_path)


def test_diffusers_folder_without_config(bfl_file, tmp_path):
    save_file(load_file(bfl_file), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="no config.json"):
        load_flux(tmp_path)


def test_checkpoint_prefix_is_stripped(bfl_file, tmp_path):
    state = {"model.diffusion_model." + k: v for k, v in load_file(bfl_file).items()}
    save_file(state, tmp_path / "c.safetensors")
    ckpt = Checkpoint([tmp_path / "c.safetensors"], prefix="model.diffusion_model.")
    assert "img_in.weight" in ckpt and ckpt.shape("img_in.weight") == (64, 384)
