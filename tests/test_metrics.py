"""The edit metrics: our CLIP (vision tower + projections) and DINO ViT against transformers at the
real configurations on random weights, and the four metrics against an independent computation of
MagicBrush's formulas (transformers' own preprocessors and models, numpy arithmetic); CLIP at
clip.load's precision (fp16 on CUDA) and how far that moves a score; images read as the reference
reads them; captions CLIP-T cuts; a CLIP folder as transformers 5 saves it (tokenizer.json only)."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from flux_minimal.clip import LayerNorm
from flux_minimal.errors import FluxMinimalError, WeightsError
from flux_minimal.images import to_rgb
from flux_minimal.tokenizers import CLIPTokenizer
from flux_minimal.vit import load_clip_model, load_vit
from flux_eval.metrics import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EditMetrics, reference_clip_dtype
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
SMALL = dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
             vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=224, patch_size=32), projection_dim=32)


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


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """A 2-layer CLIPModel folder with the tiny BPE (vocab.json + merges.txt), and the transformers model."""
    folder = tmp_path_factory.mktemp("small_clip") / "clip"
    write_clip_tokenizer(folder, train_clip_merges())
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    return folder, random_clip(folder, SMALL, vocab_size=vocab)


def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def cos64(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_metrics_equal_the_reference_formulas(small_clip, tmp_path):
    """On synthetic images of odd sizes: L1 from numpy, CLIP-I / CLIP-T / DINO from transformers'
    preprocessors (short side + centre crop; sizes whose crop offsets round the same in torchvision
    and transformers) and models, cosines in numpy float64. Tolerance 1e-4."""
    folder, clip = small_clip
    torch.manual_seed(1)
    dino = transformers.ViTModel(transformers.ViTConfig(**dict(DINO_S16, num_hidden_layers=2))).eval()
    dino.save_pretrained(tmp_path / "dino")
    m = EditMetrics(clip=folder, dino=tmp_path / "dino")  # on a CPU: CLIP in float32, as clip.load there

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
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
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


# ---- precision: clip.load's fp16 on CUDA ---------------------------------------------------------

# fp16's unit round-off. A cosine of two feature vectors whose relative error is e moves by O(e), and
# fp16 features of a network that does not amplify rounding carry e of this order: the bound on how
# far fp16 may move a score. Measured (2 CPU cores, random weights): <= 2e-5 on CLIP-I and <= 1.8e-4
# on CLIP-T for this model, <= 2.1e-5 / 1.0e-4 at ViT-B/32's shape; transformers' own CLIP in fp16
# moves them by as much (1.6e-5 / 1.9e-4). Real weights may amplify rounding more: README, Evaluation.
FP16_ROUNDOFF = 2.0 ** -11
A = [noise_image(300, 200, 0), noise_image(256, 320, 1), noise_image(224, 224, 2), noise_image(333, 250, 7)]
B = [noise_image(320, 240, 3), noise_image(256, 320, 4), noise_image(400, 300, 5), noise_image(250, 333, 8)]
TEXTS = ["a red circle on a gray background", "make it blue", "two cats", "a dog on the grass at night"]


def fp16_shift(half: EditMetrics, full: EditMetrics) -> dict[str, float]:
    return {"clip_i": np.abs(np.subtract(half.clip_i_batch(A, B), full.clip_i_batch(A, B))).max(),
            "clip_t": np.abs(np.subtract(half.clip_t_batch(A, TEXTS), full.clip_t_batch(A, TEXTS))).max()}


def test_clip_runs_at_the_references_precision(small_clip):
    """clip.load's convert_weights: every weight fp16 but the LayerNorms'; the default follows the
    device. fp16 moves each score by less than fp16's round-off, and does move it (it really ran)."""
    folder, _ = small_clip
    assert (reference_clip_dtype("cpu"), reference_clip_dtype("cuda"), reference_clip_dtype(torch.device("cuda", 1))) \
        == (torch.float32, torch.float16, torch.float16)
    full, half = EditMetrics(clip=folder), EditMetrics(clip=folder, clip_dtype=torch.float16)
    assert full.clip_dtype == torch.float32
    norms = {name for name, m in half.clip_model.named_modules() if isinstance(m, LayerNorm)}
    for name, p in half.clip_model.named_parameters():
        assert p.dtype == (torch.float32 if name.rpartition(".")[0] in norms else torch.float16), name
    shift = fp16_shift(half, full)
    print(f"fp16 vs fp32 on a CPU: {shift}")
    assert all(0 < d <= FP16_ROUNDOFF for d in shift.values()), shift


