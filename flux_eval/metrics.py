"""The image-editing metrics of the paper's tables, computed as MagicBrush's evaluation/image_eval.py does.

    m = EditMetrics(clip="weights/clip-vit-base-patch32", dino="weights/dino-vits16")
    m.l1(edit, target)            # mean |a - b| in [0, 1], a resized (bicubic) to b's size first
    m.clip_i(edit, target)        # cosine of CLIP ViT-B/32 image embeddings
    m.clip_t(edit, caption)       # cosine of the image embedding and the caption's text embedding
    m.dino(edit, target)          # cosine of DINO ViT-S/16 class tokens

Images are read as the reference reads them, `Image.open(path).convert("RGB")`: no EXIF rotation,
and an alpha channel dropped rather than composited (flux_eval.datasets.as_reference).
Preprocessing, as the reference's torchvision transforms (reimplemented on PIL):
    CLIP   short side -> 224 (bicubic), centre crop 224, /255, CLIP's mean and std (openai's clip.load)
    DINO   short side -> 256 (bicubic), centre crop 224, /255, ImageNet mean and std
    L1     ToTensor (/255) of both, the first resized to the second's size (PIL's bicubic)
CLIP precision: `clip.load` gives an fp16 model on CUDA (its convert_weights: every weight in fp16
but the LayerNorms', which compute in fp32) and fp32 on a CPU; `clip_dtype=None` does the same,
another dtype can be asked for (README, Evaluation, has what fp16 changes). DINO runs in fp32, as
the reference's torch.hub model.
Cosines: the reference takes `1 - scipy.spatial.distance.cosine` of the features `.float()`, so
its dot products are float32 sums; ours are float64. The two differ by float32 rounding (~1e-7),
far below the 3 decimals reported.
CLIP-T: the reference tokenizes with clip.tokenize, which raises on a caption over 77 tokens; here
such a caption is cut to 77 (the tokenizer warns) and `caption_cut` says so, for the summary to count.
Every metric has a batched form (`*_batch`) that runs the models on many images at once.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flux_eval.datasets import as_reference
from flux_minimal.clip import LayerNorm
from flux_minimal.errors import FluxMinimalError
from flux_minimal.tokenizers import CLIPTokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image: the short side to `size`, the long one scaled and
    truncated, bicubic."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size): the offsets rounded half to even, as its int(round(...))."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_unit(img: Image.Image) -> Tensor:
    """ToTensor: PIL RGB -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def preprocess(img: Image.Image, resize: int, crop: int, mean, std) -> Tensor:
    x = to_unit(center_crop(resize_short_side(img.convert("RGB"), resize), crop))
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]  # [3, crop, crop]


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity, in float64 (scipy's, in the reference, is float32): [B, D], [B, D] -> [B]."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _image(x) -> Image.Image:
    """A path, bytes or PIL image, as the reference's plain `.convert("RGB")`; an unreadable file names itself."""
    try:
        return as_reference(x)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FluxMinimalError(f"{x if isinstance(x, (str, Path)) else 'an image'} is not a readable image "
                               f"({type(e).__name__}: {e})") from None


def reference_clip_dtype(device: "str | torch.device") -> torch.dtype:
    """clip.load's precision: float16 on CUDA, float32 anywhere else."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def to_clip_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """openai's convert_weights: every parameter in `dtype` except the LayerNorms', which stay in
    float32 (they compute in float32 and return the input's dtype)."""
    for module in model.modules():
        if not isinstance(module, LayerNorm):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model


class EditMetrics:
    """L1, CLIP-I, CLIP-T and DINO. `clip` / `dino` are the model folders (transformers layouts, see
    weights.md); a metric whose model was not given raises a clear error when asked for."""

    def __init__(self, clip: "str | Path | None" = None, dino: "str | Path | None" = None, device="cpu",
                 batch: int = 32, clip_dtype: torch.dtype | None = None):
        from flux_minimal.vit import load_clip_model, load_vit
        self.device, self.batch = torch.device(device), batch
        self.clip_dtype = clip_dtype or reference_clip_dtype(self.device)
        self.clip_model = None
        if clip:  # loaded in float32, then rounded as clip.load rounds it
            self.clip_model = to_clip_precision(load_clip_model(clip, device=self.device), self.clip_dtype)
        self.dino_model = load_vit(dino, device=self.device) if dino else None
        self.clip_size = self.clip_model.vision_model.config.image_size if self.clip_model else 224
        self.tokenizer = None
        if clip:
            self.tokenizer = CLIPTokenizer.from_folder(clip, self.clip_model.config.max_position_embeddings)

    def _need(self, model, name: str, flag: str):
        if model is None:
            raise ValueError(f"the {name} metric needs its model: pass {flag}=FOLDER (weights.md says which)")
        return model

    @torch.no_grad()
    def _embed(self, images: list, resize: int, crop: int, mean, std, fn, dtype: torch.dtype) -> Tensor:
        out = []
        for k in range(0, len(images), self.batch):
            x = torch.stack([preprocess(_image(i), resize, crop, mean, std) for i in images[k:k + self.batch]])
            out.append(fn(x.to(self.device, dtype)).float().cpu())  # features .float(), as the reference's
        return torch.cat(out)

    def clip_image_features(self, images: list) -> Tensor:
        m = self._need(self.clip_model, "CLIP", "clip")
        return self._embed(images, self.clip_size, self.clip_size, CLIP_MEAN, CLIP_STD, m.image_features,
                           self.clip_dtype)

    @torch.no_grad()
    def clip_text_features(self, texts: list[str]) -> Tensor:
        m = self._need(self.clip_model, "CLIP", "clip")
        return torch.cat([m.text_features(self.tokenizer(texts[k:k + self.batch]).to(self.device)).float().cpu()
                          for k in range(0, len(texts), self.batch)])

    def dino_features(self, images: list) -> Tensor:
        m = self._need(self.dino_model, "DINO", "dino")
        return self._embed(images, 256, m.config.image_size, IMAGENET_MEAN, IMAGENET_STD, m, torch.float32)

    def caption_cut(self, text: str) -> bool:
        """Whether CLIP-T cuts this caption (over max_length tokens with BOS and EOS; the reference raises)."""
        self._need(self.clip_model, "CLIP", "clip")
        return len(self.tokenizer.encode(text)) + 2 > self.tokenizer.max_length

    # ---- batched metrics: lists in, a list of floats out ----

    def l1_batch(self, a: list, b: list) -> list[float]:
        out = []
        for x, y in zip(a, b):
            x, y = _image(x), _image(y)
            if x.size != y.size:
                x = x.resize(y.size, Image.Resampling.BICUBIC)
            out.append((to_unit(x) - to_unit(y)).abs().mean().item())
        return out

    def clip_i_batch(self, a: list, b: list) -> list[float]:
        return cosine(self.clip_image_features(a), self.clip_image_features(b)).tolist()

    def clip_t_batch(self, images: list, texts: list[str]) -> list[float]:
        return cosine(self.clip_image_features(images), self.clip_text_features(texts)).tolist()

    def dino_batch(self, a: list, b: list) -> list[float]:
        return cosine(self.dino_features(a), self.dino_features(b)).tolist()

    # ---- one pair ----

    def l1(self, a, b) -> float:
        return self.l1_batch([a], [b])[0]

    def clip_i(self, a, b) -> float:
        return self.clip_i_batch([a], [b])[0]

    def clip_t(self, image, text: str) -> float:
        return self.clip_t_batch([image], [text])[0]

    def dino(self, a, b) -> float:
        return self.dino_batch([a], [b])[0]
