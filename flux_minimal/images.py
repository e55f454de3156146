"""Images in and out, shared by the editing pipeline, training and evaluation.

    in   a file or a PIL image (any mode, EXIF-rotated) -> checked -> RGB (`load_image`),
         resized to a width (x16, aspect kept: `fit_width`)
    out  [-1, 1] tensors <-> PIL (`to_tensor`, `to_pil`); PNGs written atomically (`save_png`)

ICEdit's own use of images (the diptych, its mask, the prompt) is in icedit.py.
"""

from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from .errors import FluxMinimalError
from .files import atomic_write, save_or_fallback

MIN_SIDE = 64  # smaller inputs carry too little to edit; FLUX works on 16-pixel patches
MAX_PIXELS = 64_000_000  # larger files are refused before decoding (decompression-bomb guard)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, alpha composited on white, 16-bit grey
    scaled to 8 bits, palette/CMYK/L converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def load_image(src: "str | Path | Image.Image", min_side: int = MIN_SIDE) -> Image.Image:
    """Open and validate an input image; every failure is a FluxMinimalError naming the file."""
    name = "the image" if isinstance(src, Image.Image) else str(src)
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.is_file():
            raise FluxMinimalError(f"{path}: no such image file")
        try:
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise FluxMinimalError(f"{path} is {w}x{h} ({w * h / 1e6:.0f} MP); the limit is "
                                       f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first (it is resized to "
                                       f"the edit width anyway).")
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise FluxMinimalError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise FluxMinimalError(f"{name} is {w}x{h}; both sides must be at least {min_side} pixels")
    return to_rgb(img)


def fit_width(img: Image.Image, width: int) -> Image.Image:
    """Resize to `width` (rounded down to a multiple of 16), height scaled with the aspect kept and
    rounded down to a multiple of 16 (ICEdit resizes to width 512; FLUX needs 16-pixel patches)."""
    w16 = width // 16 * 16
    if w16 < 16:
        raise FluxMinimalError(f"width {width} is too small: use at least 16 (ICEdit uses 512)")
    h16 = max(16, int(img.height * w16 / img.width) // 16 * 16)
    if (w16, h16) == img.size:
        return img
    return img.resize((w16, h16), Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
    return (a / 127.5 - 1.0).permute(2, 0, 1)[None]


def to_pil(x: Tensor) -> Image.Image:
    """[1, 3, H, W] or [3, H, W] in [-1, 1] -> PIL RGB (clamped, rounded to the nearest level)."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-3:])[0].clamp(-1, 1)
    a = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a)  # uint8 [H, W, 3]: RGB


def png_writer(img: Image.Image, metadata: dict | None = None) -> Callable[[BinaryIO], None]:
    """`write(f)` for files.atomic_write: the image as PNG, `metadata` in its text chunks."""
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    return lambda f: img.save(f, format="PNG", pnginfo=info)


def save_png(img: Image.Image, path: "str | Path", metadata: dict | None = None, keep: bool = False) -> Path:
    """Write a PNG atomically (flux_minimal.files): an interrupted run never leaves a half-written
    image, and a folder or a special file (/dev/full, a FIFO) at `path` is never replaced. keep=True
    is for results that took work: if the write fails, the PNG is saved in the temp folder instead
    and the error says where."""
    write = png_writer(img, metadata)
    return save_or_fallback(path, write, "output PNG") if keep else atomic_write(path, write, "output PNG")
