"""The edit metrics: our CLIP (vision tower + projections) and DINO ViT against transformers at the
real configurations on random weights, and the four metrics against an independent computation of
MagicBrush's formulas (transformers' own preprocessors and models, numpy arithmetic)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from flux_minimal.errors import WeightsError
from flux_minimal.vit import load_clip_model, load_vit
from flux_eval.metrics import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EditMetrics
from tests.helpers import rel_err
from tests.text_fixtures import train_clip_merges, write_clip_tokenizer

B32 = dict(text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
           vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32), projection_dim=512)
L14 = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
           vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14), projection_dim=768)
DINO_S16 = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                patch_size=16, layer_norm_eps=1e-6)


def random_clip(folder, cfg, vocab_size=49408):
    torch.manual_seed(0)
    text = dict(cfg["text_config"], vocab_size=vocab_size, eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2)
    model = transformers.CLIPModel(transformers.CLIPConfig(**dict(cfg, text_config=text))).eval()
    model.save_pretrained(folder)
    return model


def features(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [("ViT-B/32", B32), ("ViT-L/14", L14)])
def test_clip_matches_transformers(tmp_path, name, cfg):
    ref = random_clip(tmp_path, cfg)
    ours = load_clip_model(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    ids = torch.randint(0, 49406, (2, 77))
    ids[0, 9], ids[1, 76] = 49407, 49407  # EOS early in one row, last in the other
    with torch.no_grad():
        assert rel_err(ours.image_features(x), features(ref.get_image_features(pixel_values=x))) <= 1e-5
        assert rel_err(ours.text_features(ids), features(ref.get_text_features(input_ids=ids))) <= 1e-5


def test_dino_vit_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(**DINO_S16)).eval()  # with a pooler, which we ignore
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(load_vit(tmp_path)(x), ref(pixel_values=x).last_hidden_state[:, 0]) <= 1e-5


def test_loading_names_the_problem(tmp_path):
    ref = transformers.ViTModel(transformers.ViTConfig(**dict(DINO_S16, num_hidden_layers=1)))
    ref.save_pretrained(tmp_path / "vit")
    with pytest.raises(WeightsError, match="not a whole CLIP"):
        load_clip_model(tmp_path / "vit")
    cfg = (tmp_path / "vit" / "config.json").read_text().replace('"hidden_size": 384', '"hidden_size": 256')
    (tmp_path / "vit" / "config.json").write_text(cfg)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_vit(tmp_path / "vit")


def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def cos64(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_metrics_equal_the_reference_formulas(tmp_path):
    """On synthetic images of odd sizes: L1 from numpy, CLIP-I / CLIP-T / DINO from transformers'
    preprocessors (short side + centre crop; sizes whose crop offsets round the same in torchvision
    and transformers) and models, cosines in numpy float64. Tolerance 1e-4."""
    small = dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                 vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=224, patch_size=32), projection_dim=32)
    merges = train_clip_merges()
    write_clip_tokenizer(tmp_path / "clip", merges)
    vocab = len(__import__("json").loads((tmp_path / "clip" / "vocab.json").read_text()))
    clip = random_clip(tmp_path / "clip", small, vocab_size=vocab)
    torch.manual_seed(1)
    dino = transformers.ViTModel(transformers.ViTConfig(**dict(DINO_S16, num_hidden_layers=2))).eval()
    dino.save_pretrained(tmp_path / "dino")
    m = EditMetrics(clip=tmp_path / "clip", dino=tmp_path / "dino")

    a = [noise_image(300, 200, 0), noise_image(256, 320, 1), noise_image(224, 224, 2)]
    b = [noise_image(320, 240, 3), noise_image(256, 320, 4), noise_image(400, 300, 5)]
    texts = ["a red circle on a gray background", "make it blue", "two cats"]

    for x, y, got in zip(a, b, m.l1_batch(a, b)):
        xr = np.asarray(x.resize(y.size, Image.Resampling.BICUBIC), np.float64) / 255
        assert abs(got - np.abs(xr - np.asarray(y, np.float64) / 255).mean()) <= 1e-6
    clip_proc = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    dino_proc = transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                               resample=Image.Resampling.BICUBIC)
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        def clip_img(ims):
            return features(clip.get_image_features(**clip_proc(ims, return_tensors="pt"))).numpy()

        def dino_img(ims):
            return dino(**dino_proc(ims, return_tensors="pt")).last_hidden_state[:, 0].numpy()
        ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        txt = features(clip.get_text_features(input_ids=ids)).numpy()
        want = {"clip_i": cos64(clip_img(a), clip_img(b)), "clip_t": cos64(clip_img(a), txt),
                "dino": cos64(dino_img(a), dino_img(b))}
    got = {"clip_i": m.clip_i_batch(a, b), "clip_t": m.clip_t_batch(a, texts), "dino": m.dino_batch(a, b)}
    for k in want:
        assert np.abs(np.array(got[k]) - want[k]).max() <= 1e-4, (k, got[k], want[k])
    assert m.clip_i(a[0], b[0]) == pytest.approx(got["clip_i"][0], abs=1e-6)  # one pair = the batch's row
    assert len(set(np.round(got["clip_i"], 6))) == 3  # the images differ, so do the scores


def test_a_metric_without_its_model_says_so():
    with pytest.raises(ValueError, match="needs its model: pass dino="):
        EditMetrics().dino(noise_image(64, 64, 0), noise_image(64, 64, 1))
