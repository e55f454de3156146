"""The sampler against diffusers (schedule, packing, ids) and its own guarantees (candidate
batches, stop and resume)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flux_minimal import PRESETS, Flux
from flux_minimal.sampling import (Conditioning, DenoiseState, denoise, get_noise, get_schedule, image_ids, pack,
                                   pack_mask, unpack)
from tests.helpers import randomize_, rel_err

FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("hw", [(512, 1024), (1024, 1024), (64, 128), (1536, 2048), (768, 1360)])
def test_schedule_equals_flow_match_euler_with_dynamic_shift(steps, hw):
    """The pipeline's recipe: sigmas = linspace(1, 1/N, N), mu from the packed length, then the
    scheduler's exponential shift; its sigmas end with 0. fp32 there, fp64 here: 1e-6."""
    h, w = hw
    seq_len = (h // 16) * (w // 16)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ours = torch.tensor(get_schedule(steps, seq_len), dtype=torch.float64)
    assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.allclose(ours, sched.sigmas.double(), rtol=0, atol=1e-6)


def test_packing_matches_diffusers():
    B, C, H, W = 2, 16, 6, 10  # latent size: pixels 48 x 80
    z = torch.randn(B, C, H, W)
    assert torch.equal(pack(z), FluxFillPipeline._pack_latents(z, B, C, H, W))
    assert torch.equal(unpack(pack(z), 8 * H, 8 * W), z)
    mask = (torch.rand(B, 1, 8 * H, 8 * W) > 0.5).float()
    theirs = mask[:, 0].view(B, H, 8, W, 8).permute(0, 2, 4, 1, 3).reshape(B, 64, H, W)
    assert torch.equal(pack_mask(mask), FluxFillPipeline._pack_latents(theirs, B, 64, H, W))
    ids = FluxFillPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
    assert torch.equal(image_ids(B, 8 * H, 8 * W)[0], ids)


def test_noise_is_per_seed_and_cpu_seeded():
    a = get_noise([5, 6, 7], 64, 96)
    assert a.shape == (3, 16, 8, 12) and a.dtype == torch.float32
    assert torch.equal(a[1:2], get_noise([6], 64, 96))
    assert torch.equal(a[0:1], torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(5)))


@pytest.fixture(scope="module")
def tiny():
    p = PRESETS["tiny-fill"].flux
    model = randomize_(Flux(p), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    H, W = 48, 96
    L = (H // 16) * (W // 16)
    cond = Conditioning(image_ids(1, H, W), torch.randn(1, 5, p.context_in_dim, generator=g), torch.zeros(1, 5, 3),
                        torch.randn(1, p.vec_in_dim, generator=g), torch.randn(1, L, 320, generator=g))
    return model, cond, H, W


def test_candidate_batch_equals_single_runs(tiny):
    """M noises as one batch (text and conditioning expanded, not copied) give each seed's own
    run. Batched and single GEMMs may differ in the last bits on CPU: 1e-5."""
    model, cond, H, W = tiny
    seeds, ts = [3, 4, 5], get_schedule(6, 18)
    batch = denoise(model, DenoiseState(pack(get_noise(seeds, H, W)), ts), cond, guidance=50.0)
    assert batch.nfe == 3 * 6 and cond.expand(3).txt.data_ptr() == cond.txt.data_ptr()
    for i, s in enumerate(seeds):
        single = denoise(model, DenoiseState(pack(get_noise([s], H, W)), ts), cond, guidance=50.0)
        assert rel_err(batch.x[i:i + 1], single.x) <= 1e-5


def test_stop_and_resume_equals_uninterrupted(tiny):
    model, cond, H, W = tiny
    ts = get_schedule(8, 18)
    start = DenoiseState(pack(get_noise([1, 2], H, W)), ts)
    full = denoise(model, start, cond, guidance=30.0)
    early = denoise(model, start, cond, guidance=30.0, stop=3)
    assert early.step == 3 and not early.done and early.x0 is not None
    # x0 is the predicted clean latent of the last model call (at sigma ts[2]): x_t - t v
    x2 = denoise(model, start, cond, guidance=30.0, stop=2).x
    v = (early.x - x2) / (ts[3] - ts[2])
    assert rel_err(early.x0, x2 - ts[2] * v) <= 1e-5
    resumed = denoise(model, early, cond, guidance=30.0)
    assert resumed.done and torch.equal(resumed.x, full.x)  # same batch: bit-identical
    one = denoise(model, early.select(1), cond, guidance=30.0)  # the winner alone
    assert rel_err(one.x, full.x[1:2]) <= 1e-5
