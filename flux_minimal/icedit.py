"""ICEdit's in-context edit: an instruction edit done as inpainting by FLUX.1 Fill.

The source goes on the left of a diptych [source | source]; the right half is masked, so Fill
regenerates it; the prompt (IC_PROMPT) says the right is the same scene as the left but with the
instruction applied. The right half of the result is the edit. Shared by the editing pipeline
and training (which puts the target on the right and learns to reproduce it).

    diptych  make_diptych(source)       2w x h     mask  right_half_mask(h, 2w): 1 on the right
    prompt   ic_prompt(instruction)                edit  right_half(result): crop (w, 0, 2w, h)
"""

import torch
from PIL import Image
from torch import Tensor

from .errors import FluxMinimalError

# The in-context edit prompt, exactly as in the paper and the official scripts.
IC_PROMPT = ("A diptych with two side-by-side images of the same scene. On the right, the scene is "
             "exactly the same as on the left but {instruction}")


def ic_prompt(instruction: str, template: str = IC_PROMPT) -> str:
    """The prompt for `instruction` (whitespace collapsed; an empty instruction is refused)."""
    instruction = " ".join(instruction.split())
    if not instruction:
        raise FluxMinimalError("the instruction is empty: say what to change, e.g. \"make the sky purple\"")
    return template.format(instruction=instruction)


def make_diptych(left: Image.Image, right: Image.Image | None = None) -> Image.Image:
    """[left | right] side by side (right defaults to left: it is masked out at inference)."""
    right = left if right is None else right
    if right.size != left.size:
        raise ValueError(f"diptych halves differ in size: {left.size} vs {right.size}")
    out = Image.new("RGB", (2 * left.width, left.height))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def right_half_mask(height: int, width: int) -> Tensor:
    """[1, 1, H, W] float mask of a diptych of total width W: 0 on the left, 1 (generate) on the right."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., width // 2:] = 1.0
    return mask


def right_half(img: Image.Image) -> Image.Image:
    """The edit: the right half of a generated diptych."""
    return img.crop((img.width // 2, 0, img.width, img.height))
