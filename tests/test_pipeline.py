"""The ICEdit pipeline end to end against diffusers' FluxFillPipeline, and its behaviour as a product
(multi-turn, metadata, memory modes, bad input) on a tiny random snapshot."""

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from flux_minimal.errors import FluxMinimalError
from flux_minimal.icedit import IC_PROMPT, make_diptych, right_half
from flux_minimal.sampling import pack
from infer.pipeline import ICEditPipeline
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def pipe(snapshot):
    return ICEditPipeline.from_pretrained(snapshot)


def source_image(w=64, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 8, w // 8, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    return img


def test_matches_diffusers_fill_pipeline(snapshot, pipe):
    """Same diptych, mask, full in-context prompt and initial latents in both pipelines.
    Tolerance: final latents 1e-4 relative (fp32 through T5, CLIP, 4 steps of the DiT and the VAE,
    with diffusers rounding nothing in fp32 either); the decoded edit within 1/255 per pixel
    (rounding of the last level can differ)."""
    instruction, steps = "make the sky purple", 4
    src = source_image()
    W, H = 2 * src.width, src.height
    latents = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))

    ref = FluxFillPipeline.from_pretrained(snapshot).to("cpu")
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (src.width, 0, W, H))
    kwargs = dict(prompt=IC_PROMPT.format(instruction=instruction), image=make_diptych(src), mask_image=mask,
                  height=H, width=W, num_inference_steps=steps, guidance_scale=50.0, latents=pack(latents),
                  max_sequence_length=512, generator=torch.Generator().manual_seed(0))
    theirs_latent = ref(output_type="latent", **kwargs).images  # packed [1, L, 64]
    theirs_img = ref(output_type="pil", **kwargs).images[0]

    job = pipe.prepare(src, instruction, width=src.width)
    state = pipe.sample(job, pipe.initial_state(job, [0], steps, latents), 50.0, progress=False)
    assert rel_err(state.x, theirs_latent) <= 1e-4
    ours = np.asarray(pipe.edit(src, instruction, width=src.width, steps=steps, latents=latents, progress=False),
                      dtype=np.int16)
    diff = np.abs(ours - np.asarray(right_half(theirs_img), dtype=np.int16))
    assert diff.max() <= 1, diff.max()


def test_edit_report_and_multi_turn(pipe):
    src = source_image(128, 96)
    out = pipe.edit(src, "add a hat", width=96, steps=2, progress=False)
    assert out.size == (96, 64)  # width 96; height 96 * 96/128 = 72 -> 64 (multiple of 16)
    r = pipe.last_report
    assert r["nfe"] == 2 and set(r["seconds"]) == {"text", "encode", "denoise", "decode"} and r["it_per_s"] > 0
    turns = pipe.edit_turns(src, ["add a hat", "make it snow"], width=96, steps=2, progress=False)
    assert len(turns) == 2 and len(pipe.last_report["turns"]) == 2
    # turn 2 edits turn 1's result: the same as editing it directly
    again = pipe.edit(turns[0], "make it snow", width=96, steps=2, progress=False)
    assert np.array_equal(np.asarray(again), np.asarray(turns[1]))
    assert np.array_equal(np.asarray(turns[0]), np.asarray(out))


def test_seed_reproducible_and_latents_checked(pipe):
    src = source_image()
    a = pipe.edit(src, "x", width=64, steps=2, seed=7, progress=False)
    b = pipe.edit(src, "x", width=64, steps=2, seed=7, progress=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FluxMinimalError, match=r"latents must have shape \[1, 16, 8, 16\]"):
        pipe.edit(src, "x", width=64, steps=2, latents=torch.zeros(1, 16, 6, 8), progress=False)


@pytest.mark.parametrize("offload", ["model", "blocks"])
def test_offload_modes_same_result(snapshot, pipe, offload):
    """On the CPU the visitors only shuffle tensors between host copies; the result must not move."""
    src = source_image()
    want = pipe.edit(src, "x", width=64, steps=2, progress=False)
    other = ICEditPipeline.from_pretrained(snapshot, offload=offload)
    got = other.edit(src, "x", width=64, steps=2, progress=False)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_bad_requests(pipe):
    src = source_image()
    with pytest.raises(FluxMinimalError, match="instruction is empty"):
        pipe.edit(src, "   ", width=64, steps=2, progress=False)
    with pytest.raises(FluxMinimalError, match="at least 64 pixels"):
        pipe.edit(source_image(40, 40), "x", width=64, steps=2, progress=False)
    with pytest.raises(FluxMinimalError, match="steps must be >= 1"):
        pipe.edit(src, "x", width=64, steps=0, progress=False)
    with pytest.raises(FluxMinimalError, match="width 8 is too small"):
        pipe.edit(src, "x", width=8, steps=1, progress=False)


def test_long_instruction_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="T5 tokenizer: text 0 .* cut to max_length=512"):
        pipe.edit(source_image(), "make it " + "very " * 600 + "red", width=64, steps=1, progress=False)