@pytest.mark.gpu
def test_clip_is_fp16_on_cuda_by_default(small_clip):
    folder, _ = small_clip
    half = EditMetrics(clip=folder, device="cuda")
    assert half.clip_dtype == torch.float16
    shift = fp16_shift(half, EditMetrics(clip=folder))  # against float32 on the CPU
    print(f"fp16 on CUDA vs fp32 on a CPU: {shift}")
    assert all(d <= FP16_ROUNDOFF for d in shift.values()), shift


# ---- inputs: the reference's image decoding, captions CLIP-T cuts --------------------------------

def test_metrics_read_images_as_the_reference(tmp_path):
    """Image.open(path).convert("RGB"): alpha dropped, not composited; EXIF orientation ignored."""
    from tests.test_eval_data import rgba_with_exif
    rgb, _ = rgba_with_exif(tmp_path / "a.png")
    m = EditMetrics()
    assert m.l1(tmp_path / "a.png", Image.fromarray(rgb)) == 0.0
    assert m.l1(Image.open(tmp_path / "a.png"), Image.fromarray(rgb)) == 0.0
    ours = to_rgb(Image.open(tmp_path / "a.png"))  # the editor's reading: another image
    assert ours.size == (24, 40) and m.l1(ours, Image.fromarray(rgb)) > 0.1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FluxMinimalError, match="bad.png is not a readable image"):
        m.l1(tmp_path / "bad.png", Image.fromarray(rgb))


def test_caption_cut_is_what_clip_tokenize_would_refuse(small_clip):
    """Over 77 tokens with BOS and EOS (clip.tokenize raises there): transformers' untruncated count."""
    folder, _ = small_clip
    m = EditMetrics(clip=folder)
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    captions = ["a " * n + "cat" for n in range(70, 80)] + ["café naïve 😀 " * 20, "two cats"]
    want = [len(hf(c).input_ids) > 77 for c in captions]
    assert [m.caption_cut(c) for c in captions] == want and any(want) and not all(want)


# ---- a CLIP folder saved by transformers 5: tokenizer.json only ----------------------------------

def test_a_clip_folder_saved_by_transformers_5(small_clip, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json (no vocab.json / merges.txt): the same
    ids as transformers' CLIPTokenizer, the same CLIP-T as the vocab.json folder; merges as "a b"
    strings (tokenizers < 0.20) too; a folder with neither is refused by name."""
    from tests.test_tokenizers import CORPUS
    folder, _ = small_clip
    new = tmp_path / "clip5"
    new.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, new / name)
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    hf.save_pretrained(new)
    assert (new / "tokenizer.json").is_file() and not (new / "vocab.json").exists()
    want = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CORPUS's last text is cut
        assert torch.equal(CLIPTokenizer.from_folder(new)(CORPUS), want)
        data = json.loads((new / "tokenizer.json").read_text())
        data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
        (new / "tokenizer.json").write_text(json.dumps(data))
        assert torch.equal(CLIPTokenizer.from_folder(new)(CORPUS), want)
    assert EditMetrics(clip=new).clip_t_batch(A, TEXTS) == EditMetrics(clip=folder).clip_t_batch(A, TEXTS)
    data["model"]["type"] = "WordPiece"
    (new / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"tokenizer.json: \"model\" is not CLIP's byte-level BPE"):
        CLIPTokenizer.from_folder(new)
    (new / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match=r"no CLIP tokenizer here: it needs vocab.json \+ merges.txt, or tokenizer"):
        EditMetrics(clip=new)
