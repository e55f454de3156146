"""PromptEncoder on a tiny snapshot's text folders, against diffusers' FluxFillPipeline.encode_prompt.

The folders come from tests/text_fixtures.write_tiny_text_components and are loaded the way
diffusers loads them (`from_pretrained(root, subfolder=...)`), so this also checks that the fixture
is a valid snapshot for the pipeline tests. Tolerance: 1e-5 relative (fp32, same maths, different
op order); both sides run under no_grad, as the pipeline does (on the CPU, SDPA takes another
kernel when autograd is on, which alone moves the tiny T5 by ~1e-5).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxFillPipeline
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from flux_minimal.icedit import IC_PROMPT
from flux_minimal import PRESETS, FluxMinimalError, PromptEncoder, WeightsError
from tests.helpers import randomize_, rel_err
from tests.text_fixtures import hf_t5_config, write_tiny_text_components

PROMPTS = [IC_PROMPT.format(instruction="make the sky purple"), "Turn the cat into a tiger, please! 2 cats, café 東京 😀"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshot")
    write_tiny_text_components(root)
    return root


@pytest.fixture(scope="module")
def diffusers_pipe(snapshot):
    """FluxFillPipeline with only its text components, each loaded as diffusers loads it."""
    return FluxFillPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(snapshot, subfolder="text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(snapshot, subfolder="tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(snapshot, subfolder="text_encoder_2").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(snapshot, subfolder="tokenizer_2"))


def test_fixture_matches_the_tiny_preset(snapshot, diffusers_pipe):
    flux = PRESETS["tiny-fill"].flux
    assert diffusers_pipe.text_encoder_2.config.d_model == flux.context_in_dim
    assert diffusers_pipe.text_encoder.config.hidden_size == flux.vec_in_dim
    assert diffusers_pipe.tokenizer.model_max_length == 77 and diffusers_pipe.tokenizer_2.model_max_length == 512
    assert len(diffusers_pipe.tokenizer) <= PRESETS["tiny-fill"].clip.vocab_size
    assert len(diffusers_pipe.tokenizer_2) <= PRESETS["tiny-fill"].t5.vocab_size
    assert (snapshot / "tokenizer_2" / "spiece.model").is_file()


@pytest.mark.parametrize("max_length", [512, 128])
def test_encode_prompt_matches_diffusers(snapshot, diffusers_pipe, max_length):
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = diffusers_pipe.encode_prompt(
            PROMPTS, prompt_2=None, device=torch.device("cpu"), max_sequence_length=max_length)
    ours = PromptEncoder.from_pretrained(snapshot, max_length=max_length)
    txt, txt_ids, vec = ours.encode_prompt(PROMPTS)
    assert txt.shape == (2, max_length, 64) and vec.shape == (2, 32) and txt_ids.shape == (2, max_length, 3)
    assert rel_err(txt, prompt_embeds) <= 1e-5
    assert rel_err(vec, pooled) <= 1e-5
    assert torch.equal(txt_ids, torch.zeros(2, max_length, 3)) and torch.equal(txt_ids[0], text_ids)


def test_bf16_and_devices(snapshot):
    """dtype goes to both encoders; outputs land on the device asked for (here the CPU)."""
    ours = PromptEncoder.from_pretrained(snapshot, dtype=torch.bfloat16)
    txt, txt_ids, vec = ours.encode_prompt(PROMPTS[:1], device="cpu")
    assert txt.dtype == vec.dtype == torch.bfloat16 and txt_ids.dtype == torch.float32
    assert txt.device.type == vec.device.type == txt_ids.device.type == "cpu"
    ours.to("cpu")


@pytest.mark.gpu
def test_t5_on_cpu_outputs_on_gpu(snapshot):
    ours = PromptEncoder.from_pretrained(snapshot)
    ours.clip.to("cuda")  # T5 stays on the CPU, as with offloading
    txt, txt_ids, vec = ours.encode_prompt(PROMPTS, device="cuda")
    assert txt.is_cuda and txt_ids.is_cuda and vec.is_cuda
    ref_txt, _, ref_vec = PromptEncoder.from_pretrained(snapshot).encode_prompt(PROMPTS)
    # fp32 on another device's kernels (another SDPA kernel alone moves the tiny T5 by ~1e-5)
    assert rel_err(txt.cpu(), ref_txt) <= 1e-4 and rel_err(vec.cpu(), ref_vec) <= 1e-4


def test_free(snapshot):
    ours = PromptEncoder.from_pretrained(snapshot)
    ours.encode_prompt(PROMPTS[:1])
    ours.free()
    assert ours.t5 is None and ours.clip is None
    with pytest.raises(FluxMinimalError, match="freed"):
        ours.encode_prompt(PROMPTS[:1])
    ours.to("cpu")  # harmless once freed


def test_missing_folders(snapshot, tmp_path):
    with pytest.raises(WeightsError, match=r"no such folder.*weights\.md"):
        PromptEncoder.from_pretrained(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(snapshot, partial, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(WeightsError, match=r"lacks the text folder\(s\) text_encoder_2/ \(the T5-XXL.*"
                                           r"tokenizer_2/ \(the T5 tokenizer.*weights\.md"):
        PromptEncoder.from_pretrained(partial)
    (partial / "tokenizer_2").mkdir()
    (partial / "text_encoder_2").symlink_to(snapshot / "text_encoder_2")
    with pytest.raises(WeightsError, match=r"tokenizer_2/spiece\.model: no such file"):
        PromptEncoder.from_pretrained(partial)


def test_tokenizer_and_encoder_must_match(snapshot, tmp_path):
    """A T5 with fewer embeddings than the tokenizer has ids: refused when loading, not at run time."""
    root = tmp_path / "mixed"
    shutil.copytree(snapshot, root, ignore=shutil.ignore_patterns("text_encoder_2"))
    cfg = hf_t5_config()
    cfg.vocab_size = 200  # the tokenizer makes ids up to 227
    randomize_(T5EncoderModel(cfg), std=0.1).save_pretrained(root / "text_encoder_2")
    with pytest.raises(WeightsError, match=r"tokenizer_2 makes ids up to 227, but its text encoder has only 200"):
        PromptEncoder.from_pretrained(root)


REAL = os.environ.get("FLUX_FILL_DEV")


@pytest.mark.slow
@pytest.mark.skipif(not REAL, reason="real weights: set FLUX_FILL_DEV=/path/to/FLUX.1-Fill-dev (a snapshot with "
                    "the text folders, see weights.md) to compare with transformers on them (~20 GB of RAM)")
def test_real_snapshot_matches_diffusers():
    """FLUX's own files in bf16, as diffusers runs them: the tokenizers id for id, the embeddings
    within 1e-3 (both round the same ops in bf16; 0 on the tiny model, see test_t5/test_clip)."""
    root = Path(REAL)
    dtype = torch.bfloat16
    pipe = FluxFillPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype).eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2"))
    ours = PromptEncoder.from_pretrained(root, dtype=dtype)
    texts = PROMPTS + ["A photo of a cat wearing sunglasses, 4k, highly detailed!", "word " * 600]
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ours.clip_tokenizer(texts), pipe.tokenizer(texts, max_length=77, **kw).input_ids)
    assert torch.equal(ours.t5_tokenizer(texts), pipe.tokenizer_2(texts, max_length=512, **kw).input_ids)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device=torch.device("cpu"),
                                                      max_sequence_length=512)
    txt, _, vec = ours.encode_prompt(PROMPTS)
    assert rel_err(txt.float(), prompt_embeds.float()) <= 1e-3
    assert rel_err(vec.float(), pooled.float()) <= 1e-3
